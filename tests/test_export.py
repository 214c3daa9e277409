"""`qoq export` round trip: checkpoint -> export folder -> Policy.from_export -> the same greedy answers.

The RL (DRPO) checkpoint's round trip is in test_e2e.py (it reuses that module's run); here the SFT stage of
the LoRA micro policy, exported merged and adapter-only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qoq.cli import main, run
from qoq.data import MultiDomainDataModule
from qoq.export import _instantiate, policy_from_checkpoint
from qoq.models import Policy
from qoq.rl.rollout import HFEngine
from qoq.types import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
INSTRUCTION = "Answer as <think>...</think>, a ```json list of boxes, then \\boxed{answer}."


def greedy(policy: Policy, batch) -> list[str]:
    """The policy's greedy answers to a batch (the HF engine on the policy's own LM)."""
    engine = HFEngine()
    engine.setup(policy.lm, policy.tokenizer, None, policy.suppress_token_ids, policy.eos_token_ids)
    with torch.no_grad():
        embeds = policy.prompt_embeds(batch)
    return engine.generate(embeds, SamplingParams(n=1, temperature=0.0, max_new_tokens=24)).texts


def demo_batch(size: int = 6):
    """Held-out demo prompts of several modalities, as the demo config loads them."""
    dm = MultiDomainDataModule(demo=True, val_batch_size=size, image_size=64, num_frames=4, val_fraction=0.2,
                               instruction=INSTRUCTION)
    return next(iter(dm.val_dataloader()))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sft_lora")
    run(["fit", "--config", str(ROOT / "configs/demo_sft.yaml"), "--model", str(ROOT / "configs/policy/micro_lora.yaml"),
         "--trainer.max_steps", "3", "--trainer.default_root_dir", str(folder)])
    return folder / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("adapter_only", [False, True])
def test_export_round_trip_reproduces_greedy_answers(lora_run: Path, tmp_path: Path, adapter_only: bool) -> None:
    out = tmp_path / "export"
    assert main(["export", "--ckpt_path", str(lora_run), "--out", str(out), *(["--adapter_only"] * adapter_only)]) == 0
    trained, _, _ = policy_from_checkpoint(lora_run)
    reloaded = Policy.from_export(out)
    batch = demo_batch()
    assert greedy(reloaded, batch) == greedy(trained, batch)
    with torch.no_grad():  # not only the (short) greedy texts: the same embeddings and next-token logits
        embeds = [p.prompt_embeds(batch) for p in (trained, reloaded)]
        logits = [p.lm(inputs_embeds=e[0][None]).logits for p, e in zip((trained, reloaded), embeds)]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*embeds))
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=1e-4)
    assert reloaded.system_prompt == trained.system_prompt and sorted(reloaded.encoders) == sorted(trained.encoders)
    described = json.loads((out / "policy.json").read_text())
    card = (out / "README.md").read_text()
    assert "demo set" in card and "not a clinical model" in card and "Policy.from_export" in card
    if adapter_only:
        assert (out / "adapter" / "adapter_config.json").is_file() and not (out / "lm").exists()
        assert described["init_args"]["options"]["lora"] is not None
    else:
        assert described["init_args"]["lm"]["class_path"] == "qoq.models.PretrainedLM" and reloaded.lora is None


def test_exported_chat_template_keeps_the_system_prompt(lora_run: Path, tmp_path: Path) -> None:
    main(["export", "--ckpt_path", str(lora_run), "--out", str(tmp_path / "export")])
    policy = Policy.from_export(tmp_path / "export")  # its tokenizer is lm/'s, loaded as the model card says
    plain = policy.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert plain == policy.chat_texts(["hi"])[0] and policy.system_prompt in plain


def test_export_of_a_missing_checkpoint(tmp_path: Path, capsys) -> None:
    assert main(["export", "--ckpt_path", str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "qoq export: error:" in err and "no checkpoint" in err
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        main(["export", "--ckpt_path", str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "x"), "--debug"])


def test_a_policy_config_with_flat_options_still_loads() -> None:
    """Checkpoints and exports written before ``PolicyOptions`` hold the options beside ``lm``."""
    lm = {"class_path": "qoq.models.TinyLM", "init_args": {"hidden_size": 64, "num_heads": 2, "num_kv_heads": 1}}
    old = {"class_path": "qoq.models.Policy", "init_args": {"lm": lm, "lr": 0.5, "system_prompt": None}}
    policy = _instantiate(old)
    assert policy.optimizer.keywords["lr"] == 0.5 and policy.optimizer.keywords["weight_decay"] == 0.0
    assert policy.system_prompt is None and policy.options.share_prompts
