"""``qoq export``: a training checkpoint as a self-describing folder that other tools (and qoq) load.

Writes::

    lm/                       Hugging Face model + tokenizer (LoRA merged; transformers and vLLM load it);
                              its chat template adds the policy's system prompt when a chat has none
    adapter/                  instead of lm/ with --adapter_only on a LoRA run: the peft adapter alone
    multimodal.safetensors    the encoders and the fusion projector
    policy.json               the policy's config (class, encoders, projector, system prompt, LM dtype)
    README.md                 a model card: what it is, what it was trained on, how to use it
    export.json               checkpoint, step, files

:func:`load_export` (also ``Policy.from_export``) rebuilds the whole multimodal policy from the folder;
its greedy answers are the checkpoint's.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import yaml

#: The policy config file of an export folder.
POLICY_FILE = "policy.json"


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path, adapter_only: bool = False) -> Path:
    """Export a ``PolicyOptimization`` or ``Policy`` checkpoint written by ``qoq fit``.

    Args:
        ckpt_path: the checkpoint.
        out_dir: destination folder (created).
        adapter_only: for a LoRA policy, write the peft adapter (``adapter/``) instead of the merged LM; the
            base LM is then rebuilt from the policy's own ``lm`` config when the export is loaded.

    Returns:
        The output folder.

    Raises:
        FileNotFoundError: no checkpoint at ``ckpt_path``.
        ValueError: the checkpoint has no policy config (a module built in Python), or ``adapter_only`` on a
            policy without LoRA.
    """
    from safetensors.torch import save_file

    ckpt_path, out = Path(ckpt_path), Path(out_dir)
    policy, config, checkpoint = policy_from_checkpoint(ckpt_path)
    hparams = checkpoint.get("hyper_parameters", {})
    rl = hparams.get("_class_path", "").endswith("PolicyOptimization")
    if adapter_only and policy.lora is None:
        raise ValueError("qoq export: --adapter_only needs a LoRA policy (this one trains the full LM)")

    out.mkdir(parents=True, exist_ok=True)
    init = dict(config.get("init_args", {}))
    dtype = str(next(policy.base_model.parameters()).dtype).removeprefix("torch.")
    if adapter_only:
        policy.lm.save_pretrained(out / "adapter")  # peft: adapter_config.json + adapter_model.safetensors
        lm_files = "adapter/"
    else:
        policy.save_lm(out / "lm")
        _add_default_system_turn(out / "lm", policy.system_prompt)
        lm_args = {"path": "lm", "dtype": dtype, "tokenizer_class": _faithful_tokenizer_class(out / "lm", policy.tokenizer)}
        init["lm"] = {"class_path": "qoq.models.PretrainedLM", "init_args": lm_args}
        merged = {"lora": None, "quantization": None}  # the LM is saved merged, in full precision
        init["options"] = {**(init.get("options") or {}), **merged}
        lm_files = "lm/"
    extra = {
        f"{part}.{name}": t.detach().cpu().contiguous()
        for part in ("encoders", "projector")
        if getattr(policy, part, None) is not None
        for name, t in getattr(policy, part).state_dict().items()
    }
    if extra:
        save_file(extra, str(out / "multimodal.safetensors"))
    described = {"class_path": config["class_path"], "init_args": init, "adapter": adapter_only}
    (out / POLICY_FILE).write_text(json.dumps(described, indent=2, default=str))
    step = int(checkpoint.get("global_step", 0))
    facts = {
        "checkpoint": str(ckpt_path),
        "global_step": step,
        "lm": lm_files,
        "multimodal": "multimodal.safetensors" if extra else None,
        "multimodal_tensors": len(extra),
        "policy": POLICY_FILE,
        "policy_class": f"{type(policy).__module__}.{type(policy).__qualname__}",
    }
    (out / "export.json").write_text(json.dumps(facts, indent=2))
    (out / "README.md").write_text(
        model_card(policy, hparams if rl else {}, _run_config(ckpt_path), step, adapter_only,
                   tokenizer_class=init["lm"].get("init_args", {}).get("tokenizer_class") if not adapter_only else None),
        encoding="utf-8",
    )
    return out


def policy_from_checkpoint(ckpt_path: str | Path) -> tuple[Any, dict, dict]:
    """The trained policy of a ``qoq fit`` checkpoint (RL or SFT), built from its config.

    The config is the RL module's ``policy`` hyper-parameter, else the ``model`` of the run's
    ``config.yaml`` (``<run>/checkpoints/x.ckpt`` -> ``<run>/config.yaml``).

    Returns:
        ``(policy, its config {class_path, init_args}, the loaded checkpoint)``.

    Raises:
        FileNotFoundError: no checkpoint at ``ckpt_path``.
        ValueError: no policy config found.
    """
    from qoq.systems.policy_optimization import load_policy_weights

    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"qoq export: no checkpoint at {ckpt_path}")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    config = _policy_config(checkpoint.get("hyper_parameters", {}), _run_config(ckpt_path))
    if config is None:
        raise ValueError(
            f"qoq export: no policy config for {ckpt_path} (neither in the checkpoint nor in the run's config.yaml)"
        )
    policy = _instantiate(config).build()
    load_policy_weights(policy, ckpt_path)
    return policy.eval(), config, checkpoint


def _instantiate(config: dict) -> Any:
    from lightning.pytorch.cli import instantiate_module

    module_name, _, class_name = config["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return instantiate_module(cls, _with_options(copy.deepcopy(config.get("init_args", {}))))


def _with_options(init: dict) -> dict:
    """A policy's init args with the settings of older configs in ``options``: flat (``lora``, ...) and the
    SFT optimizer as ``lr`` / ``weight_decay`` (now ``optimizer``, AdamW)."""
    from qoq.models.policy import PolicyOptions

    names = {f.name for f in fields(PolicyOptions)} | {"lr", "weight_decay"}
    options = {**{name: init.pop(name) for name in names if name in init}, **(init.get("options") or {})}
    adamw = {name: options.pop(name) for name in ("lr", "weight_decay") if name in options}
    if adamw:
        adamw = {"class_path": "torch.optim.AdamW", "init_args": {"weight_decay": 0.0, **adamw}}
        options.setdefault("optimizer", adamw)
    if options:
        init["options"] = options
    return init


def load_export(directory: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Rebuild the multimodal policy of an export folder (LM, encoders, projector, system prompt).

    Args:
        directory: a folder written by :func:`export_checkpoint`.
        map_location: device of the returned policy.

    Returns:
        The built :class:`qoq.models.Policy` (or subclass) in eval mode.

    Raises:
        FileNotFoundError: the folder has no ``policy.json``.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    path = directory / POLICY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {POLICY_FILE} (not a `qoq export` folder, or an older export)")
    described = json.loads(path.read_text())
    init = copy.deepcopy(described["init_args"])
    lm = init.get("lm") or {}
    if lm.get("class_path", "").endswith("PretrainedLM") and not Path(lm["init_args"]["path"]).is_absolute():
        lm["init_args"]["path"] = str(directory / lm["init_args"]["path"])
    policy = _instantiate({"class_path": described["class_path"], "init_args": init}).build()
    if described.get("adapter"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(policy.lm, load_file(str(directory / "adapter" / "adapter_model.safetensors")))
    multimodal = directory / "multimodal.safetensors"
    if multimodal.is_file():
        tensors = load_file(str(multimodal))
        for part in ("encoders", "projector"):
            state = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == part}
            if state:
                getattr(policy, part).load_state_dict(state, strict=True)
    return policy.to(map_location).eval()


def model_card(
    policy: Any, rl_hparams: dict, run_config: dict, step: int, adapter_only: bool, tokenizer_class: str | None = None
) -> str:
    """The export's README: the model, its training data and algorithm, and how to use it."""
    data = (run_config.get("data") or {}) if isinstance(run_config, dict) else {}
    data_args = data.get("init_args", data) if isinstance(data, dict) else {}
    demo = bool(data_args.get("demo"))
    manifests = data_args.get("manifests") or []
    trained_on = []
    if demo:
        trained_on.append("the embedded **demo set** (a few real samples from installed packages with header-derived "
                          "labels, plus synthetic records): **a demonstration, not a clinical model**")
    if manifests:
        trained_on.append("manifests " + ", ".join(f"`{m}`" for m in manifests))
    algorithm = (rl_hparams.get("advantage") or {}).get("class_path", "") if rl_hparams else ""
    stage = f"RL with `{algorithm}` advantages" if algorithm else "SFT (the policy's own stage)"
    params = sum(p.numel() for p in policy.parameters())
    kinds = ", ".join(sorted(policy.encoders)) or "none (text only)"
    system = policy.system_prompt or "(none)"
    lm_note = "" if adapter_only else (
        "\nThe LM alone (text prompts) loads with transformers or vLLM from `lm/`; its chat template adds the "
        "system prompt above when a chat has no system turn.\n"
    )
    if tokenizer_class:
        lm_note += (f"Load its tokenizer with `transformers.{tokenizer_class}.from_pretrained('lm')` (`AutoTokenizer` "
                    "would rebuild it from the model type and split text differently).\n")
    files = "`adapter/` (peft adapter; the base LM is rebuilt from `policy.json`)" if adapter_only else (
        "`lm/` (Hugging Face model + tokenizer, LoRA merged)")
    return f"""# qoq policy export

A multimodal clinical policy trained with qoq: a causal LM with {kinds} encoders whose tokens a fusion
projector splices into the prompt. It answers as `<think>...</think>`, a ```json list of boxes, then
`\\boxed{{answer}}`.

- parameters: {params:,}
- training: {stage}, {step} optimizer steps
- trained on: {"; ".join(trained_on) or "(unknown: the run's config.yaml was not found next to the checkpoint)"}
- system prompt: {system}
- files: {files}, `multimodal.safetensors` (encoders + projector), `policy.json` (the config), `export.json`

## Use it

```python
from qoq.models import Policy
from qoq.rl.rollout import HFEngine
from qoq.types import SamplingParams

policy = Policy.from_export(".")              # this folder: LM, encoders, projector, system prompt
embeds = policy.prompt_embeds(batch)          # a qoq.types.PromptBatch, e.g. from a qoq data module
engine = HFEngine()
engine.setup(policy.lm, policy.tokenizer, None, policy.suppress_token_ids, policy.eos_token_ids)
print(engine.generate(embeds, SamplingParams(n=1, temperature=0.0, max_new_tokens=256)).texts)
```

Or from the command line, on new cases (needs no gold answers):
`qoq predict --config <the run's config.yaml> --ckpt_path <checkpoint> --data.predict.file scan.dcm --data.predict.question "..."`.
{lm_note}
Labels taken from file headers are not clinical ground truth; do not use this model for patient care.
"""


def _policy_config(hparams: dict, run_config: dict) -> dict | None:
    for config in (hparams.get("policy"), (run_config.get("model") if isinstance(run_config, dict) else None)):
        if isinstance(config, dict) and config.get("class_path", "").startswith("qoq.models"):
            return config
    return None


def _run_config(ckpt_path: Path) -> dict:
    """The run's ``config.yaml`` (``<run>/checkpoints/x.ckpt`` -> ``<run>/config.yaml``), or {}."""
    for folder in (ckpt_path.parent.parent, ckpt_path.parent):
        path = folder / "config.yaml"
        if path.is_file():
            try:
                return yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError:
                return {}
    return {}


#: Text whose tokens show whether a reloaded tokenizer splits like the trained one (digits, code, markup).
_PROBE = "Options: (> 100 bpm), 60-100 bpm. <think>...</think> ```json [1, 2]``` \\boxed{AFib} \u00e9"


def _faithful_tokenizer_class(lm_dir: Path, tokenizer: Any) -> str | None:
    """None when ``AutoTokenizer`` reloads ``lm_dir``'s tokenizer as trained, else ``PreTrainedTokenizerFast``.

    (``AutoTokenizer`` picks the class from the model type and may rebuild the pre-tokenizer, e.g. a tokenizer
    trained from scratch for a Qwen2-shaped model gets Qwen2's digit splitting.)
    """
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(lm_dir, local_files_only=True)
    same = reloaded(_PROBE, add_special_tokens=False)["input_ids"] == tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    return None if same else "PreTrainedTokenizerFast"


def _add_default_system_turn(lm_dir: Path, system_prompt: str | None) -> None:
    """Make the exported tokenizer's chat template open with ``system_prompt`` when a chat has no system turn."""
    if not system_prompt:
        return
    config_path = lm_dir / "tokenizer_config.json"
    template_path = lm_dir / "chat_template.jinja"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    template = template_path.read_text() if template_path.is_file() else config.get("chat_template")
    if not isinstance(template, str):
        return
    prefix = (
        "{%- if not messages or messages[0]['role'] != 'system' %}"
        f"{{%- set messages = [{{'role': 'system', 'content': {json.dumps(system_prompt)}}}] + messages %}}"
        "{%- endif %}"
    )
    if template_path.is_file():
        template_path.write_text(prefix + template)
    else:
        config["chat_template"] = prefix + template
        config_path.write_text(json.dumps(config, indent=2))


def main(argv: list[str]) -> int:
    """``qoq export --ckpt_path CKPT --out DIR [--adapter_only]``."""
    parser = argparse.ArgumentParser(
        prog="qoq export",
        description="Turn a training checkpoint into a self-describing folder: a Hugging Face LM, the encoders "
        "and projector, the policy's config and a model card (reload with Policy.from_export(DIR)).",
    )
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by `qoq fit`")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--adapter_only", action="store_true", help="LoRA runs: write the peft adapter, not the merged LM")
    args = parser.parse_args(argv)
    out = export_checkpoint(args.ckpt_path, args.out, adapter_only=args.adapter_only)
    print(f"[qoq] exported {args.ckpt_path} -> {out} (model card: {out / 'README.md'})")
    return 0
