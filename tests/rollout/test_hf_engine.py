"""HFEngine: grouping, masks, EOS handling, seeding, suppression and log-probs against a direct forward."""

from __future__ import annotations

import pytest
import torch
from rollout_helpers import chat_embeds, favouring, max_logprob_gap, tiny_lm

from qoq.rl.rollout import HFEngine
from qoq.types import SamplingParams


@pytest.fixture
def rig(tmp_path):
    model, tokenizer = tiny_lm()
    return model, tokenizer, chat_embeds(model, tokenizer), tmp_path


def _engine(rig, **setup_kwargs) -> HFEngine:
    model, tokenizer, _, tmp_path = rig
    engine = HFEngine(batch_size=setup_kwargs.pop("batch_size", None))
    engine.setup(model, tokenizer, tmp_path, **setup_kwargs)
    return engine


def test_groups_shapes_masks_and_texts(rig):
    _, tokenizer, prompts, _ = rig
    batch = _engine(rig).generate(prompts, SamplingParams(n=4, max_new_tokens=12, temperature=1.0, seed=0))
    assert len(batch) == 12
    assert batch.prompt_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    mask, ids = batch.response_mask, batch.response_ids
    assert ids.shape == mask.shape and ids.shape[1] == mask.sum(1).max() <= 12
    assert (mask[:, 1:] <= mask[:, :-1]).all(), "mask must be a prefix"
    assert (ids[~mask] == tokenizer.pad_token_id).all()
    eos = {2, 0}
    for row in range(12):
        real = ids[row, mask[row]].tolist()
        ends_with_eos = bool(real) and real[-1] in eos
        assert not eos & set(real[:-1]), "nothing after the first EOS"
        assert batch.truncated[row].item() == (not ends_with_eos)
        assert ends_with_eos or len(real) == 12
        assert batch.texts[row] == tokenizer.decode(
            real[:-1] if ends_with_eos else real, skip_special_tokens=True
        )
    assert (batch.engine_logprobs[~mask] == 0).all()
    assert (batch.engine_logprobs[mask] < 0).all() and batch.engine_logprobs.isfinite().all()


def test_seed_reproduces_and_leaves_global_rng_alone(rig):
    _, _, prompts, _ = rig
    engine = _engine(rig)
    params = SamplingParams(n=2, max_new_tokens=8, temperature=1.0, seed=7)
    state = torch.get_rng_state()
    a, b = engine.generate(prompts, params), engine.generate(prompts, params)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.engine_logprobs, b.engine_logprobs)
    c = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=8, temperature=1.0, seed=8))
    assert not torch.equal(a.response_ids, c.response_ids)
    unseeded = SamplingParams(n=2, max_new_tokens=8, temperature=1.0)
    assert not torch.equal(
        engine.generate(prompts, unseeded).response_ids, engine.generate(prompts, unseeded).response_ids
    )


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_a_direct_forward(rig, temperature):
    model, _, prompts, _ = rig
    batch = _engine(rig).generate(
        prompts, SamplingParams(n=2, max_new_tokens=10, temperature=temperature, seed=1)
    )
    gap = max_logprob_gap(model, prompts, batch, temperature)
    print(f"HF engine vs trainer log-prob gap at T={temperature}: {gap:.2e}")
    assert gap < 1e-4


def test_left_padded_batches_match_single_prompts(rig):
    _, _, prompts, _ = rig
    greedy = SamplingParams(n=1, max_new_tokens=10, temperature=0.0)
    whole = _engine(rig).generate(prompts, greedy)
    one_by_one = _engine(rig, batch_size=1).generate(prompts, greedy)
    assert torch.equal(whole.response_ids, one_by_one.response_ids)
    torch.testing.assert_close(whole.engine_logprobs, one_by_one.engine_logprobs, atol=1e-5, rtol=0)
    assert len(set(map(tuple, whole.response_ids.tolist()))) == 3, "greedy outputs should differ by prompt"


def test_top_k_one_samples_the_greedy_tokens(rig):
    _, _, prompts, _ = rig
    engine = _engine(rig)
    greedy = engine.generate(prompts, SamplingParams(n=1, max_new_tokens=8, temperature=0.0))
    top1 = engine.generate(prompts, SamplingParams(n=1, max_new_tokens=8, temperature=1.0, top_k=1, seed=3))
    assert torch.equal(greedy.response_ids, top1.response_ids)
    assert torch.allclose(
        top1.engine_logprobs[top1.response_mask], torch.tensor(0.0)
    )  # one token kept: p = 1


def test_eos_ends_responses_and_empty_responses_are_fine(rig):
    _, _, prompts, _ = rig
    greedy = SamplingParams(n=1, max_new_tokens=10, temperature=0.0)
    free = _engine(rig).generate(prompts, greedy).response_ids  # [3, 10]: no EOS met
    first = int(free[0, 0])
    batch = _engine(rig, eos_token_ids=(first,)).generate(prompts[:1], greedy)
    assert batch.response_ids.tolist() == [[first]] and batch.response_mask.tolist() == [[True]]
    assert batch.texts == [""] and batch.truncated.tolist() == [False]
    later = int(free[1, 4])
    stop = free[1].tolist().index(later) + 1  # the response ends at its first occurrence, EOS included
    batch = _engine(rig, eos_token_ids=(later,)).generate(prompts[1:2], greedy)
    assert batch.response_ids[0].tolist() == free[1, :stop].tolist()
    assert batch.truncated.tolist() == [False]


def test_suppressed_ids_are_never_sampled(rig):
    model, _, prompts, _ = rig
    greedy = SamplingParams(n=1, max_new_tokens=10, temperature=0.0)
    favourites = set(_engine(rig).generate(prompts, greedy).response_ids.flatten().tolist())
    suppress = tuple(sorted(favourites | set(range(100, 300)) | {1}))
    engine = _engine(rig, suppress_token_ids=suppress)
    hot = engine.generate(prompts, SamplingParams(n=8, max_new_tokens=12, temperature=2.0, seed=0))
    sampled = set(hot.response_ids[hot.response_mask].tolist())
    assert not sampled & set(suppress)
    assert not set(engine.generate(prompts, greedy).response_ids.flatten().tolist()) & set(suppress)
    assert max_logprob_gap(model, prompts, hot, 2.0, suppress) < 1e-4  # renormalised over allowed ids


@pytest.mark.parametrize("margin", [30.0, 300.0])
def test_a_favoured_placeholder_is_never_emitted(rig, margin):
    """The policy's logits favour a suppressed (placeholder) id by ``margin`` at the first response token:
    it is never emitted, greedy or sampled, and the reported log-probs are renormalised without it."""
    model, _, prompts, _ = rig
    placeholder, first = 450, SamplingParams(n=1, max_new_tokens=1, temperature=0.0)
    with favouring(model, prompts, placeholder, margin):
        assert _engine(rig).generate(prompts, first).response_ids[:, 0].tolist() == [placeholder] * 3
        engine = _engine(rig, suppress_token_ids=(placeholder,))
        for params in (first, SamplingParams(n=16, max_new_tokens=4, temperature=1.0, seed=0)):
            batch = engine.generate(prompts, params)
            assert placeholder not in batch.response_ids[batch.response_mask].tolist()
            assert batch.engine_logprobs[batch.response_mask].isfinite().all()


def test_checkpoint_generation_config_does_not_leak(rig):
    model, _, prompts, _ = rig
    params = SamplingParams(n=2, max_new_tokens=8, temperature=1.0, seed=5)
    plain = _engine(rig).generate(prompts, params)
    model.generation_config.repetition_penalty = 50.0
    model.generation_config.top_k = 1
    saved = model.generation_config
    model.train()
    batch = _engine(rig).generate(prompts, params)
    assert torch.equal(plain.response_ids, batch.response_ids)
    assert model.generation_config is saved and model.training


def test_sync_is_a_verified_no_op(rig):
    def never():
        raise AssertionError("weights must not be consumed")
        yield

    report = _engine(rig).sync_weights(never())
    assert report.verified and report.num_tensors == 0 and report.num_bytes == 0


def test_bad_input_is_named(rig):
    _, _, prompts, _ = rig
    with pytest.raises(RuntimeError, match="before setup"):
        HFEngine().generate(prompts, SamplingParams())
    with pytest.raises(ValueError, match=r"prompt_embeds\[1\]"):
        _engine(rig).generate([prompts[0], torch.zeros(3, 5)], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        _engine(rig).generate(prompts, SamplingParams(top_p=0.0))
    with pytest.raises(ValueError, match="batch_size"):
        HFEngine(batch_size=0)


def test_peft_wrapped_model(rig):
    """A peft wrapper is looked through (its generation config swap reaches the real model)."""
    peft = pytest.importorskip("peft")
    model, tokenizer, prompts, tmp_path = rig
    greedy = SamplingParams(n=1, max_new_tokens=8, temperature=0.0)
    plain = _engine(rig).generate(prompts, greedy)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lora.get_base_model().generation_config.repetition_penalty = 50.0
    engine = HFEngine()
    engine.setup(lora, tokenizer, tmp_path)
    assert torch.equal(engine.generate(prompts, greedy).response_ids, plain.response_ids)  # B = 0 at init
