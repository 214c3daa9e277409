"""Rollout throughput of ``VLLMEngine`` vs ``HFEngine`` across model and group sizes; weight-sync cost.

For each policy size (random-init ``qoq.models.TinyLM``, head_dim >= 32 as vLLM's CPU attention needs):

1. **Throughput**: both engines sample P prompts x n responses of exactly ``max_new_tokens`` tokens (EOS
   never sampled, :func:`benchmarks.common.without_eos`) from the same chat-formatted text prompts (no
   system turn: short prompts, so decoding dominates); response tokens per second of ``generate``
   (median of ``reps`` calls after one warm-up call).
2. **Sync**: ``VLLMEngine.sync_weights(policy.lm_weights_for_sync())`` pushed directly (median of
   ``sync_reps``; includes the engine's verification), and inside real steps: a few qoq GRPO steps
   (:func:`benchmarks.common.fit_grpo`, vLLM rollouts) give the ``time/sync`` phase and its share of the step.

    python -m benchmarks.rollout [--smoke] [--out results.json]
"""

from __future__ import annotations

import dataclasses
import gc
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common

#: name -> TinyLM arguments (~0.46M, 4.9M, 19M, 55M parameters with the 512-token run-time tokenizer).
SIZES: dict[str, dict[str, Any]] = {
    "0.5M": {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2},
    "4.9M": {},  # TinyLM defaults: hidden 256, 6 layers, 4 heads, 2 KV heads (the demo size)
    "19M": {"hidden_size": 512, "num_layers": 6, "num_heads": 8, "num_kv_heads": 4},
    "55M": {"hidden_size": 768, "num_layers": 8, "num_heads": 12, "num_kv_heads": 4},
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What is measured.

    Attributes:
        sizes: size names (keys of :data:`SIZES`, or of ``lms``) to run.
        groups: group sizes n.
        prompts: prompts P per call.
        max_new_tokens: tokens per response.
        reps: timed ``generate`` calls per (size, engine, n), after one warm-up call.
        sync_reps: direct weight pushes timed per size.
        steps: GRPO steps run per size for the in-step sync share (the first is left out).
        lms: TinyLM arguments per size name (default :data:`SIZES`).
    """

    sizes: tuple[str, ...] = ("0.5M", "4.9M", "19M")  # 55M: `--sizes 55M` (~8 min on 2 cores)
    groups: tuple[int, ...] = (4, 16)
    prompts: int = 8
    max_new_tokens: int = 32
    reps: int = 2
    sync_reps: int = 5
    steps: int = 3
    lms: dict[str, dict[str, Any]] = dataclasses.field(default_factory=lambda: dict(SIZES))


FULL = Settings()
SMOKE = Settings(
    sizes=("0.1M",),
    groups=(2,),
    prompts=2,
    max_new_tokens=8,
    reps=1,
    sync_reps=2,
    steps=2,
    lms={"0.1M": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1}},
)


def _throughput(engine: Any, embeds: list, s: Settings, n: int) -> dict[str, float]:
    from qoq.types import SamplingParams

    params = SamplingParams(n=n, max_new_tokens=s.max_new_tokens, temperature=1.0, seed=0)
    engine.generate(embeds, params)  # warm-up
    times, tokens = [], []
    for _ in range(s.reps):
        out, seconds = common.timed(engine.generate, embeds, params)
        times.append(seconds)
        tokens.append(int(out.response_mask.sum()))
    med = common.median(times)
    return {"seconds": med, "tokens": common.median(tokens), "tokens_per_s": common.median(tokens) / med}


def measure_size(name: str, s: Settings, workdir: Path) -> dict[str, Any]:
    """All figures of one policy size (throughput of both engines per group size, sync cost)."""
    import torch

    from qoq.rl.rollout import HFEngine, VLLMEngine

    lm = s.lms[name]
    policy = common.tiny_policy_lm(lm, system_prompt=None).build()
    params = common.count_params(policy.lm)
    batch = common.prompt_batch(common.PROMPTS[: s.prompts])
    with torch.no_grad():
        embeds = [e.detach() for e in policy.prompt_embeds(batch)]
    special = {"suppress_token_ids": policy.suppress_token_ids, "eos_token_ids": policy.eos_token_ids}
    result: dict[str, Any] = {
        "size": name,
        "params": params,
        "prompt_tokens": [len(e) for e in embeds],
        "groups": {},
    }

    hf = common.without_eos(HFEngine())
    hf.setup(policy.lm, policy.tokenizer, workdir / "hf", **special)
    for n in s.groups:
        result["groups"][n] = {"hf": _throughput(hf, embeds, s, n)}
    hf.close()

    vllm = common.without_eos(VLLMEngine(dtype="float32", max_model_len=1024, kv_cache_gib=1))
    _, result["vllm_start_s"] = common.timed(
        vllm.setup, policy.lm, policy.tokenizer, workdir / "vllm", **special
    )
    try:
        for n in s.groups:
            result["groups"][n]["vllm"] = _throughput(vllm, embeds, s, n)
        reports = [vllm.sync_weights(policy.lm_weights_for_sync()) for _ in range(s.sync_reps)]
        result["sync_s"] = common.median([r.seconds for r in reports])
        result["sync_mb"] = reports[0].num_bytes / 2**20
        result["sync_verified"] = all(r.verified for r in reports)
    finally:
        vllm.close()
    del policy, hf, vllm
    gc.collect()

    fit = common.fit_grpo(
        lm,
        common.without_eos(VLLMEngine(dtype="float32", max_model_len=1024, kv_cache_gib=1)),
        s.steps,
        common.PROMPTS[: s.prompts],
        n=4,
        max_new_tokens=s.max_new_tokens,
        system_prompt=None,
        workdir=workdir / "fit",
    )
    kept = fit["phases"][1:] or fit["phases"]
    step = common.median(fit["step_s"][1:] or fit["step_s"])
    in_step_sync = common.median([p.get("sync", float("nan")) for p in kept])
    result["step"] = {
        "n": 4,
        "median_step_s": step,
        "sync_s": in_step_sync,
        "sync_share": in_step_sync / step if step > 0 else float("nan"),
        "phase_median_s": {k: common.median([p[k] for p in kept if k in p]) for k in kept[0]} if kept else {},
    }
    gc.collect()
    return result


def run(smoke: bool = False, settings: Settings | None = None) -> dict[str, Any]:
    """Measure every size of ``settings`` (default :data:`FULL`, or :data:`SMOKE`); a size that fails is
    recorded with its error and the others still run.
    """
    common.apply_env()
    s = settings or (SMOKE if smoke else FULL)
    sizes = []
    with tempfile.TemporaryDirectory(prefix="qoq-bench-rollout-") as tmp:
        for name in s.sizes:
            start = time.perf_counter()
            try:
                row = measure_size(name, s, Path(tmp) / name)
            except Exception as exc:  # noqa: BLE001 - report the failure, go on with the other sizes
                row = {"size": name, "error": f"{type(exc).__name__}: {exc}"}
            row["wall_s"] = time.perf_counter() - start
            sizes.append(row)
            for n, g in row.get("groups", {}).items():
                hf, vl = g.get("hf", {}), g.get("vllm", {})
                print(
                    f"[rollout] {name:5s} n={n:3d}: HF {hf.get('tokens_per_s', float('nan')):8.0f} tok/s, "
                    f"vLLM {vl.get('tokens_per_s', float('nan')):8.0f} tok/s",
                    flush=True,
                )
            if "step" in row:
                print(
                    f"[rollout] {name:5s} sync {row['sync_s'] * 1e3:.1f} ms direct, "
                    f"{row['step']['sync_s'] * 1e3:.1f} ms in a {row['step']['median_step_s']:.2f} s step "
                    f"({row['step']['sync_share']:.1%})",
                    flush=True,
                )
            if "error" in row:
                print(f"[rollout] {name}: FAILED {row['error']}", flush=True)
    return {"settings": dataclasses.asdict(s), "sizes": sizes}


def render(results: dict[str, Any]) -> str:
    """The markdown section of RESULTS.md for these results."""
    s = results["settings"]
    lines = [
        (
            f"P={s['prompts']} prompts, {s['max_new_tokens']} response tokens each (EOS never sampled), "
            f"temperature 1, fp32; median of {s['reps']} `generate` calls after a warm-up. "
            "Response tokens/s:\n"
        ),
    ]
    rows, sync_rows = [], []
    for r in results["sizes"]:
        if "error" in r:
            rows.append({"size": r["size"], "n": "failed: " + r["error"][:200]})
            continue
        for n, g in r["groups"].items():
            hf, vl = g.get("hf", {}), g.get("vllm", {})
            rows.append(
                {
                    "size": r["size"],
                    "params": r["params"],
                    "n": n,
                    "responses": int(n) * s["prompts"],
                    "HF tok/s": hf.get("tokens_per_s"),
                    "vLLM tok/s": vl.get("tokens_per_s"),
                    "vLLM / HF": (vl["tokens_per_s"] / hf["tokens_per_s"]) if hf and vl else None,
                }
            )
        step = r.get("step", {})
        sync_rows.append(
            {
                "size": r["size"],
                "params": r["params"],
                "MB pushed": r.get("sync_mb"),
                "sync ms (direct)": r.get("sync_s", float("nan")) * 1e3,
                "sync ms (in step)": step.get("sync_s", float("nan")) * 1e3,
                "GRPO step s (vLLM, n=4)": step.get("median_step_s"),
                "sync share of step": step.get("sync_share"),
                "vLLM start s": r.get("vllm_start_s"),
                "verified": r.get("sync_verified"),
            }
        )
    lines.append(common.markdown_table(rows))
    lines.append(
        "\nWeight sync per optimizer step (push + cache reset + verification) and its share of a qoq "
        "GRPO step with vLLM rollouts (P prompts x 4 samples):\n"
    )
    lines.append(common.markdown_table(sync_rows))
    phase_lines = []
    for r in results["sizes"]:
        phases = r.get("step", {}).get("phase_median_s")
        if phases:
            phase_lines.append(f"- {r['size']}: " + ", ".join(f"{k} {v:.3f}" for k, v in phases.items()))
    if phase_lines:
        lines.append("\nPhases of those steps (median seconds):\n")
        lines.extend(phase_lines)
    return "\n".join(lines) + "\n"


def main() -> None:
    """Command-line entry point."""
    parser = common.command_line(__doc__.splitlines()[0], "one tiny size, one group size")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), help="sizes to run (default: all)")
    args = parser.parse_args()
    settings = None
    if args.sizes and not args.smoke:
        settings = dataclasses.replace(FULL, sizes=tuple(args.sizes))
    common.finish(run(args.smoke, settings), args.out, render)


if __name__ == "__main__":
    sys.exit(main())
