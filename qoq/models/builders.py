"""Language-model builders: small objects a config selects by ``class_path``; ``build()`` -> model, tokenizer.

Constructing a builder does no work (parsing any config stays cheap); ``build()`` creates the weights. A
:class:`~qoq.models.Policy` calls ``build`` from its ``configure_model`` hook.

- :class:`TinyLM`: a random-init Qwen2 causal LM with the offline run-time tokenizer (tests, demo, CPU).
- :class:`PretrainedLM`: user weights in an HF folder on local disk (never downloaded).
- Named presets (:class:`Qwen2_5_7B_Instruct`, :class:`Qwen2_5_0_5B_Instruct`): :class:`PretrainedLM` with the
  settings of the paper's setup, still pointing at a local folder.
- :class:`SiglipVisionEncoder`: a :class:`~qoq.models.VisionEncoder` preset for a SigLIP ViT-B/16 tower.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from qoq.models.encoders import VisionEncoder

BuiltLM = tuple[PreTrainedModel, PreTrainedTokenizerBase]


class LMBuilder:
    """Base class of language-model builders (the type a :class:`~qoq.models.Policy` accepts as ``lm``).

    Subclasses keep ``__init__`` cheap and do the work in :meth:`build`.
    """

    def build(self, quantization_config: Any | None = None) -> BuiltLM:
        """Create the causal LM and its tokenizer.

        Args:
            quantization_config: a ``transformers.BitsAndBytesConfig`` to load the weights quantized, or None.

        Returns:
            ``(model, tokenizer)``: an HF ``PreTrainedModel`` with a causal-LM head, and its tokenizer (with a
            chat template and a pad token).
        """
        raise NotImplementedError


def _dtype(name: str | torch.dtype) -> torch.dtype:
    dtype = getattr(torch, name) if isinstance(name, str) else name
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={name!r} is not a floating-point torch dtype (e.g. 'float32', 'bfloat16')")
    return dtype


def runtime_tokenizer(vocab_size: int, corpus: Sequence[str] = (), seed: int = 0) -> tuple[Any, list[int]]:
    """The offline run-time tokenizer (:func:`qoq.models.build_tokenizer`) and its end ids ``[<|im_end|>, EOS]``."""
    from qoq.models.tokenizer import IM_END, build_tokenizer

    tokenizer = build_tokenizer(vocab_size, corpus, seed=seed)
    return tokenizer, [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.eos_token_id]


def seeded_model(model_class: type[PreTrainedModel], config: Any, seed: int, dtype: str) -> PreTrainedModel:
    """A random-init ``model_class(config)`` in ``dtype``, seeded by ``seed`` (the global RNG left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config).to(_dtype(dtype))


def local_folder(owner: object, path: str) -> Path:
    """``path`` as a local HF model folder (with ``config.json``); never a download.

    Raises:
        FileNotFoundError: no ``config.json`` there (the message names ``owner``'s class).
    """
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{type(owner).__name__}: no HF model folder at {str(folder)!r} (config.json missing); qoq never "
            "downloads weights - copy the checkpoint (e.g. fetched from a hub on another machine) to local disk "
            "and pass its folder as `path`"
        )
    return folder


def padded(tokenizer: Any) -> Any:
    """``tokenizer``, with EOS as its pad token when it has none."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantized_copy(model: PreTrainedModel, quantization_config: Any) -> PreTrainedModel:
    """``model`` (built in memory) reloaded through a temporary folder with bitsandbytes quantization.

    Args:
        model: an HF causal LM.
        quantization_config: a ``transformers.BitsAndBytesConfig``.
    """
    import tempfile

    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="qoq-lm-") as tmp:
        model.save_pretrained(tmp)
        return AutoModelForCausalLM.from_pretrained(
            tmp, quantization_config=quantization_config, dtype=model.dtype, local_files_only=True
        )


class TinyLM(LMBuilder):
    """A randomly initialised Qwen2 causal LM with the offline byte-level BPE tokenizer.

    The defaults give ~4.9M parameters (the demo size); unit tests use e.g. ``hidden_size=64, num_layers=2,
    num_heads=2`` (< 1M parameters). Weights are a deterministic function of the arguments. The embedding
    table has ``len(tokenizer)`` rows (``vocab_size`` is the tokenizer's target size).

    Args:
        hidden_size: model width.
        num_layers: decoder layers.
        num_heads: attention heads; ``hidden_size / num_heads`` (head_dim) must be >= 32, which vLLM's CPU
            attention requires.
        num_kv_heads: key/value heads (grouped-query attention); must divide ``num_heads``.
        intermediate_size: MLP width; None means ``3 * hidden_size``.
        vocab_size: target vocabulary size of the run-time tokenizer.
        max_position_embeddings: longest sequence (prompt + response).
        tie_word_embeddings: share the input embedding and the LM head.
        dtype: parameter dtype ("float32", "bfloat16").
        seed: seed of the weight initialisation and of the tokenizer's generated corpus.
        extra_corpus: additional tokenizer training text, or a function returning it (e.g.
            ``qoq.data.demo.tokenizer_corpus``: the demo's questions and label names).
    """

    def __init__(
        self,
        hidden_size: int = 256,
        num_layers: int = 6,
        num_heads: int = 4,
        num_kv_heads: int = 2,
        intermediate_size: int | None = None,
        vocab_size: int = 512,
        max_position_embeddings: int = 1024,
        tie_word_embeddings: bool = True,
        dtype: str = "float32",
        seed: int = 0,
        extra_corpus: Sequence[str] | Callable[[], Sequence[str]] = (),
    ) -> None:
        if hidden_size % num_heads or hidden_size // num_heads < 32:
            raise ValueError(
                f"TinyLM: hidden_size={hidden_size} / num_heads={num_heads} must be a whole head_dim >= 32 "
                "(vLLM's CPU attention rejects smaller heads)"
            )
        if num_heads % num_kv_heads:
            raise ValueError(f"TinyLM: num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
        _dtype(dtype)
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.intermediate_size = intermediate_size or 3 * hidden_size
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.tie_word_embeddings = tie_word_embeddings
        self.dtype = dtype
        self.seed = seed
        self.extra_corpus = extra_corpus if callable(extra_corpus) else tuple(extra_corpus)

    def build(self, quantization_config: Any | None = None) -> BuiltLM:
        """Train the tokenizer and create the random-init ``Qwen2ForCausalLM``.

        Args:
            quantization_config: a ``transformers.BitsAndBytesConfig``; the random weights then go through a
                temporary ``save_pretrained`` folder and are reloaded quantized (cheap at this size).

        Returns:
            ``(model, tokenizer)``, the model in eval mode.
        """
        from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

        corpus = self.extra_corpus() if callable(self.extra_corpus) else self.extra_corpus
        tokenizer, eos = runtime_tokenizer(self.vocab_size, corpus, self.seed)
        config = Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = seeded_model(Qwen2ForCausalLM, config, self.seed, self.dtype)
        model.generation_config = GenerationConfig(
            eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id
        )
        if quantization_config is not None:
            model = quantized_copy(model, quantization_config)
        return model.eval(), tokenizer


class PretrainedLM(LMBuilder):
    """A causal LM from an HF-format folder on local disk (``config.json``, weights, tokenizer files).

    Nothing is downloaded: the folder must exist (``local_files_only=True``).

    Args:
        path: the model folder.
        dtype: parameter dtype ("bfloat16", "float16", "float32").
        attn_implementation: HF attention kernel ("sdpa", "eager", "flash_attention_2").
        trust_remote_code: allow the folder's own modelling code (off by default).
        tokenizer_class: a transformers tokenizer class name to load the tokenizer with, e.g.
            ``PreTrainedTokenizerFast`` (the folder's ``tokenizer.json`` exactly as saved, which ``qoq export``
            picks when ``AutoTokenizer`` would rebuild it differently from the model type); None:
            ``AutoTokenizer``.
    """

    def __init__(
        self,
        path: str,
        dtype: str = "bfloat16",
        attn_implementation: str = "sdpa",
        trust_remote_code: bool = False,
        tokenizer_class: str | None = None,
    ) -> None:
        _dtype(dtype)
        self.path = path
        self.dtype = dtype
        self.attn_implementation = attn_implementation
        self.trust_remote_code = trust_remote_code
        self.tokenizer_class = tokenizer_class

    def build(self, quantization_config: Any | None = None) -> BuiltLM:
        """Load the model and tokenizer from ``path``.

        Args:
            quantization_config: a ``transformers.BitsAndBytesConfig`` or None.

        Returns:
            ``(model, tokenizer)``, the model in eval mode; a tokenizer without a pad token gets EOS as pad.

        Raises:
            FileNotFoundError: ``path`` is not an existing folder with a ``config.json``.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = local_folder(self, self.path)
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=_dtype(self.dtype),
            attn_implementation=self.attn_implementation,
            quantization_config=quantization_config,
            trust_remote_code=self.trust_remote_code,
            local_files_only=True,
        )
        import transformers

        loader = getattr(transformers, self.tokenizer_class) if self.tokenizer_class else AutoTokenizer
        tokenizer = loader.from_pretrained(folder, local_files_only=True, trust_remote_code=self.trust_remote_code)
        return model.eval(), padded(tokenizer)


class Qwen2_5_7B_Instruct(PretrainedLM):  # noqa: N801 - the model's own name
    """Qwen2.5-7B-Instruct, the language backbone of QoQ-Med-7B (bf16, SDPA).

    Real use: full fine-tuning under FSDP on 8 x 80 GB GPUs (the paper), or LoRA (+ 4-bit) on one GPU.
    Point ``path`` at a local copy of the checkpoint (e.g. from ``huggingface-cli download`` on a machine with
    network access).

    Args:
        path: the local model folder.
        dtype: parameter dtype.
        attn_implementation: HF attention kernel ("flash_attention_2" on Ampere+ GPUs).
    """

    def __init__(self, path: str, dtype: str = "bfloat16", attn_implementation: str = "sdpa") -> None:
        super().__init__(path, dtype=dtype, attn_implementation=attn_implementation)


class Qwen2_5_0_5B_Instruct(PretrainedLM):  # noqa: N801 - the model's own name
    """Qwen2.5-0.5B-Instruct: the smallest real Qwen2.5 chat model, for single-GPU or CPU experiments.

    Args:
        path: the local model folder.
        dtype: parameter dtype.
        attn_implementation: HF attention kernel.
    """

    def __init__(self, path: str, dtype: str = "bfloat16", attn_implementation: str = "sdpa") -> None:
        super().__init__(path, dtype=dtype, attn_implementation=attn_implementation)


class SiglipVisionEncoder(VisionEncoder):
    """A SigLIP ViT-B/16 image tower (timm ``vit_base_patch16_siglip_224``), 768-dim patch tokens.

    Real use: a strong pretrained image encoder for the fusion policy. Weights come from a local timm-format
    checkpoint (e.g. the ``model.safetensors`` of ``timm/vit_base_patch16_siglip_224.webli``), loaded in
    ``configure_model``; SigLIP normalises with mean = std = 0.5.

    Args:
        checkpoint: local weights file.
        image_size: input side in pixels (the position embeddings are resampled when it is not 224).
        labels: label vocabulary of the stand-alone classification stage.
        multi_label: BCE (multi-label) instead of cross-entropy in that stage.
        lr: learning rate of that stage.
    """

    def __init__(
        self,
        checkpoint: str,
        image_size: int = 224,
        labels: tuple[str, ...] = (),
        multi_label: bool = False,
        lr: float = 1e-4,
    ) -> None:
        super().__init__(
            backbone="vit_base_patch16_siglip_224",
            image_size=image_size,
            checkpoint=checkpoint,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            labels=labels,
            multi_label=multi_label,
            lr=lr,
        )
