"""qoq's GRPO step against TRL's ``GRPOTrainer`` on the same tiny policy, prompts and settings.

Four arms, each in its own process (fresh memory, threads and globals; TRL's colocated vLLM initialises
``torch.distributed``):

- ``qoq-hf`` / ``qoq-vllm``: :class:`qoq.systems.PolicyOptimization` with :class:`qoq.rl.advantages.GRPO`,
  driven by a Lightning ``Trainer`` (a real run's loop: manual optimisation and the module's logging),
  rollouts by ``HFEngine`` / ``VLLMEngine``;
- ``trl-hf`` / ``trl-vllm``: ``trl.GRPOTrainer`` driven by its own (HF ``Trainer``) loop, rollouts by
  ``generate`` / colocated vLLM (``vllm_mode="colocate"``).

Both sides: the same random-init Qwen2 (``qoq.models.TinyLM``, same seed, same run-time tokenizer), the
same chat-formatted prompts (qoq's default system turn + a text-only question; TRL gets the same messages
and applies the same template: prompt token counts are recorded and compared), P prompts x n samples,
temperature 1, exactly ``max_new_tokens`` response tokens (EOS never sampled: qoq via
:func:`benchmarks.common.without_eos`, TRL via ``min_new_tokens`` / ``min_tokens``), the same cheap reward
(:func:`benchmarks.common.toy_reward`), one AdamW step per rollout batch (same lr, no weight decay, betas
0.9/0.999, grad clip 1.0, constant lr), no KL term and no reference model, fp32 and no gradient
checkpointing (TRL's defaults are bf16 autocast and checkpointing: both switched off to do qoq's work).

Step time = wall time from one optimizer step's end to the next (each framework's whole loop: data,
rollout, reward, log-probs, backward, optimizer, weight sync, logging); the median after ``warmup`` steps.
Known difference in work: qoq always recomputes the old log-probs (one extra no-grad forward) while TRL
skips them with HF generate when ``num_iterations=1``; with vLLM both compute them (TRL's importance
sampling correction is on by default).

The ``trl-vllm`` arm first runs TRL's weight sync once (:func:`_probe_trl_vllm_sync`): where vLLM's CPU
backend lacks what that sync needs, the arm is reported as not runnable on this CPU, with the reason.

    python -m benchmarks.step_vs_trl [--smoke] [--out results.json]
    python -m benchmarks.step_vs_trl --arm trl-vllm --out arms.json     # arms in this process
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import common

ARMS = ("qoq-hf", "trl-hf", "qoq-vllm", "trl-vllm")
TARGET_RATIO = 0.7  # qoq step time / TRL step time the project aims for


@dataclasses.dataclass(frozen=True)
class Settings:
    """What both sides train.

    Attributes:
        lm: ``qoq.models.TinyLM`` arguments.
        prompts: prompts per step (P).
        n: group size.
        max_new_tokens: response tokens (every response has exactly this many).
        steps: optimizer steps run.
        warmup: first steps left out of the median.
        lr: AdamW learning rate.
    """

    lm: dict[str, Any]
    prompts: int = 8
    n: int = 4
    max_new_tokens: int = 32
    steps: int = 6
    warmup: int = 2
    lr: float = 1e-5


FULL = Settings(lm={})  # TinyLM defaults: hidden 256, 6 layers, ~4.9M parameters (the demo size)
SMOKE = Settings(
    lm={"hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1},
    prompts=2,
    n=2,
    max_new_tokens=8,
    steps=2,
    warmup=1,
)


def _summary(step_s: list[float], tokens: list[float], warmup: int) -> dict[str, Any]:
    kept = step_s[warmup:] or step_s
    kept_tokens = tokens[warmup:] or tokens
    med = common.median(kept)
    tok = common.median(kept_tokens)
    return {
        "median_step_s": med,
        "first_step_s": step_s[0] if step_s else float("nan"),
        "tokens_per_step": tok,
        "tokens_per_s": tok / med if med > 0 else float("nan"),
    }


def _qoq_arm(s: Settings, engine_kind: str, workdir: Path) -> dict[str, Any]:
    from qoq.rl.rollout import HFEngine, VLLMEngine

    engine = (
        HFEngine() if engine_kind == "hf" else VLLMEngine(dtype="float32", max_model_len=1024, kv_cache_gib=1)
    )
    res = common.fit_grpo(
        s.lm,
        common.without_eos(engine),
        s.steps,
        common.PROMPTS[: s.prompts],
        n=s.n,
        max_new_tokens=s.max_new_tokens,
        lr=s.lr,
        workdir=workdir,
    )
    phases = res.pop("phases")
    kept = phases[s.warmup :] or phases
    res["phase_median_s"] = {
        k: common.median([p[k] for p in kept if k in p]) for k in (kept[0] if kept else {})
    }
    return {**res, **_summary(res["step_s"], res["response_tokens"], s.warmup)}


def _trl_arm(s: Settings, use_vllm: bool, workdir: Path) -> dict[str, Any]:
    common.bench_site()
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.extras import profiling

    from qoq.models import DEFAULT_SYSTEM_PROMPT, TinyLM

    t0 = time.perf_counter()
    model, tok = TinyLM(**s.lm).build()
    if use_vllm:  # colocated vLLM loads the model from `model.name_or_path`
        path = workdir / "model"
        model.save_pretrained(path)
        tok.save_pretrained(path)
        model.config._name_or_path = model.name_or_path = str(path)
    messages = [
        [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": text}]
        for text in common.PROMPTS[: s.prompts]
    ]
    prompt_tokens = [
        len(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False))
        for m in messages
    ]
    rewards_called = [0]

    def reward(completions: list, **_: Any) -> list[float]:
        rewards_called[0] += 1
        return [common.toy_reward(c[-1]["content"] if isinstance(c, list) else c) for c in completions]

    profile: dict[str, list[float]] = {}

    def record(
        self: Any, duration: float
    ) -> None:  # TRL's own phase timers, kept instead of sent to a tracker
        profile.setdefault(self.name, []).append(duration)

    profiling.ProfilingContext._log_metrics = record

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.start = 0.0
            self.stamps: list[float] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.stamps.append(time.perf_counter())

    clock = Clock()
    eos_off = {"min_tokens": s.max_new_tokens} if use_vllm else {"min_new_tokens": s.max_new_tokens}
    config = GRPOConfig(
        output_dir=str(workdir / "trl"),
        per_device_train_batch_size=s.prompts * s.n,
        gradient_accumulation_steps=1,
        num_generations=s.n,
        max_completion_length=s.max_new_tokens,
        max_steps=s.steps,
        learning_rate=s.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        max_grad_norm=1.0,
        beta=0.0,
        num_iterations=1,
        epsilon=0.2,
        loss_type="dapo",  # token mean over the whole batch, like qoq's token_mean
        scale_rewards="group",
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        use_vllm=use_vllm,
        vllm_mode="colocate",
        vllm_max_model_length=1024,
        vllm_gpu_memory_utilization=0.3,
        generation_kwargs=eos_off,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": messages}),
        processing_class=tok,
        callbacks=[clock],
    )
    if use_vllm:
        _probe_trl_vllm_sync(trainer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    rows = s.prompts * s.n
    tokens = [h["completions/mean_length"] * rows for h in logs]
    step_s = common.intervals(clock.stamps, clock.start)
    out = {
        "step_s": step_s,
        "response_tokens": tokens,
        "params": common.count_params(model),
        "prompt_tokens": prompt_tokens,
        "torch_threads": torch.get_num_threads(),
        "setup_s": clock.start - t0,
        "eos_disabled": bool(tokens) and all(abs(t - rows * s.max_new_tokens) < 1e-6 for t in tokens),
        "profile_median_s": {k: common.median(v[s.warmup :] or v) for k, v in profile.items()},
        "reward_calls": rewards_called[0],
    }
    if use_vllm:
        diffs = [h.get("sampling/sampling_logp_difference/mean") for h in logs]
        out["vllm_logp_difference_mean"] = [d for d in diffs if d is not None]
    return {**out, **_summary(step_s, tokens, s.warmup)}


class NotRunnable(RuntimeError):
    """An arm that cannot run on this machine (not a failure of qoq or of the benchmark); says why."""


def _probe_trl_vllm_sync(trainer: Any) -> None:
    """Run TRL's colocated weight sync once before training, on the weights vLLM has just loaded.

    The sync pushes every trainer parameter through the vLLM model's ``load_weights``, which needs each
    vLLM parameter's ``weight_loader``. vLLM's CPU backend may replace linear weights after loading (by
    packed layouts for the CPU's matrix kernels) with plain Parameters that have none; then every step of
    this arm would fail. Pushing identical weights changes nothing, costs one sync (tens of ms) and tells.

    Raises:
        NotRunnable: the sync fails; the reason names the error and the vLLM parameters without a loader.
    """
    generation = trainer.vllm_generation
    try:
        generation.sync_weights()
    except Exception as exc:
        model = generation.llm.llm_engine.model_executor.driver_worker.model_runner.model
        linear = {n: p for n, p in model.named_parameters() if n.endswith("proj.weight")}
        bare = sorted(n for n, p in linear.items() if not hasattr(p, "weight_loader"))
        detail = (
            f"; {len(bare)} of {len(linear)} linear weights of the vLLM model have no weight_loader "
            f"(e.g. {bare[0]}): vLLM's CPU backend replaced them after loading"
            if bare
            else ""
        )
        raise NotRunnable(
            "TRL's colocated vLLM weight sync (vLLM model.load_weights) fails with this vLLM CPU build on "
            f"this CPU: {type(exc).__name__}: {exc}{detail}. qoq's own engine syncs through "
            "reload_weights and is not affected"
        ) from exc


def run_arm(arm: str, smoke: bool = False) -> dict[str, Any]:
    """Run one arm in this process and return its figures.

    Args:
        arm: one of :data:`ARMS`.
        smoke: the tiny settings (:data:`SMOKE`).
    """
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose from {ARMS}")
    common.apply_env()
    s = SMOKE if smoke else FULL
    side, engine = arm.split("-")
    with tempfile.TemporaryDirectory(prefix=f"qoq-bench-{arm}-") as tmp:
        if side == "qoq":
            return _qoq_arm(s, engine, Path(tmp))
        return _trl_arm(s, engine == "vllm", Path(tmp))


def run_arms(arms: list[str], smoke: bool, out: Path) -> dict[str, Any]:
    """Run ``arms`` one after the other in this process; after each, write ``{arm: figures}`` to ``out``.

    An arm that cannot run on this machine is recorded as ``{"not_runnable": reason}``, one that raises
    otherwise as ``{"error": ...}``; the next one still runs.
    """
    results: dict[str, Any] = {}
    for arm in arms:
        try:
            results[arm] = run_arm(arm, smoke)
        except NotRunnable as exc:
            results[arm] = {"not_runnable": str(exc)}
        except Exception:  # noqa: BLE001 - a failing arm is a result to report
            results[arm] = {"error": traceback.format_exc(limit=8)}
        common.write_json(out, results)
    return results


#: Arms sharing one process. Full runs isolate every arm; smoke runs share imports where that is safe
#: (TRL's colocated vLLM initialises torch.distributed, so it always has a process of its own).
PROCESSES_FULL = (("qoq-hf",), ("trl-hf",), ("qoq-vllm",), ("trl-vllm",))
PROCESSES_SMOKE = (("qoq-hf", "qoq-vllm", "trl-hf"), ("trl-vllm",))


def run(
    smoke: bool = False, arms: tuple[str, ...] = ARMS, logdir: Path | None = None, timeout: float = 900
) -> dict[str, Any]:
    """Run the arms in child processes and compare.

    Args:
        smoke: tiny settings, 2 steps per arm (and fewer processes).
        arms: which arms to run.
        logdir: where each process's log goes (``<arms>.log``); a temporary folder when None.
        timeout: seconds allowed per process.

    Returns:
        ``settings``, ``arms`` (arm -> figures, ``{"not_runnable": reason}`` for an arm this machine
        cannot run, or ``{"error": ...}`` with the log's tail), ``ratios``
        (engine -> qoq / TRL median step time) and ``target_ratio``.
    """
    s = SMOKE if smoke else FULL
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="qoq-bench-arms-") as tmp:
        logs = Path(logdir or tmp)
        for group in PROCESSES_SMOKE if smoke else PROCESSES_FULL:
            group = [a for a in group if a in arms]
            if not group:
                continue
            name = "+".join(group)
            out, log = Path(tmp) / f"{name}.json", logs / f"{name}.log"
            args = ["--arm", *group, "--out", str(out)] + (["--smoke"] if smoke else [])
            start = time.perf_counter()
            try:
                proc = common.run_module(
                    "benchmarks.step_vs_trl",
                    args,
                    timeout=timeout,
                    log=log,
                    env=common.SMOKE_ENV if smoke else None,
                )
                error = None if proc.returncode == 0 else f"exit code {proc.returncode}"
            except subprocess.TimeoutExpired:
                error = f"timed out after {timeout:.0f} s"
            done = common.read_json(out) if out.is_file() else {}
            for arm in group:
                results[arm] = done.get(arm) or {"error": f"{error or 'no result'}:\n{common.tail(log)}"}
            wall = time.perf_counter() - start
            for arm in group:
                r = results[arm]
                print(
                    f"[step_vs_trl] {arm:9s} "
                    + (
                        f"median step {r['median_step_s']:.3f} s, {r['tokens_per_s']:.0f} response tok/s"
                        if "median_step_s" in r
                        else f"not runnable on this CPU: {r['not_runnable']}"
                        if "not_runnable" in r
                        else "FAILED"
                    )
                    + f" (process {name}: {wall:.0f} s)",
                    flush=True,
                )
    ratios = {}
    for engine in ("hf", "vllm"):
        q, t = results.get(f"qoq-{engine}", {}), results.get(f"trl-{engine}", {})
        if q.get("median_step_s") and t.get("median_step_s"):
            ratios[engine] = q["median_step_s"] / t["median_step_s"]
            print(
                f"[step_vs_trl] {engine}: qoq / TRL median step time = {ratios[engine]:.2f}x "
                f"(target <= {TARGET_RATIO}x)",
                flush=True,
            )
    return {
        "settings": dataclasses.asdict(s),
        "arms": results,
        "ratios": ratios,
        "target_ratio": TARGET_RATIO,
    }


def render(results: dict[str, Any]) -> str:
    """The markdown section of RESULTS.md for these results."""
    s = results["settings"]
    lm = s["lm"] or "TinyLM defaults (hidden 256, 6 layers, 4 heads, 2 KV heads, vocab 512)"
    lines = [
        (
            f"Policy: `qoq.models.TinyLM` {lm}; P={s['prompts']} prompts x n={s['n']} samples x "
            f"{s['max_new_tokens']} response tokens, {s['steps']} steps (median of the last "
            f"{s['steps'] - s['warmup']}), AdamW lr {s['lr']}, fp32.\n"
        ),
    ]
    rows = []
    for arm, r in results["arms"].items():
        if "error" in r or "not_runnable" in r:
            status = "not runnable on this CPU, see below" if "not_runnable" in r else "failed, see below"
            rows.append({"arm": arm, "median step (s)": status})
            continue
        rows.append(
            {
                "arm": arm,
                "params": r.get("params"),
                "prompt tokens (mean)": sum(r["prompt_tokens"]) / len(r["prompt_tokens"]),
                "median step (s)": r["median_step_s"],
                "first step (s)": r["first_step_s"],
                "setup (s)": r.get("setup_s"),
                "response tokens / step": r["tokens_per_step"],
                "response tok/s": r["tokens_per_s"],
                "EOS disabled": r.get("eos_disabled"),
                "torch threads": r.get("torch_threads"),
            }
        )
    lines.append(common.markdown_table(rows))
    for engine, ratio in results["ratios"].items():
        verdict = "meets" if ratio <= results["target_ratio"] else "misses"
        lines.append(
            f"- **{engine}**: qoq / TRL median step time = **{ratio:.2f}x** "
            f"({verdict} the target <= {results['target_ratio']}x)"
        )
    for arm, r in results["arms"].items():
        if "phase_median_s" in r:
            phases = ", ".join(f"{k} {v:.3f}" for k, v in r["phase_median_s"].items())
            lines.append(f"- {arm} phases (median s): {phases}")
        if r.get("profile_median_s"):
            prof = ", ".join(f"{k} {v:.3f}" for k, v in r["profile_median_s"].items())
            lines.append(f"- {arm} TRL profiling timers (median s): {prof}")
        if r.get("vllm_logp_difference_mean"):
            d = r["vllm_logp_difference_mean"]
            lines.append(
                f"- {arm}: TRL's vLLM-vs-trainer log-prob difference per step (mean): "
                + ", ".join(f"{x:.2g}" for x in d)
                + " (small and flat = its weight sync works)"
            )
        if "not_runnable" in r:
            lines.append(f"- {arm} **not runnable on this CPU**: {r['not_runnable']}")
        if "error" in r:
            lines.append(f"- {arm} **failed**:\n\n```\n{r['error'][-1500:]}\n```")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Command-line entry point."""
    parser = common.command_line(__doc__.splitlines()[0], "tiny settings, 2 steps per arm")
    parser.add_argument("--arm", nargs="+", choices=ARMS, help="run only these arms, in this process")
    args = parser.parse_args()
    if args.arm:
        run_arms(args.arm, args.smoke, args.out or Path("step_vs_trl_arms.json"))
        return
    common.finish(run(args.smoke), args.out, render)


if __name__ == "__main__":
    sys.exit(main())
