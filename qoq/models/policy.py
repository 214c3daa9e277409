"""The policy: an HF causal LM that reads text with modality tokens spliced in at the placeholders.

A prompt is chat-formatted (system + user turn, then the assistant header), split at ``<image>``,
``<video>`` and ``<ecg>``, and embedded piece by piece: text pieces through the LM's input embeddings, each
placeholder replaced by its item's tokens (encoder -> :class:`~qoq.models.FusionProjector`). The result,
one ``[L_i, H]`` tensor per prompt, is all a rollout engine needs (HF ``generate(inputs_embeds=...)`` or vLLM
with ``enable_prompt_embeds``), so no custom multimodal model class is required anywhere.

The policy's own training stage is SFT on ``batch.references`` (the paper's SFT baseline). For RL,
:class:`~qoq.systems.PolicyOptimization` composes it and calls :meth:`Policy.prompt_embeds`,
:meth:`Policy.response_logprobs`, :meth:`Policy.reference_mode` and :meth:`Policy.lm_weights_for_sync`.

:class:`Policy` builds and owns the parts (quantization, LoRA, freezing) and is the entry point; the work
lives beside it as functions: :mod:`qoq.models.prompts` (projection and splicing),
:mod:`qoq.models.logprobs` (response log-probabilities), :mod:`qoq.models.weights` (weights for rollout
engines: LoRA merged, bitsandbytes dequantized). Its settings are one :class:`PolicyOptions`.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from qoq.models import logprobs, prompts, weights
from qoq.models.builders import LMBuilder, TinyLM
from qoq.models.encoders import ECGEncoder, ModalityEncoder, VisionEncoder, VolumeEncoder
from qoq.models.optim import LRSchedule, OptimizerCallable, adamw, build_optimizer, check_optimizer
from qoq.models.projector import FusionProjector
from qoq.types import PLACEHOLDERS, PromptBatch

#: The response contract of QoQ-Med (see docs: rewards): reasoning, salient regions as JSON, boxed answer.
#: The system turn. The response-format instruction is not repeated here: the data layer appends
#: :data:`qoq.rl.rewards.RESPONSE_FORMAT` to every user message (one home for the prompt contract).
DEFAULT_SYSTEM_PROMPT = "You are a clinical assistant."

_ALIASES = {"lm": "language_model"}


@dataclass(frozen=True)
class PolicyOptions:
    """How a policy is built and what its own (SFT) stage does: the settings every policy class shares.

    Args:
        lora: peft ``LoraConfig`` arguments (``r``, ``alpha``, ``dropout``, ``target_modules``, ... ;
            ``alpha``/``dropout`` stand for ``lora_alpha``/``lora_dropout``); None trains the full LM.
        quantization: load the LM in "8bit" or "4bit" (bitsandbytes); its base weights are then frozen, so
            combine it with ``lora`` (QLoRA) or train only encoders/projector.
        freeze: submodules to freeze: "lm", "encoders", "encoders.<kind>", "projector".
        system_prompt: the system turn of every prompt (None: no system turn).
        optimizer: the SFT stage's optimizer, given the parameter groups (weight decay on matrices only;
            biases, norms and other 1-D params exempt), e.g. ``{class_path: torch.optim.AdamW, init_args:
            {lr: 3.0e-3, weight_decay: 0.0}}``; None: AdamW with lr 1e-5, betas (0.9, 0.999), no weight decay.
        lr_schedule: warm-up and decay of the optimizer's learning rate over the SFT stage's optimizer steps
            (e.g. ``{warmup_steps: 50, decay: cosine}``); None keeps it constant.
        max_prompt_tokens: longest allowed prompt in embeddings (text + modality tokens); longer prompts
            raise.
        share_prompts: compute response log-probs with each prompt run once and its KV cache shared by
            the responses of its group (:mod:`qoq.models.logprobs`); False runs one full
            ``[prompt ; response]`` row per response (the fallback for LMs whose cache cannot be shared).
    """

    lora: dict[str, Any] | None = None
    quantization: Literal["8bit", "4bit"] | None = None
    freeze: Sequence[str] = ()
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    optimizer: OptimizerCallable | None = None
    lr_schedule: LRSchedule | None = None
    max_prompt_tokens: int | None = None
    share_prompts: bool = True

    def __post_init__(self) -> None:
        if self.quantization not in (None, "8bit", "4bit"):
            raise ValueError(f"Policy: quantization={self.quantization!r}; use None, '8bit' or '4bit'")
        object.__setattr__(self, "lora", dict(self.lora) if self.lora else None)
        object.__setattr__(self, "freeze", tuple(self.freeze))
        problems = check_optimizer(self.optimizer, "optimizer") if self.optimizer is not None else []
        if problems:
            raise ValueError("Policy: " + "; ".join(problems))


class _Option:
    """``policy.<name>`` reads ``policy.options.<name>``: the options have one home."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, policy: Any, owner: type | None = None) -> Any:
        return self if policy is None else getattr(policy.options, self.name)

    def __set__(self, policy: Any, value: Any) -> None:
        raise AttributeError(
            f"Policy.{self.name} is read from policy.options (frozen): "
            f"policy.options = dataclasses.replace(policy.options, {self.name}=...)"
        )


class Policy(L.LightningModule):
    """A causal LM with modality encoders and a fusion projector; its own stage is SFT.

    Heavy construction (weights, quantization, LoRA wrapping, freezing) happens in :meth:`configure_model`,
    which the Trainer calls; outside a Trainer call :meth:`build` (both idempotent).

    Args:
        lm: builder of the language model and tokenizer (e.g. ``TinyLM``, ``PretrainedLM``).
        encoders: modality kind ("image", "video", "ecg") -> encoder returning ``[M, T, D]`` tokens (a
            :class:`~qoq.models.VisionEncoder` can wrap any existing vision tower).
        projector: maps encoder tokens to the LM's hidden size; required when there are encoders.
        options: LoRA, quantization, freezing, system prompt, the SFT stage's optimizer, prompt limits
            (:class:`PolicyOptions`); each is also readable as ``policy.<name>``.
    """

    lora, quantization, freeze, system_prompt = _Option(), _Option(), _Option(), _Option()
    optimizer, lr_schedule = _Option(), _Option()
    max_prompt_tokens, share_prompts = _Option(), _Option()

    def __init__(
        self,
        lm: LMBuilder,
        encoders: dict[str, ModalityEncoder] | None = None,
        projector: FusionProjector | None = None,
        options: PolicyOptions | None = None,
    ) -> None:
        super().__init__()
        encoders = dict(encoders or {})
        unknown = set(encoders) - set(PLACEHOLDERS)
        if unknown:
            raise ValueError(
                f"Policy: encoder kinds {sorted(unknown)} are not modality kinds {list(PLACEHOLDERS)}"
            )
        if encoders and projector is None:
            raise ValueError("Policy: encoders need a `projector` to reach the LM's embedding space")
        for kind, encoder in encoders.items():
            if projector is not None and kind not in projector.in_dims:
                raise ValueError(f"Policy: the projector has no projection for the {kind!r} encoder")
            out_dim = getattr(encoder, "out_dim", None)
            if projector is not None and out_dim is not None and out_dim != projector.in_dims[kind]:
                raise ValueError(
                    f"Policy: {kind!r} encoder gives {out_dim}-dim tokens, "
                    f"projector expects {projector.in_dims[kind]}"
                )
        self.lm_builder = lm
        self.encoders = nn.ModuleDict(encoders)
        self.projector = projector
        self.options = options or PolicyOptions()
        self.language_model: nn.Module | None = None
        self._tokenizer: Any = None

    @classmethod
    def tiny(cls, **kwargs: Any) -> Policy:
        """A complete tiny multimodal policy (see :func:`tiny_policy`) for tests and demos."""
        return tiny_policy(**kwargs)

    @classmethod
    def from_export(cls, directory: str | Path) -> Policy:
        """The whole policy of a ``qoq export`` folder, built (see :func:`qoq.export.load_export`)."""
        from qoq.export import load_export

        return load_export(directory)

    # ----- construction ----------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Build the LM and tokenizer, quantize, wrap with LoRA, load encoder weights, apply ``freeze``."""
        if self.language_model is not None:
            return
        from transformers import BitsAndBytesConfig

        if self.quantization is None:
            model, tokenizer = self.lm_builder.build()
        else:
            bits = {"load_in_8bit": True} if self.quantization == "8bit" else {"load_in_4bit": True}
            model, tokenizer = self.lm_builder.build(quantization_config=BitsAndBytesConfig(**bits))
            model.requires_grad_(False)  # quantized base weights are not trainable
            weights.prepare_4bit_layers(model)
        if self.lora is not None:
            from peft import LoraConfig, get_peft_model

            kwargs = dict(self.lora)
            for short, name in (("alpha", "lora_alpha"), ("dropout", "lora_dropout")):
                if short in kwargs:
                    kwargs[name] = kwargs.pop(short)
            model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **kwargs))
        self.language_model = model
        self._tokenizer = tokenizer
        if self.projector is not None and self.projector.hidden_size != self.hidden_size:
            raise ValueError(
                f"Policy: projector.hidden_size={self.projector.hidden_size} "
                f"but the LM's is {self.hidden_size}"
            )
        for encoder in self.encoders.values():
            if hasattr(encoder, "configure_model"):
                encoder.configure_model()
        self._apply_freeze()
        self.train(self.training)

    def build(self) -> Policy:
        """Construct the model outside a Trainer (same as :meth:`configure_model`); returns ``self``."""
        self.configure_model()
        return self

    def _submodule(self, name: str) -> nn.Module | None:
        try:
            return self.get_submodule(_ALIASES.get(name, name))
        except AttributeError:
            return None

    def _apply_freeze(self) -> None:
        for name in self.freeze:
            module = self._submodule(name)
            if module is None:
                raise ValueError(
                    f"Policy.freeze: no submodule {name!r} "
                    "(use 'lm', 'encoders', 'encoders.<kind>', 'projector')"
                )
            module.requires_grad_(False)

    def train(self, mode: bool = True) -> Policy:
        """Switch mode; submodules named in ``freeze`` always stay in eval mode."""
        super().train(mode)
        for name in self.freeze:
            module = self._submodule(name)
            if module is not None:
                module.eval()
        return self

    def _built(self) -> nn.Module:
        if self.language_model is None:
            raise RuntimeError("Policy is not built yet: call configure_model() or build() first")
        return self.language_model

    @property
    def lm(self) -> nn.Module:
        """The HF causal LM (a peft model when LoRA is on)."""
        return self._built()

    @property
    def tokenizer(self) -> Any:
        """The LM's tokenizer."""
        self._built()
        return self._tokenizer

    @property
    def hidden_size(self) -> int:
        """The LM's hidden size (= prompt embedding width)."""
        return self.base_model.config.get_text_config().hidden_size

    @property
    def base_model(self) -> nn.Module:
        """The HF ``PreTrainedModel`` itself (under LoRA: with the adapter layers injected)."""
        model = self._built()
        return model.get_base_model() if self.lora is not None else model

    @property
    def eos_token_ids(self) -> list[int]:
        """Token ids that end a response: ``<|im_end|>``, the tokenizer's EOS and the generation config's."""
        tok = self.tokenizer
        ids = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
        gen = getattr(self.base_model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
        unk = tok.unk_token_id
        return sorted(i for i in ids if isinstance(i, int) and i != unk)

    @property
    def suppress_token_ids(self) -> list[int]:
        """Token ids an engine must never sample.

        Every special token that is not an EOS (``<|im_start|>``, Qwen's ``<|image_pad|>`` /
        ``<|vision_start|>`` / ...: a sampled multimodal pad token breaks the next forward), plus embedding
        rows the tokenizer cannot decode (Qwen pads its embedding table beyond the vocabulary).
        """
        tok = self.tokenizer
        special = set(tok.all_special_ids)
        special |= {i for i, t in tok.added_tokens_decoder.items() if getattr(t, "special", False)}
        rows = self.base_model.get_input_embeddings().weight.shape[0]
        return sorted((special - set(self.eos_token_ids)) | set(range(len(tok), rows)))

    @property
    def stop_token_id(self) -> int:
        """The token that closes an assistant turn (``<|im_end|>``, else EOS); SFT targets end with it."""
        tok = self.tokenizer
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        return im_end if isinstance(im_end, int) and im_end != tok.unk_token_id else tok.eos_token_id

    # ----- prompts ---------------------------------------------------------------------------------------

    def chat_texts(self, texts: Sequence[str]) -> list[str]:
        """Chat-format user messages: system turn (if any), user turn, assistant header."""
        out = []
        for text in texts:
            messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            messages.append({"role": "user", "content": text})
            out.append(
                self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            )
        return out

    @property
    def lm_device(self) -> torch.device:
        """Where the LM's input embeddings live (token ids are created there)."""
        return self.lm.get_input_embeddings().weight.device

    def embed_ids(self, ids: Tensor) -> Tensor:
        """The LM's input embeddings of token ids ``[...] -> [..., H]``."""
        return self.lm.get_input_embeddings()(ids)

    def _encoder_paths(self) -> list[tuple[str, str, str]]:
        """``(item kind, encoder, projector kind)`` of every way items are encoded, in one fixed order."""
        return [(kind, kind, kind) for kind in self.encoders]

    def prompt_embeds(self, batch: PromptBatch) -> list[Tensor]:
        """Embed each prompt with its modality items spliced in at the placeholders.

        Args:
            batch: P prompts; the j-th placeholder of kind k in prompt p takes the j-th item of kind k whose
                owner is p.

        Returns:
            P tensors ``[L_i, H]`` (LM embedding dtype); gradients reach trainable encoders and projector.

        Raises:
            ValueError: a prompt's placeholders and items do not match, items of a kind have no encoder, or
                a prompt exceeds ``max_prompt_tokens``.
        """
        projected, anchor = prompts.project_items(batch, self.encoders, self.projector, self._encoder_paths())
        texts = self.chat_texts(batch.texts)
        out = prompts.splice(
            batch, texts, self.tokenizer, self.embed_ids, self.lm_device, projected, self.max_prompt_tokens
        )
        if anchor is not None:  # keeps every encoder in the graph on every rank (see prompts.project_items)
            out[0] = out[0] + anchor.to(out[0].dtype)
        return out

    # ----- log-probabilities -----------------------------------------------------------------------------

    def response_logprobs(
        self,
        prompt_embeds: Sequence[Tensor],
        response_ids: Tensor,
        response_mask: Tensor,
        prompt_index: Tensor,
        *,
        temperature: float = 1.0,
        with_entropy: bool = False,
        share_prompts: bool | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Per-token log-probabilities ``logp [N, R]`` (and ``entropy [N, R]`` or None) of responses given
        their prompts: :func:`qoq.models.logprobs.response_logprobs` on this policy's LM, sharing prompts
        unless ``share_prompts`` (default: this policy's option) says otherwise."""
        return logprobs.response_logprobs(
            self.lm,
            prompt_embeds,
            response_ids,
            response_mask,
            prompt_index,
            temperature=temperature,
            with_entropy=with_entropy,
            share_prompts=self.share_prompts if share_prompts is None else share_prompts,
        )

    # ----- reference policy ------------------------------------------------------------------------------

    @contextmanager
    def reference_mode(self) -> Iterator[Policy]:
        """Compute the reference policy inside this block: the LM with its LoRA adapters disabled.

        Only the LM changes: prompt embeddings come from the caller, so with trainable encoders or projector
        compute reference prompt embeddings from a :meth:`frozen_copy` instead.

        Raises:
            RuntimeError: without LoRA the reference needs a separate frozen copy (:meth:`frozen_copy`).
        """
        if self.lora is None:
            raise RuntimeError(
                "Policy.reference_mode needs LoRA; without it keep a reference via frozen_copy()"
            )
        with self.lm.disable_adapter():
            yield self

    def frozen_copy(self) -> Policy:
        """A deep copy in eval mode with every parameter frozen, sharing no tensor with this policy."""
        memo: dict[int, Any] = {}
        for attr in ("_trainer", "_fabric"):
            obj = getattr(self, attr, None)
            if obj is not None:
                memo[id(obj)] = None  # do not copy the Trainer along
        # The options are frozen settings, shared rather than copied: their optimizer, when LightningCLI built
        # it, is a callable that holds the CLI and through it the whole run (system, data module, engine).
        memo[id(self.options)] = self.options
        twin = copy.deepcopy(self, memo)
        twin.requires_grad_(False)
        return twin.eval()

    # ----- weights for inference engines ------------------------------------------------------------------

    def lm_weights_for_sync(self) -> Iterator[tuple[str, Tensor]]:
        """The LM's full weights under their HF names, for an inference engine (vLLM ``reload_weights``).

        With LoRA, each adapted weight is yielded merged (``W + B A * scale``, computed aside: the module is
        never merged in place); adapter tensors are left out and peft's name parts stripped. Tied weights
        appear under both names (``lm_head.weight`` too). A quantized (QLoRA) LM's 8/4-bit weights are
        yielded dequantized to the embeddings' dtype, without their quantization state
        (:func:`qoq.models.weights.lm_weights_for_sync`).
        """
        return weights.lm_weights_for_sync(
            self.base_model, lora=self.lora is not None, quantized=self.quantization is not None
        )

    def save_lm(self, directory: str | Path) -> Path:
        """Save the LM (LoRA merged) and tokenizer as an HF folder that transformers and vLLM load.

        Args:
            directory: target folder (created).

        Returns:
            The folder.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = dict(self.lm_weights_for_sync())
        base = self.base_model
        base.save_pretrained(directory, state_dict=state)
        self.tokenizer.save_pretrained(directory)
        return directory

    # ----- SFT stage -------------------------------------------------------------------------------------

    def sft_loss(self, batch: PromptBatch) -> Tensor:
        """Mean token cross-entropy of ``batch.references`` (each + the stop token) after the prompt."""
        if batch.references is None:
            raise ValueError(f"SFT needs batch.references (records {batch.ids[:3]}...)")
        tok = self.tokenizer
        targets = [
            ids + [self.stop_token_id]
            for ids in tok(list(batch.references), add_special_tokens=False)["input_ids"]
        ]
        response_ids = pad_sequence(
            [torch.tensor(t) for t in targets], batch_first=True, padding_value=tok.pad_token_id
        ).to(self.lm_device)  # [P, R]
        mask = pad_sequence([torch.ones(len(t), dtype=torch.bool) for t in targets], batch_first=True)
        mask = mask.to(self.lm_device)  # [P, R]
        embeds = self.prompt_embeds(batch)
        logp, _ = self.response_logprobs(
            embeds, response_ids, mask, torch.arange(len(batch), device=self.lm_device)
        )
        return -logp.sum() / mask.sum()

    def training_step(self, batch: PromptBatch, batch_idx: int) -> Tensor:
        """SFT: cross-entropy on the reference responses (logged as ``train/loss``)."""
        loss = self.sft_loss(batch)
        self.log("train/loss", loss, batch_size=len(batch), prog_bar=True)
        return loss

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        """Logs the SFT loss as ``val/loss``."""
        self.log("val/loss", self.sft_loss(batch), batch_size=len(batch))

    # ----- checkpoints ------------------------------------------------------------------------------------

    @property
    def tokenizer_fingerprint(self) -> str:
        """A short hash of the tokenizer's vocabulary (token -> id), saved with every checkpoint."""
        vocab = sorted(self.tokenizer.get_vocab().items())
        return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]

    def check_tokenizer(self, saved: str | None, source: str | Path) -> None:
        """Refuse weights trained with another tokenizer: their token ids would mean other tokens.

        Args:
            saved: the checkpoint's :attr:`tokenizer_fingerprint` (None: an older checkpoint, not checked).
            source: the checkpoint's path, for the message.

        Raises:
            ValueError: the fingerprints differ.
        """
        if saved is None:
            return
        self.configure_model()  # no-op when built
        if saved != self.tokenizer_fingerprint:
            raise ValueError(
                f"{source}: the checkpoint was trained with another tokenizer (fingerprint {saved}, this "
                f"policy's is {self.tokenizer_fingerprint}). Build the policy from the same config (a run-time "
                "tokenizer depends on its corpus, e.g. TinyLM's extra_corpus and qoq's version), or retrain."
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:  # noqa: D102 - Lightning hook
        checkpoint["tokenizer_fingerprint"] = self.tokenizer_fingerprint

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:  # noqa: D102 - Lightning hook
        self.check_tokenizer(checkpoint.get("tokenizer_fingerprint"), checkpoint_source(self))

    def configure_optimizers(self) -> Any:
        """The ``optimizer`` over the trainable parameters (decay on matrices only), with ``lr_schedule``."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("Policy.configure_optimizers: no trainable parameters (check `freeze`)")
        optimizer = build_optimizer(self.optimizer or adamw(), params)
        if self.lr_schedule is None:
            return optimizer
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        return {"optimizer": optimizer, "lr_scheduler": self.lr_schedule.scheduler(optimizer, total)}


def tiny_policy(
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    image_size: int = 32,
    num_frames: int = 4,
    ecg_leads: int = 8,
    ecg_samples: int = 2500,
    tokens_per_item: dict[str, int | None] | int | None = None,
    seed: int = 0,
    **options: Any,
) -> Policy:
    """A complete tiny multimodal policy: TinyLM + ViT image / volume encoders + ECG encoder + projector.

    Defaults give < 1M parameters (unit tests); ``hidden_size=256, num_layers=6, num_heads=4`` is the ~5M
    demo size. Parameters are a deterministic function of the arguments.

    Args:
        hidden_size: LM width (head_dim = hidden_size / num_heads must be >= 32).
        num_layers: LM layers.
        num_heads: LM attention heads.
        image_size: image side the vision encoders expect.
        num_frames: frames the volume encoder's position embedding is laid out for.
        ecg_leads: ECG leads.
        ecg_samples: ECG samples per lead (a multiple of 50).
        tokens_per_item: projector pooling; None means image 4, video one per frame, ECG 1 (as QoQ-Med).
        seed: seed of all initialisations.
        **options: :class:`PolicyOptions` (``lora``, ``freeze``, ``quantization``, ...).

    Returns:
        An unbuilt :class:`Policy` (call ``build()`` or let the Trainer call ``configure_model``).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = {"depth": 1, "embed_dim": 32, "num_heads": 1, "patch_size": 8, "mlp_ratio": 2.0}
        encoders: dict[str, ModalityEncoder] = {
            "image": VisionEncoder(image_size=image_size, backbone_kwargs=vit),
            "video": VolumeEncoder(
                VisionEncoder(image_size=image_size, backbone_kwargs=vit), num_frames=num_frames
            ),
            "ecg": ECGEncoder(leads=ecg_leads, samples=ecg_samples, patch_size=50, dim=32, depth=1, heads=1),
        }
        projector = FusionProjector(
            {k: e.out_dim for k, e in encoders.items()},
            hidden_size,
            tokens_per_item if tokens_per_item is not None else {"image": 4, "video": None, "ecg": 1},
        )
    lm = TinyLM(
        hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=1, seed=seed
    )
    return Policy(lm, encoders=encoders, projector=projector, options=PolicyOptions(**options))


def checkpoint_source(module: L.LightningModule) -> str:
    """The checkpoint ``module`` is being loaded from, for messages ("checkpoint" outside a Trainer)."""
    try:
        return str(module.trainer.ckpt_path or "checkpoint")
    except RuntimeError:  # not attached to a Trainer
        return "checkpoint"
