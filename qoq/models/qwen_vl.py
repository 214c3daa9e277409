"""The paper's policy: Qwen2.5-VL, its vision tower as qoq's image encoder and its merger as the projector.

QoQ-Med-7B / 32B are Qwen2.5-VL-Instruct models fine-tuned end to end, with an ECG encoder whose
mean-pooled token goes through a Linear layer into the LM. Here a Qwen2.5-VL checkpoint (random and tiny
for tests, or local weights) is split into the three parts qoq's :class:`~qoq.models.Policy` composes:

- the **language model**: Qwen2.5-VL's decoder as a ``Qwen2ForCausalLM`` (the same weights; the layers only
  differ by multimodal RoPE, see below), so HF ``generate`` and vLLM run it from prompt embeddings
  exactly as any other qoq LM, LoRA / QLoRA / FSDP included;
- :class:`QwenVisionEncoder` (images, and videos / volumes): the vision tower (patch embedding, window /
  full attention blocks) on Qwen's own pre-processing (resize to a multiple of 28, CLIP normalisation,
  14-pixel patches, frames grouped two by two, an image repeated); its tokens come out grouped by 2 x 2
  merge unit, ``[M, units, 4 * vision_hidden]``, in (time, row, column) order;
- :class:`QwenVLProjector`: Qwen's patch merger (LayerNorm + MLP, ``4 * vision_hidden -> LM hidden``) for
  images, and the paper's ECG branch (mean-pool to one token, one Linear) for ``ecg``.

Encoder + projector reproduce the tower's own merged output exactly (``visual(...).pooler_output``).

**Positions.** Native Qwen2.5-VL gives image tokens 3-D (time, row, column) rotary positions (M-RoPE) and
continues the text after an image from the largest of them. qoq's prompts are embeddings with one 1-D
position per token (what vLLM's ``prompt_embeds`` input gives too), so trainer and rollout engine agree
exactly, but image tokens (and the text after them) sit at other positions than in native Qwen2.5-VL
inference. With 1-D positions equal in all three M-RoPE sections, the VL decoder equals the Qwen2 decoder,
which is why the split is exact. Fine-tuning adapts to the 1-D layout; the difference matters when the
released weights are evaluated without fine-tuning (see docs/SCALING.md for the measured size).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qoq.models.builders import (
    BuiltLM,
    LMBuilder,
    _dtype,
    local_folder,
    padded,
    quantized_copy,
    runtime_tokenizer,
    seeded_model,
)
from qoq.models.encoders import ECGEncoder, ModalityEncoder
from qoq.models.policy import Policy, PolicyOptions
from qoq.models.projector import FusionProjector
from qoq.types import PromptBatch

#: Qwen2-VL / 2.5-VL image normalisation (OpenAI CLIP statistics).
QWEN_MEAN = (0.48145466, 0.4578275, 0.40821073)
QWEN_STD = (0.26862954, 0.26130258, 0.27577711)


def _split_language_model(model: nn.Module) -> nn.Module:
    """Qwen2.5-VL's decoder and LM head as a ``Qwen2ForCausalLM`` holding the same tensors (no copy)."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    text = model.config.get_text_config()
    rope = {k: v for k, v in (text.rope_parameters or {}).items() if k != "mrope_section"}
    config = Qwen2Config(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads,
        hidden_act=text.hidden_act,
        max_position_embeddings=text.max_position_embeddings,
        rms_norm_eps=text.rms_norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=model.config.tie_word_embeddings,
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
        pad_token_id=text.pad_token_id,
    )
    with torch.device("meta"):
        lm = Qwen2ForCausalLM(config)
    state = {f"model.{k}": v for k, v in model.model.language_model.state_dict().items()}
    state["lm_head.weight"] = model.lm_head.weight
    lm.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        lm.tie_weights()
    lm.model.rotary_emb = type(lm.model.rotary_emb)(config=config)  # its buffers are not in the state dict
    left = [n for n, t in [*lm.named_parameters(), *lm.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"Qwen2.5-VL -> Qwen2 split left tensors unset: {left[:5]}")
    lm.generation_config = getattr(model, "generation_config", None) or GenerationConfig()
    return lm.to(model.lm_head.weight.dtype)


class _MergeUnits(nn.Module):
    """Stands in for the tower's merger: groups each 2 x 2 merge unit's tokens, ``[S, D] -> [S/4, 4D]``."""

    def __init__(self, unit: int) -> None:
        super().__init__()
        self.unit = unit

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(-1, self.unit * x.shape[-1])


class Qwen2_5_VLBuilder(LMBuilder):
    """Base of the Qwen2.5-VL builders: ``build`` returns the language model and keeps the vision parts.

    After :meth:`build`, :meth:`take_vision` hands the vision tower (its merger replaced by a token grouping)
    and the merger to the policy's encoder and projector, once.
    """

    def __init__(self) -> None:
        self._vision: tuple[nn.Module, nn.Module] | None = None

    def vl_config(self) -> Any:
        """The ``Qwen2_5_VLConfig`` (cheap: no weights)."""
        raise NotImplementedError

    def _load(self, quantization_config: Any | None) -> tuple[nn.Module, Any]:
        raise NotImplementedError

    def build(self, quantization_config: Any | None = None) -> BuiltLM:
        """Create / load the Qwen2.5-VL model and split it (see the module docs).

        Args:
            quantization_config: a ``BitsAndBytesConfig`` for the language model, or None (the vision parts
                stay unquantized).

        Returns:
            ``(Qwen2ForCausalLM, tokenizer)`` in eval mode.
        """
        model, tokenizer = self._load(None)
        visual = model.model.visual
        merger = visual.merger
        visual.merger = _MergeUnits(visual.spatial_merge_unit)
        lm = _split_language_model(model)
        if quantization_config is not None:
            lm = quantized_copy(lm, quantization_config)
        self._vision = (visual.eval(), merger.eval())
        return lm.eval(), tokenizer

    def take_vision(self) -> tuple[nn.Module, nn.Module]:
        """``(tower, merger)`` of the last :meth:`build` (then forgotten here: the policy owns them).

        Raises:
            RuntimeError: before ``build`` or when already taken.
        """
        if self._vision is None:
            raise RuntimeError(f"{type(self).__name__}: build() first (the vision parts come with the LM)")
        vision, self._vision = self._vision, None
        return vision


class TinyQwen2_5_VL(Qwen2_5_VLBuilder):
    """A random-init tiny Qwen2.5-VL with the offline run-time tokenizer (tests, CPU demos).

    Args:
        hidden_size: LM width.
        num_layers: LM decoder layers.
        num_heads: LM attention heads.
        num_kv_heads: LM key/value heads.
        vision_hidden_size: vision tower width.
        vision_depth: vision blocks.
        vision_heads: vision attention heads.
        vocab_size: target size of the run-time tokenizer.
        dtype: parameter dtype.
        seed: seed of the weights and of the tokenizer corpus.
    """

    def __init__(
        self,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 2,
        num_kv_heads: int = 1,
        vision_hidden_size: int = 32,
        vision_depth: int = 2,
        vision_heads: int = 2,
        vocab_size: int = 512,
        dtype: str = "float32",
        seed: int = 0,
    ) -> None:
        super().__init__()
        _dtype(dtype)
        head_dim = hidden_size // num_heads
        if hidden_size % num_heads or head_dim < 32 or head_dim % 8:  # >= 32: vLLM's CPU attention
            raise ValueError(
                f"hidden_size={hidden_size} / num_heads={num_heads}: head_dim must be a multiple of 8, >= 32"
            )
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.num_layers, self.vision_depth = num_layers, vision_depth
        self.vision_hidden_size, self.vision_heads = vision_hidden_size, vision_heads
        self.vocab_size, self.dtype, self.seed = vocab_size, dtype, seed
        self._vocab: int | None = None

    def vl_config(self, token_ids: dict[str, int] | None = None) -> Any:
        """The ``Qwen2_5_VLConfig`` (offline, no download; the vocabulary is the tokenizer's once built).

        The text M-RoPE sections must sum to ``head_dim / 2``: they are split 1/4, 3/8, 3/8 as in the real
        models (16, 24, 24 for head_dim 128). The last vision block uses full attention, the others windows.

        Args:
            token_ids: ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` of the tokenizer (the defaults
                are the real Qwen vocabulary's).
        """
        from transformers import Qwen2_5_VLConfig

        half = self.hidden_size // self.num_heads // 2
        section = [half // 4, (half - half // 4) // 2]
        section.append(half - sum(section))
        text = {
            "vocab_size": self._vocab or self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": 3 * self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": section},
            "tie_word_embeddings": True,
            **(token_ids or {}),
        }
        vision = {
            "depth": self.vision_depth,
            "hidden_size": self.vision_hidden_size,
            "intermediate_size": 2 * self.vision_hidden_size,
            "num_heads": self.vision_heads,
            "out_hidden_size": self.hidden_size,
            "fullatt_block_indexes": [self.vision_depth - 1],
        }
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)

    def _load(self, quantization_config: Any | None) -> tuple[nn.Module, Any]:
        from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

        tokenizer, eos = runtime_tokenizer(self.vocab_size, seed=self.seed)
        self._vocab = len(tokenizer)
        config = self.vl_config(
            {
                "bos_token_id": tokenizer.eos_token_id,
                "eos_token_id": eos[0],
                "pad_token_id": tokenizer.pad_token_id,
            }
        )
        model = seeded_model(Qwen2_5_VLForConditionalGeneration, config, self.seed, self.dtype)
        model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        return model, tokenizer


class PretrainedQwen2_5_VL(Qwen2_5_VLBuilder):
    """Qwen2.5-VL weights from a local HF folder: Qwen2.5-VL-7B/32B-Instruct or the released QoQ-Med-VL.

    Nothing is downloaded (``local_files_only``). The released checkpoints (e.g. ``ddvd233/QoQ-Med-VL-7B``)
    are HF Qwen2.5-VL folders: fetch them on a machine with network access and point ``path`` at the copy.

    Args:
        path: the model folder (``config.json``, safetensors, tokenizer files).
        dtype: parameter dtype.
        attn_implementation: HF attention kernel ("sdpa", "flash_attention_2", "eager").
    """

    def __init__(self, path: str, dtype: str = "bfloat16", attn_implementation: str = "sdpa") -> None:
        super().__init__()
        _dtype(dtype)
        self.path, self.dtype, self.attn_implementation = path, dtype, attn_implementation

    def vl_config(self) -> Any:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(local_folder(self, self.path), local_files_only=True)

    def _load(self, quantization_config: Any | None) -> tuple[nn.Module, Any]:
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        folder = local_folder(self, self.path)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            folder,
            dtype=_dtype(self.dtype),
            attn_implementation=self.attn_implementation,
            local_files_only=True,
        )
        return model, padded(AutoTokenizer.from_pretrained(folder, local_files_only=True))


class QwenVisionEncoder(ModalityEncoder):
    """Qwen2.5-VL's vision tower as a qoq image encoder: ``[M, 3, h, w] -> [M, units, 4 * vision_hidden]``.

    Its weights come from the policy's Qwen2.5-VL builder when the policy is built (:meth:`attach`).
    Images are resized to ``image_size`` (a multiple of 28), normalised with Qwen's statistics and cut into
    14-pixel patches repeated over the temporal patch, as Qwen's image processor does.

    Args:
        vision_hidden_size: the tower's width.
        image_size: side the images are resized to (multiple of ``patch_size * spatial_merge_size``).
        patch_size: the tower's patch side.
        spatial_merge_size: side of a merge unit, in patches.
        temporal_patch_size: frames per patch (a still image is repeated).
    """

    kind = "image"

    def __init__(
        self,
        vision_hidden_size: int,
        image_size: int = 56,
        patch_size: int = 14,
        spatial_merge_size: int = 2,
        temporal_patch_size: int = 2,
    ) -> None:
        super().__init__()
        step = patch_size * spatial_merge_size
        if image_size % step:
            raise ValueError(f"QwenVisionEncoder: image_size={image_size} must be a multiple of {step}")
        self.image_size, self.patch_size = image_size, patch_size
        self.merge, self.temporal = spatial_merge_size, temporal_patch_size
        self.out_dim = vision_hidden_size * spatial_merge_size**2
        self.tower: nn.Module | None = None
        self.register_buffer("mean", torch.tensor(QWEN_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(QWEN_STD).view(1, 3, 1, 1), persistent=False)

    def attach(self, tower: nn.Module) -> None:
        """Take the vision tower (its merger already replaced by the unit grouping)."""
        self.tower = tower

    @property
    def grid(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    def patchify(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """Qwen's patches of normalised frames ``[M, F, 3, S, S]`` (an image is ``F = 1``).

        Frames are grouped ``temporal_patch_size`` at a time (an image, or a video's last group, is padded by
        repeating its last frame), as Qwen's image and video processors do.

        Returns:
            ``patches [M * t * grid^2, 3 * T * p * p]`` in merge-unit order, and ``grid_thw [M, 3]``.
        """
        m, f, c = frames.shape[:3]
        g, mg, p, t = self.grid, self.grid // self.merge, self.patch_size, self.temporal
        if f % t:
            frames = torch.cat([frames, frames[:, -1:].expand(m, t - f % t, c, -1, -1)], dim=1)
        gt = frames.shape[1] // t
        patches = frames.reshape(m, gt, t, c, mg, self.merge, p, mg, self.merge, p)
        patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)  # [M, gt, gh, gw, mh, mw, C, T, p, p]
        grid_thw = torch.tensor([[gt, g, g]] * m, device=frames.device)
        return patches.reshape(m * gt * g * g, c * t * p * p), grid_thw

    def dummy_input(self) -> Tensor:
        """One all-zero image ``[1, 3, image_size, image_size]``."""
        return self._zeros(1, 3, self.image_size, self.image_size)

    def forward(self, x: Tensor) -> Tensor:
        """Encode images ``[M, 3 | 1, h, w]`` or videos / volumes ``[M, F, 3 | 1, h, w]`` in [0, 1].

        Returns:
            Merge-unit tokens ``[M, units, out_dim]``: ``(S / 28)^2`` per image, times ``ceil(F / 2)`` per
            video, in (time, row, column) order.
        """
        if self.tower is None:
            raise RuntimeError("QwenVisionEncoder has no tower yet: build the policy first")
        if x.ndim not in (4, 5) or x.shape[-3] not in (1, 3):
            raise ValueError(
                f"QwenVisionEncoder expects [M, 3, h, w] or [M, F, 3, h, w], got {tuple(x.shape)}"
            )
        frames = x[:, None] if x.ndim == 4 else x  # [M, F, C, h, w]
        m, f = frames.shape[:2]
        frames = frames.flatten(0, 1)
        frames = frames.expand(-1, 3, -1, -1) if frames.shape[1] == 1 else frames
        if tuple(frames.shape[-2:]) != (self.image_size, self.image_size):
            size = (self.image_size, self.image_size)
            frames = F.interpolate(frames.float(), size=size, mode="bicubic", align_corners=False)
        frames = (frames - self.mean) / self.std
        dtype = next(self.tower.parameters()).dtype
        patches, grid_thw = self.patchify(frames.to(dtype).unflatten(0, (m, f)))
        units = self.tower(patches, grid_thw=grid_thw).pooler_output  # [M * units, out_dim], raster order
        return units.reshape(m, -1, self.out_dim)


class _Merger(nn.Module):
    """Qwen's patch merger on grouped units ``[M, U, 4D] -> [M, U, H]`` (RMSNorm per patch, then MLP)."""

    def __init__(self, merger: nn.Module) -> None:
        super().__init__()
        self.ln_q, self.mlp = merger.ln_q, merger.mlp

    def forward(self, x: Tensor) -> Tensor:
        d = self.ln_q.weight.shape[0]
        return self.mlp(self.ln_q(x.unflatten(-1, (-1, d))).flatten(-2))


class QwenVLProjector(FusionProjector):
    """Images through Qwen2.5-VL's merger, ECG through the paper's branch (one token, one Linear).

    Args:
        image_dim: merge-unit width, ``4 * vision_hidden``.
        hidden_size: the LM's hidden size.
        ecg_dim: the ECG encoder's token width; None: no ECG branch.
    """

    def __init__(self, image_dim: int, hidden_size: int, ecg_dim: int | None = None) -> None:
        dims = {"image": image_dim} | ({"ecg": ecg_dim} if ecg_dim else {})
        tokens = {"image": None} | ({"ecg": 1} if ecg_dim else {})
        super().__init__(dims, hidden_size, tokens_per_item=tokens, depth=1)
        self.mlps["image"] = nn.Identity()  # replaced by the merger in attach()

    def attach(self, merger: nn.Module) -> None:
        """Take the tower's merger as the image projection."""
        self.mlps["image"] = _Merger(merger)

    def forward(self, kind: str, tokens: Tensor) -> Tensor:
        """Project ``[M, T, D_kind]`` tokens of one kind to ``[M, T', hidden_size]``."""
        if kind == "image":
            merger = self.mlps["image"]
            if not isinstance(merger, _Merger):
                raise RuntimeError("QwenVLProjector has no merger yet: build the policy first")
            return merger(tokens.to(merger.mlp[0].weight.dtype))
        return super().forward(kind, tokens)


class QwenVLPolicy(Policy):
    """A :class:`~qoq.models.Policy` on Qwen2.5-VL: its tower and merger for images, an ECG encoder + Linear.

    Image placeholders are wrapped in ``<|vision_start|> ... <|vision_end|>`` when the tokenizer has them
    (the real Qwen tokenizer), as Qwen's chat template does.

    Args:
        lm: a Qwen2.5-VL builder (:class:`TinyQwen2_5_VL`, :class:`PretrainedQwen2_5_VL`).
        ecg: the ECG encoder (the paper: ECG-JEPA, 8 leads x 2500 samples); None: images and text only.
        image_size: image side fed to the tower (multiple of 28; 28 * 28 pixels per LM token).
        options: LoRA, quantization ("8bit" / "4bit" for the LM; the vision parts stay unquantized),
            freezing ("lm", "encoders", "encoders.image", "encoders.ecg", "projector"), system prompt, the SFT
            stage's optimizer, prompt limits (:class:`~qoq.models.policy.PolicyOptions`).
    """

    def __init__(
        self,
        lm: Qwen2_5_VLBuilder,
        ecg: ECGEncoder | None = None,
        image_size: int = 448,
        options: PolicyOptions | None = None,
    ) -> None:
        config = lm.vl_config()
        vision = config.vision_config
        hidden = config.get_text_config().hidden_size
        encoders: dict[str, ModalityEncoder] = {
            "image": QwenVisionEncoder(
                vision.hidden_size,
                image_size=image_size,
                patch_size=vision.patch_size,
                spatial_merge_size=vision.spatial_merge_size,
                temporal_patch_size=vision.temporal_patch_size,
            )
        }
        if ecg is not None:
            encoders["ecg"] = ecg
        projector = QwenVLProjector(
            encoders["image"].out_dim, hidden, ecg.out_dim if ecg is not None else None
        )
        super().__init__(lm, encoders=encoders, projector=projector, options=options)

    def configure_model(self) -> None:
        """Build the LM, hand the tower to the image encoder and the merger to the projector, then freeze."""
        if self.language_model is not None:
            return
        super().configure_model()
        tower, merger = self.lm_builder.take_vision()
        self.encoders["image"].attach(tower)
        self.projector.attach(merger)
        self._apply_freeze()
        self.train(self.training)

    def _encoder_paths(self) -> list[tuple[str, str, str]]:
        """As :class:`~qoq.models.Policy`, with videos / volumes through the vision tower and merger too."""
        paths = super()._encoder_paths()
        if "video" not in self.encoders:
            paths.append(("video", "image", "image"))
        return paths

    def chat_texts(self, texts: Sequence[str]) -> list[str]:
        """Chat-format messages; ``<image>`` / ``<video>`` wrapped in Qwen's vision markers when the
        tokenizer has them (the real Qwen tokenizer)."""
        tok = self.tokenizer
        start, end = "<|vision_start|>", "<|vision_end|>"
        if all(t in tok.get_vocab() for t in (start, end)):
            for placeholder in ("<image>", "<video>"):
                texts = [t.replace(placeholder, f"{start}{placeholder}{end}") for t in texts]
        return super().chat_texts(texts)


def tiny_qwen_vl_policy(ecg: bool = True, image_size: int = 56, seed: int = 0, **options: Any) -> QwenVLPolicy:
    """A tiny random Qwen2.5-VL policy (< 1M parameters) with a small ECG encoder, for tests.

    Args:
        ecg: add an 8-lead x 2500-sample ECG encoder (mean-pooled to one token, one Linear).
        image_size: image side (multiple of 28).
        seed: seed of the weights.
        **options: :class:`~qoq.models.policy.PolicyOptions` (``lora``, ``quantization``, ...).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = ECGEncoder(leads=8, samples=2500, patch_size=50, dim=32, depth=1, heads=1) if ecg else None
    lm = TinyQwen2_5_VL(seed=seed)
    return QwenVLPolicy(lm, ecg=encoder, image_size=image_size, options=PolicyOptions(**options))


__all__ = [
    "PretrainedQwen2_5_VL",
    "Qwen2_5_VLBuilder",
    "QwenVLPolicy",
    "QwenVLProjector",
    "QwenVisionEncoder",
    "TinyQwen2_5_VL",
    "tiny_qwen_vl_policy",
]
