"""The fusion projector: modality tokens -> the language model's input-embedding space.

Per modality kind: average-pool the token axis to a fixed count, then an MLP (Linear, GELU, Linear, ...)
to the LM's hidden size. QoQ-Med mean-pooled its ECG tokens to a single token and applied one Linear
(768 -> LM hidden); ``tokens_per_item={"ecg": 1}, depth=1`` reproduces that.

Its own stage is a LLaVA-style alignment pre-training: encoders and LM frozen, only the projector trains,
cheap and offline. The target of an item is the mean LM input embedding of its answer text; the loss is an
InfoNCE over the distinct answers of the batch (cosine similarity / temperature), so an item's mean
projected token moves towards the embedding of its own answer and away from the others. It gives the policy
a projector whose outputs already live where the LM's label words live before SFT or RL start.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qoq.models.builders import LMBuilder
from qoq.models.encoders import ModalityEncoder
from qoq.types import PromptBatch


def _mlp(in_dim: int, hidden_size: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_size)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
    return nn.Sequential(*layers)


class FusionProjector(L.LightningModule):
    """Projects each modality's encoder tokens ``[M, T, D_kind]`` to LM embeddings ``[M, T', hidden_size]``.

    Args:
        in_dims: token width of each modality kind's encoder, e.g. ``{"image": 192, "ecg": 64}``.
        hidden_size: the language model's hidden size.
        tokens_per_item: tokens each item becomes (adaptive average pooling of the token axis; an item that
            already has at most that many tokens keeps them all); one value for every kind or one per kind,
            None keeping every token.
        depth: Linear layers per kind (GELU between them).
        encoders: the frozen encoders the alignment stage runs (kind -> module); only for that stage.
        lm: LM builder whose input embeddings and tokenizer give the alignment targets; only for that stage
            (the LM itself is not kept).
        temperature: InfoNCE temperature of the alignment stage.
        lr: AdamW learning rate of the alignment stage.
        weight_decay: AdamW weight decay of the alignment stage.
    """

    def __init__(
        self,
        in_dims: dict[str, int],
        hidden_size: int,
        tokens_per_item: dict[str, int | None] | int | None = 4,
        depth: int = 2,
        encoders: dict[str, ModalityEncoder] | None = None,
        lm: LMBuilder | None = None,
        temperature: float = 0.07,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"FusionProjector: depth={depth} must be >= 1")
        if isinstance(tokens_per_item, dict):
            unknown = set(tokens_per_item) - set(in_dims)
            if unknown:
                raise ValueError(
                    f"FusionProjector: tokens_per_item names kinds {unknown} missing from in_dims"
                )
            self.tokens_per_item = {k: tokens_per_item.get(k) for k in in_dims}
        else:
            self.tokens_per_item = {k: tokens_per_item for k in in_dims}
        self.in_dims = dict(in_dims)
        self.hidden_size = hidden_size
        self.mlps = nn.ModuleDict({k: _mlp(d, hidden_size, depth) for k, d in in_dims.items()})
        self.encoders = nn.ModuleDict(encoders or {})
        self.encoders.requires_grad_(False)
        self.lm_builder = lm
        self.temperature = temperature
        self.lr = lr
        self.weight_decay = weight_decay
        self._tokenizer: Any = None

    def forward(self, kind: str, tokens: Tensor) -> Tensor:
        """Project one kind's items.

        Args:
            kind: modality kind ("image", "video", "ecg").
            tokens: ``[M, T, D_kind]`` encoder tokens.

        Returns:
            ``[M, T', hidden_size]`` with ``T' = min(T, tokens_per_item[kind])``.
        """
        if kind not in self.mlps:
            raise KeyError(
                f"FusionProjector has no projection for modality {kind!r} (has {sorted(self.mlps)})"
            )
        if tokens.ndim != 3 or tokens.shape[-1] != self.in_dims[kind]:
            raise ValueError(
                f"FusionProjector[{kind!r}] expects tokens [M, T, {self.in_dims[kind]}], "
                f"got {tuple(tokens.shape)}"
            )
        keep = self.tokens_per_item[kind]
        if keep is not None and tokens.shape[1] > keep:
            tokens = F.adaptive_avg_pool1d(tokens.transpose(1, 2), keep).transpose(1, 2)  # [M, keep, D]
        mlp = self.mlps[kind]
        return mlp(tokens.to(mlp[0].weight.dtype))

    # ----- alignment stage -------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Load the alignment encoders' weights and build the target table (LM input embeddings) once."""
        for encoder in self.encoders.values():
            encoder.configure_model()  # idempotent
        if self.lm_builder is None or self._tokenizer is not None:
            return
        model, self._tokenizer = self.lm_builder.build()
        table = model.get_input_embeddings().weight.detach().float().clone()  # [V, H]
        if table.shape[1] != self.hidden_size:
            raise ValueError(
                f"FusionProjector: hidden_size={self.hidden_size} "
                f"but the LM's embeddings are {table.shape[1]} wide"
            )
        self.register_buffer("answer_table", table, persistent=False)
        del model

    def answer_embeddings(self, answers: list[str]) -> Tensor:
        """Mean LM input embedding of each answer text ``[U, hidden_size]``."""
        rows = []
        for text in answers:
            ids = self._tokenizer(text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"FusionProjector: empty answer text {text!r} has no alignment target")
            rows.append(self.answer_table[torch.tensor(ids, device=self.answer_table.device)].mean(0))
        return torch.stack(rows).to(self.device)  # the table may have been built after a device move

    def alignment_loss(self, batch: PromptBatch) -> Tensor | None:
        """InfoNCE between items' mean projected tokens and their answers' mean LM embeddings.

        For every kind with an encoder, item m of prompt p is scored against the U distinct answer texts
        (labels joined by ", ") of the batch: ``logits[m, u] = cos(mean_t proj[m, t], e_u) / temperature``,
        and the loss is the cross-entropy towards p's answer, averaged over all items. None when the batch has
        no item of a kind with an encoder.
        """
        if self._tokenizer is None:
            if self.lm_builder is None or not len(self.encoders):
                raise RuntimeError("FusionProjector's alignment stage needs `encoders` and an `lm` builder")
            self.configure_model()
        answers = [", ".join(t.answer) for t in batch.targets]
        unique = sorted(set(answers))
        targets = F.normalize(self.answer_embeddings(unique), dim=-1)  # [U, H]
        losses = []
        for kind, items in batch.modalities.items():
            if kind not in self.encoders or len(items.values) == 0:
                continue
            with torch.no_grad():
                tokens = self.encoders[kind](items.values)  # [M, T, D]
            z = F.normalize(self(kind, tokens).mean(1).float(), dim=-1)  # [M, H]
            label = torch.tensor([unique.index(answers[p]) for p in items.owner.tolist()], device=z.device)
            losses.append(F.cross_entropy(z @ targets.T / self.temperature, label, reduction="none"))
        return torch.cat(losses).mean() if losses else None

    def training_step(self, batch: PromptBatch, batch_idx: int) -> Tensor | None:
        """The alignment stage's loss (logged as ``train/loss``)."""
        loss = self.alignment_loss(batch)
        if loss is not None:
            self.log("train/loss", loss, batch_size=len(batch), prog_bar=True)
        return loss

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        """Logs the alignment loss as ``val/loss``."""
        loss = self.alignment_loss(batch)
        if loss is not None:
            self.log("val/loss", loss, batch_size=len(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the projection MLPs (the encoders stay frozen)."""
        return torch.optim.AdamW(self.mlps.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def train(self, mode: bool = True) -> FusionProjector:
        """Switch mode; the frozen alignment encoders always stay in eval mode."""
        super().train(mode)
        self.encoders.eval()
        return self
