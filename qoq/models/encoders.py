"""Modality encoders: images, 3-D volumes / cines, and ECGs, each turned into a token sequence ``[M, T, D]``.

Every encoder is a LightningModule usable on its own stage: ``qoq fit --model qoq.models.ECGEncoder ...``
pretrains it as a classifier on its domain's labels (a linear head on the mean token; multi-label -> BCE,
single-label -> cross-entropy). Inside a :class:`~qoq.models.Policy` only ``forward`` is used, and the tokens
go through the :class:`~qoq.models.FusionProjector` into the language model's embedding space.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qoq.types import PromptBatch

_HEAD_PREFIXES = ("head.", "fc.", "classifier.")


def load_weights(
    module: nn.Module,
    path: str | Path,
    prefix: str = "",
    filter_fn: Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]] | None = None,
) -> None:
    """Load a local weights file into ``module``, leaving its classification heads (``head.``, ...) alone.

    Accepts ``.safetensors`` files, plain ``torch.save`` state dicts, and checkpoints that wrap one under
    ``state_dict`` / ``model`` / ``module`` (e.g. a Lightning checkpoint of this encoder's own stage).

    Args:
        module: the module to fill.
        path: the weights file.
        prefix: when some keys start with it (e.g. "backbone."), only those are used, with it stripped.
        filter_fn: a timm-style ``checkpoint_filter_fn(state_dict, model)`` (e.g. resamples position
            embeddings to the model's image size).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file does not match ``module`` (missing or unexpected keys other than heads).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if prefix and any(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if filter_fn is not None:
        state = filter_fn(state, module)
    state = {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}  # never load classifiers
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(_HEAD_PREFIXES)]
    if missing or unexpected:
        raise ValueError(
            f"weights file {str(path)!r} does not fit {type(module).__name__}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


class ModalityEncoder(L.LightningModule):
    """Base class of the encoders: ``forward(x) -> tokens [M, T, out_dim]`` and a classification stage.

    Subclasses set the class attribute ``kind`` (the key of ``PromptBatch.modalities`` they read), build
    their layers, set ``out_dim`` and then call :meth:`_make_head`.

    Args:
        labels: label vocabulary of the stand-alone classification stage (empty: no head, encoder only).
        multi_label: train the stage with BCE over labels (chest X-ray findings) instead of cross-entropy.
        lr: AdamW learning rate of the stage.
        weight_decay: AdamW weight decay of the stage.
    """

    kind: str = ""
    out_dim: int

    def __init__(
        self,
        labels: Sequence[str] = (),
        multi_label: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.labels = tuple(labels)
        self.multi_label = multi_label
        self.lr = lr
        self.weight_decay = weight_decay
        self.head: nn.Linear | None = None

    def _make_head(self) -> None:
        if self.labels:
            self.head = nn.Linear(self.out_dim, len(self.labels))

    def dummy_input(self) -> Tensor:
        """One all-zero item this encoder accepts (``[1, ...]``, on its device).

        Under data parallelism every rank runs every encoder at every step, on this when it has no item
        of the kind, so that sharded (FSDP) ranks run the same collectives (see ``Policy.prompt_embeds``).
        """
        raise NotImplementedError(f"{type(self).__name__} does not define dummy_input()")

    def _zeros(self, *shape: int) -> Tensor:
        param = next(self.parameters(), None)
        return torch.zeros(shape, device=param.device if param is not None else None)

    def classify(self, x: Tensor) -> Tensor:
        """Logits ``[M, C]`` of the stage's linear head on the mean token."""
        if self.head is None:
            raise RuntimeError(f"{type(self).__name__} has no classification head: pass `labels`")
        return self.head(self(x).mean(dim=1))

    def _items_and_targets(self, batch: PromptBatch) -> tuple[Tensor, Tensor] | None:
        """This kind's items ``[M, ...]`` and their targets (``[M]`` class ids or ``[M, C]`` multi-hot)."""
        items = batch.modalities.get(self.kind)
        if items is None or len(items.values) == 0:
            return None
        index = {label.strip().lower(): i for i, label in enumerate(self.labels)}
        rows = []
        for p in items.owner.tolist():
            answer = batch.targets[p].answer
            if not self.multi_label and len(answer) != 1:
                raise ValueError(
                    f"record {batch.ids[p]!r}: {len(answer)} answers {answer} for a single-label "
                    f"{type(self).__name__} (set multi_label=true)"
                )
            unknown = [a for a in answer if a.strip().lower() not in index]
            if unknown:
                raise ValueError(
                    f"record {batch.ids[p]!r}: answer {unknown} not in "
                    f"{type(self).__name__}.labels {self.labels}"
                )
            rows.append([index[a.strip().lower()] for a in answer])
        device = items.values.device
        if self.multi_label:
            target = torch.zeros(len(rows), len(self.labels), device=device)  # [M, C]
            for m, ids in enumerate(rows):
                target[m, ids] = 1.0
        else:
            target = torch.tensor([ids[0] for ids in rows], device=device)  # [M]
        return items.values, target

    def _step(self, batch: PromptBatch, stage: str) -> Tensor | None:
        if self.head is None:
            raise RuntimeError(f"{type(self).__name__}: the classification stage needs `labels`")
        got = self._items_and_targets(batch)
        if got is None:  # no item of this kind in the batch: skip it
            return None
        values, target = got
        logits = self.classify(values)  # [M, C]
        if self.multi_label:
            loss = F.binary_cross_entropy_with_logits(logits, target)
            acc = ((logits > 0).float() == target).float().mean()
        else:
            loss = F.cross_entropy(logits, target)
            acc = (logits.argmax(-1) == target).float().mean()
        m = len(values)
        self.log(f"{stage}/loss", loss, batch_size=m, prog_bar=True)
        self.log(f"{stage}/acc", acc, batch_size=m)
        return loss

    def training_step(self, batch: PromptBatch, batch_idx: int) -> Tensor | None:
        """Supervised classification loss of this kind's items against their prompts' answers."""
        return self._step(batch, "train")

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        """Logs ``val/loss`` and ``val/acc`` (label-wise accuracy for multi-label)."""
        self._step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters."""
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


class VisionEncoder(ModalityEncoder):
    """A 2-D image encoder: a timm backbone (random init or local weights) or any wrapped vision tower.

    Inputs are ``[M, 3, h, w]`` in [0, 1] (a single channel is repeated); they are resized to ``image_size``
    when needed and normalised with the backbone's mean/std inside. The tokens are the backbone's final
    patch tokens: class / register (prefix) tokens are dropped, CNN feature maps are flattened row-major.

    Args:
        backbone: a timm model name, built with ``pretrained=False, num_classes=0`` (no download), or an
            ``nn.Module`` to wrap (e.g. a VLM's own vision tower or an HF ``SiglipVisionModel``) that maps
            ``[M, 3, h, w]`` to ``[M, T, D]`` (a tensor, or an output with ``last_hidden_state``).
        image_size: input side in pixels.
        backbone_kwargs: extra timm arguments (e.g. ``depth``, ``embed_dim``, ``num_heads``, ``patch_size``).
        checkpoint: local weights for the backbone, loaded in ``configure_model`` (timm format, or a
            checkpoint of this encoder's own stage).
        out_dim: token width; inferred from the backbone when None.
        mean: per-channel input mean; None uses the timm model's default (ImageNet for a wrapped module).
        std: per-channel input std; None as for ``mean``.
        **stage: the classification stage (:class:`ModalityEncoder`: ``labels``, ``multi_label``, ``lr``,
            ``weight_decay``).
    """

    kind = "image"

    def __init__(
        self,
        backbone: str | nn.Module = "vit_tiny_patch16_224",
        image_size: int = 64,
        backbone_kwargs: dict[str, Any] | None = None,
        checkpoint: str | None = None,
        out_dim: int | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        **stage: Any,
    ) -> None:
        super().__init__(**stage)
        self.image_size = image_size
        self.checkpoint = checkpoint
        self._loaded = checkpoint is None
        if isinstance(backbone, str):
            self.backbone = _create_timm(backbone, image_size, backbone_kwargs or {})
            cfg = getattr(self.backbone, "pretrained_cfg", {}) or {}
            mean = mean or cfg.get("mean")
            std = std or cfg.get("std")
        else:
            self.backbone = backbone
        self.out_dim = out_dim or _infer_width(self.backbone)
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        self.register_buffer(
            "mean", torch.tensor(mean or IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std or IMAGENET_DEFAULT_STD).view(1, 3, 1, 1), persistent=False
        )
        self._make_head()

    def configure_model(self) -> None:
        """Load ``checkpoint`` into the backbone (once)."""
        if self._loaded:
            return
        filter_fn = getattr(sys.modules.get(type(self.backbone).__module__), "checkpoint_filter_fn", None)
        load_weights(self.backbone, self.checkpoint, prefix="backbone.", filter_fn=filter_fn)
        self._loaded = True

    def dummy_input(self) -> Tensor:
        """One all-zero image ``[1, 3, image_size, image_size]``."""
        return self._zeros(1, 3, self.image_size, self.image_size)

    def forward(self, x: Tensor) -> Tensor:
        """Encode images.

        Args:
            x: ``[M, 3, h, w]`` (or ``[M, 1, h, w]``) in [0, 1].

        Returns:
            Patch tokens ``[M, T, out_dim]``.
        """
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"VisionEncoder expects images [M, 3, h, w], got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        x = ((x - self.mean) / self.std).to(self.mean.dtype)
        if hasattr(self.backbone, "forward_features"):  # timm
            feats = self.backbone.forward_features(x)
            if feats.ndim == 4:  # CNN feature map [M, D, h', w']
                return feats.flatten(2).transpose(1, 2)
            return feats[:, getattr(self.backbone, "num_prefix_tokens", 0) :]  # [M, T, D]
        out = self.backbone(x)
        if not isinstance(out, Tensor):
            out = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return out  # [M, T, D]


def _create_timm(name: str, image_size: int, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=False, num_classes=0, img_size=image_size, **kwargs)
    except TypeError as err:  # CNNs take any input size and have no img_size argument
        if "img_size" not in str(err):
            raise
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


def _infer_width(module: nn.Module) -> int:
    for attr in ("num_features", "embed_dim", "hidden_size"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    config = getattr(module, "config", None)
    if isinstance(getattr(config, "hidden_size", None), int):
        return config.hidden_size
    raise ValueError(f"cannot infer the token width of {type(module).__name__}: pass `out_dim`")


class VolumeEncoder(ModalityEncoder):
    """A 3-D volume / cine encoder: every frame through a 2-D :class:`VisionEncoder`, then frame tokens.

    Each frame's patch tokens are average-pooled to ``tokens_per_frame`` tokens and get a learned frame
    position embedding (linearly resampled when a volume has a different frame count than ``num_frames``).

    Args:
        frame_encoder: the 2-D encoder applied to every frame (shared weights).
        num_frames: the frame count the position embedding is laid out for.
        tokens_per_frame: tokens kept per frame.
        **stage: the classification stage (:class:`ModalityEncoder`: ``labels``, ``multi_label``, ``lr``,
            ``weight_decay``).
    """

    kind = "video"

    def __init__(
        self,
        frame_encoder: VisionEncoder,
        num_frames: int = 8,
        tokens_per_frame: int = 1,
        **stage: Any,
    ) -> None:
        super().__init__(**stage)
        self.frame_encoder = frame_encoder
        self.num_frames = num_frames
        self.tokens_per_frame = tokens_per_frame
        self.out_dim = frame_encoder.out_dim
        self.frame_pos = nn.Parameter(torch.zeros(num_frames, self.out_dim))  # [F0, D]
        nn.init.trunc_normal_(self.frame_pos, std=0.02)
        self._make_head()

    def configure_model(self) -> None:
        """Load the frame encoder's checkpoint, if any."""
        self.frame_encoder.configure_model()

    def dummy_input(self) -> Tensor:
        """One all-zero volume ``[1, num_frames, 3, s, s]``."""
        side = self.frame_encoder.image_size
        return self._zeros(1, self.num_frames, 3, side, side)

    def forward(self, x: Tensor) -> Tensor:
        """Encode volumes.

        Args:
            x: ``[M, F, 3, h, w]`` frames in [0, 1].

        Returns:
            ``[M, F * tokens_per_frame, out_dim]``, frame-major.
        """
        if x.ndim != 5:
            raise ValueError(f"VolumeEncoder expects frames [M, F, 3, h, w], got {tuple(x.shape)}")
        m, f = x.shape[:2]
        tokens = self.frame_encoder(x.flatten(0, 1))  # [M*F, T, D]
        tokens = F.adaptive_avg_pool1d(tokens.transpose(1, 2), self.tokens_per_frame).transpose(1, 2)
        pos = self.frame_pos
        if f != self.num_frames:
            pos = F.interpolate(pos.T[None], size=f, mode="linear", align_corners=True)[0].T  # [F, D]
        tokens = tokens.view(m, f, self.tokens_per_frame, -1) + pos[None, :, None, :]
        return tokens.flatten(1, 2)  # [M, F*k, D]


class ECGEncoder(ModalityEncoder):
    """A small ECG transformer: non-overlapping Conv1d patches over all leads, then a pre-norm encoder.

    QoQ-Med fed 8 leads (I, II, V1-V6) x 2500 samples (10 s at 250 Hz) to an ECG-JEPA encoder; this encoder
    has the same interface, at a size that trains on a CPU. Inputs are millivolts, used unscaled.

    Args:
        leads: input leads.
        samples: samples per lead (a multiple of ``patch_size``).
        patch_size: samples per token.
        dim: token width.
        depth: transformer layers.
        heads: attention heads.
        mlp_ratio: feed-forward width / ``dim``.
        dropout: dropout inside the transformer.
        checkpoint: local weights of this encoder (e.g. its own stage's checkpoint), loaded in
            ``configure_model``.
        **stage: the classification stage (:class:`ModalityEncoder`: ``labels``, ``multi_label``, ``lr``,
            ``weight_decay``).
    """

    kind = "ecg"

    def __init__(
        self,
        leads: int = 8,
        samples: int = 2500,
        patch_size: int = 50,
        dim: int = 64,
        depth: int = 2,
        heads: int = 2,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
        checkpoint: str | None = None,
        **stage: Any,
    ) -> None:
        super().__init__(**stage)
        if samples % patch_size:
            raise ValueError(f"ECGEncoder: samples={samples} is not a multiple of patch_size={patch_size}")
        self.leads, self.samples, self.patch_size = leads, samples, patch_size
        self.checkpoint = checkpoint
        self._loaded = checkpoint is None
        self.out_dim = dim
        self.patch_embed = nn.Conv1d(leads, dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, samples // patch_size, dim))  # [1, T, D]
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, int(dim * mlp_ratio), dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self._make_head()

    def configure_model(self) -> None:
        """Load ``checkpoint`` (once)."""
        if not self._loaded:
            load_weights(self, self.checkpoint)
            self._loaded = True

    def dummy_input(self) -> Tensor:
        """One all-zero recording ``[1, leads, samples]``."""
        return self._zeros(1, self.leads, self.samples)

    def forward(self, x: Tensor) -> Tensor:
        """Encode ECGs.

        Args:
            x: ``[M, leads, samples]`` in millivolts.

        Returns:
            ``[M, samples / patch_size, dim]``.
        """
        if x.ndim != 3 or tuple(x.shape[1:]) != (self.leads, self.samples):
            raise ValueError(
                f"ECGEncoder expects [M, {self.leads}, {self.samples}] (leads, samples), got {tuple(x.shape)}"
            )
        tokens = self.patch_embed(x.to(self.pos_embed.dtype)).transpose(1, 2) + self.pos_embed  # [M, T, D]
        return self.norm(self.blocks(tokens))
