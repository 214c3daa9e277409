"""``qoq export``: turn a training checkpoint into files other tools load.

Writes ``<out>/lm/`` (a Hugging Face model + tokenizer, LoRA adapters merged; loadable by transformers
and vLLM) and ``<out>/multimodal.safetensors`` (the encoders and the fusion projector), plus
``<out>/export.json`` describing both.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path) -> Path:
    """Export a ``PolicyOptimization`` or ``Policy`` checkpoint.

    Args:
        ckpt_path: a Lightning checkpoint written by ``qoq fit``.
        out_dir: destination folder (created).

    Returns:
        The output folder.
    """
    from safetensors.torch import save_file

    from qoq.models.policy import Policy
    from qoq.systems.policy_optimization import PolicyOptimization

    ckpt_path, out = Path(ckpt_path), Path(out_dir)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"qoq export: no checkpoint at {ckpt_path}")
    hparams = torch.load(ckpt_path, map_location="cpu", weights_only=True).get("hyper_parameters", {})
    cls = PolicyOptimization if hparams.get("_class_path", "").endswith("PolicyOptimization") else Policy
    module = cls.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    policy = module.policy if isinstance(module, PolicyOptimization) else module
    out.mkdir(parents=True, exist_ok=True)
    policy.save_lm(out / "lm")
    extra = {
        f"{part}.{name}": t.detach().cpu().contiguous()
        for part in ("encoders", "projector")
        if getattr(policy, part, None) is not None
        for name, t in getattr(policy, part).state_dict().items()
    }
    if extra:
        save_file(extra, str(out / "multimodal.safetensors"))
    (out / "export.json").write_text(
        json.dumps(
            {
                "checkpoint": str(ckpt_path),
                "lm": "lm/",
                "multimodal": "multimodal.safetensors" if extra else None,
                "multimodal_tensors": len(extra),
                "policy_class": f"{type(policy).__module__}.{type(policy).__qualname__}",
            },
            indent=2,
        )
    )
    return out


def main(argv: list[str]) -> int:
    """``qoq export --ckpt_path CKPT --out DIR``."""
    parser = argparse.ArgumentParser(
        prog="qoq export", description="Turn a training checkpoint into files other tools load."
    )
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by `qoq fit`")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    out = export_checkpoint(args.ckpt_path, args.out)
    print(f"[qoq] exported {args.ckpt_path} -> {out}")
    return 0
