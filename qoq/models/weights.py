"""The LM's weights for inference engines: LoRA merged aside, bitsandbytes weights dequantized.

A rollout engine (vLLM ``reload_weights``, an HF folder) takes plain HF weights. A policy may hold LoRA
adapters and an 8/4-bit (bitsandbytes) base; :func:`lm_weights_for_sync` yields what the merged,
full-precision LM would hold, without merging or dequantizing the training model in place.
:func:`prepare_4bit_layers` keeps 4-bit layers in a layout that trains, syncs and checkpoints on a CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn


def lm_weights_for_sync(base: nn.Module, *, lora: bool, quantized: bool) -> Iterator[tuple[str, Tensor]]:
    """The LM's full weights under their HF names, for an inference engine.

    With LoRA, each adapted weight is yielded merged (``W + B A * scale``, computed aside: the module is
    never merged in place); adapter tensors are left out and peft's name parts stripped. Tied weights
    appear under both names (``lm_head.weight`` too). A quantized (QLoRA) LM's 8/4-bit weights are
    yielded dequantized to the embeddings' dtype, without their quantization state.

    Args:
        base: the HF ``PreTrainedModel`` (under LoRA: with the adapter layers injected).
        lora: whether ``base`` holds peft LoRA layers.
        quantized: whether ``base`` holds bitsandbytes 8/4-bit layers.
    """
    dense = dequantized_weights(base) if quantized else {}  # HF name -> [out, in]
    quant_state = tuple(f"{n.removesuffix('.weight')}.{part}" for n in dense for part in ("weight.", "SCB"))
    deltas = _lora_deltas(base) if lora else {}
    for name, tensor in base.state_dict(keep_vars=False).items():
        if "lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        if name.startswith(quant_state) or (dense and name.endswith(".weight_format")):
            continue  # bitsandbytes' quantization state of a weight yielded dequantized
        tensor = dense.get(name, tensor)
        tensor = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # FSDP2 DTensor
        if name in deltas:
            tensor = tensor + deltas[name].to(tensor.dtype)
        yield name, tensor.detach()


def _lora_deltas(base: nn.Module) -> dict[str, Tensor]:
    """HF weight name (peft's ``base_layer`` included) -> the active adapters' ``B A * scale`` of that layer."""
    from peft.tuners.lora import LoraLayer

    deltas: dict[str, Tensor] = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and not module.merged and not module.disable_adapters:
            if any(module.use_dora.get(a, False) for a in module.active_adapters):
                raise NotImplementedError("lm_weights_for_sync: DoRA adapters are not supported")
            delta = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
            if isinstance(delta, Tensor):
                deltas[f"{name}.weight"] = delta
    return deltas


def prepare_4bit_layers(model: nn.Module) -> None:
    """Make every bitsandbytes 4-bit linear layer of ``model`` safe to train, sync and checkpoint on a CPU.

    - The CPU inference repack is turned off. On a CPU with avx512_bf16, a ``Linear4bit`` forward in eval
      mode without gradients otherwise repacks its weight in place into an inference-only layout. A policy
      alternates such forwards (rollouts, sync probes) with training forwards, and the repacked layout has
      no autograd (a layer with a bias raises, one without silently drops the gradient to its input),
      cannot be dequantized for a rollout engine, and is saved with corrupted frozen weights.
    - Loading a state dict restores the quantized weight from the quantization state that the layer's own
      ``state_dict()`` writes beside it (bitsandbytes saves it but does not read it back), so a QLoRA
      checkpoint reloads strictly and exactly.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            module.register_load_state_dict_pre_hook(_load_4bit_weight)


def _load_4bit_weight(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *_: Any) -> None:
    """Load-state-dict pre-hook of a ``Linear4bit``: rebuild its weight from ``weight`` + ``weight.*``."""
    import bitsandbytes as bnb

    key = f"{prefix}weight"
    stats = {k.removeprefix(f"{key}."): state_dict.pop(k) for k in list(state_dict) if k.startswith(f"{key}.")}
    if stats and key in state_dict:
        device = module.weight.device
        module.weight = bnb.nn.Params4bit.from_prequantized(state_dict[key], stats, device=device, module=module)


def dequantized_weights(model: nn.Module) -> dict[str, Tensor]:
    """HF weight name -> dense weight ``[out, in]`` of every bitsandbytes 8/4-bit linear layer in ``model``.

    A layer whose weight is not quantized yet (bitsandbytes quantizes on the first move to a device) gives
    its weight as it is.

    Raises:
        RuntimeError: an int8 weight without its row scales, or a 4-bit weight in bitsandbytes' CPU
            inference layout.
    """
    import bitsandbytes as bnb

    dtype = model.get_input_embeddings().weight.dtype
    out = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, bnb.nn.Linear4bit) and getattr(weight, "quant_state", None) is not None:
            if getattr(weight.quant_state, "packing_format_for_cpu", False):
                raise RuntimeError(
                    f"lm_weights_for_sync: {name} holds bitsandbytes' CPU inference layout (repacked by an "
                    "eval forward on an avx512_bf16 CPU), which cannot be dequantized; build the LM through "
                    "Policy.configure_model, which keeps the trainable layout"
                )
            weight = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt) and weight.dtype == torch.int8:
            scales = getattr(weight, "SCB", None)
            scales = scales if scales is not None else getattr(module.state, "SCB", None)
            if scales is None:
                raise RuntimeError(f"lm_weights_for_sync: {name} holds int8 weights without their scales (SCB)")
            weight = bnb.functional.int8_vectorwise_dequant(weight.data, scales)  # rows x absmax / 127
        elif not isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            continue
        out[f"{name}.weight".replace(".base_layer.", ".")] = weight.detach().to(dtype)
    return out


__all__ = ["dequantized_weights", "lm_weights_for_sync", "prepare_4bit_layers"]
