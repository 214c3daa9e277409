"""Policy loss: KL estimators, aggregation modes (whole == micro-batched), PPO clip and dual-clip, GSPO's
sequence ratio, the engine/trainer mismatch corrections and the non-finite row finder."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qoq.rl.losses import (
    aggregate,
    entropy_from_logits,
    kl_penalty,
    loss_normalizer,
    mismatch_weights,
    nonfinite_rows,
    policy_loss,
    response_kl,
    sequence_log_ratio,
    truncated_is_weights,
)

MODES = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"]
LN2 = math.log(2.0)


def test_kl_estimators_by_hand():
    # pi = .5, ref = .25: x = log(ref / pi) = -ln 2.
    # k1 = ln 2; k2 = (ln 2)^2 / 2; k3 = e^-ln2 + ln 2 - 1 = ln 2 - .5
    logp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    assert float(kl_penalty(logp, ref, "k1")) == pytest.approx(LN2)
    assert float(kl_penalty(logp, ref, "k2")) == pytest.approx(LN2**2 / 2)
    assert float(kl_penalty(logp, ref, "k3")) == pytest.approx(LN2 - 0.5)
    assert float(kl_penalty(ref, ref, "k3")) == 0.0
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(logp, ref, "k4")


def test_k3_is_clamped_with_finite_gradients():
    logp = torch.tensor([[-100.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[0.0, -100.0]])
    kl = kl_penalty(logp, ref, "k3")
    assert kl.tolist() == [[10.0, 10.0]]  # e^100 - 101 and e^-100 + 99 both clamp to 10
    kl.sum().backward()
    assert torch.isfinite(logp.grad).all()


def test_aggregate_modes_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    # token_mean: (1 + 2 + 3 + 4) / 4 tokens; seq_mean_token_mean: (2 + 4) / 2 sequences;
    # seq_mean_token_sum: (6 + 4) / 2 sequences
    expected = {"token_mean": 2.5, "seq_mean_token_mean": 3.0, "seq_mean_token_sum": 5.0}
    for mode, value in expected.items():
        assert float(aggregate(values, mask, mode, loss_normalizer(mask, mode))) == pytest.approx(value)
    assert loss_normalizer(mask, "token_mean") == 4.0 and loss_normalizer(mask, "seq_mean_token_sum") == 2.0
    assert loss_normalizer([mask, mask[:1]], "token_mean") == 7.0
    assert loss_normalizer(torch.zeros(2, 3, dtype=torch.bool), "token_mean") == 1.0  # never 0


def ppo(ratios, adv, **kw):
    logp = torch.log(torch.tensor([ratios]))
    logp.requires_grad_(True)
    mask = torch.ones_like(logp, dtype=torch.bool)
    loss, metrics = policy_loss(
        logp, torch.zeros_like(logp), torch.tensor([adv]), mask, normalizer=len(ratios), **kw
    )
    return loss, metrics, logp


def test_ppo_clip_positive_advantage_by_hand():
    # A = 1: -r = [-.5, -1, -1.5]; -clip(r, .8, 1.2) = [-.8, -1, -1.2]; max = [-.5, -1, -1.2] -> mean -.9.
    # The clipped term is active only on the third token.
    loss, metrics, logp = ppo([0.5, 1.0, 1.5], 1.0)
    assert loss.item() == pytest.approx(-0.9)
    assert float(metrics["clip_frac"]) == pytest.approx(1 / 3)
    loss.backward()
    assert logp.grad[0, 2] == 0 and logp.grad[0, 0] != 0  # no gradient through the clipped token


def test_ppo_clip_higher():
    # eps_high = .3: the third token is clipped at 1.3 instead of 1.2 -> (-.5 - 1 - 1.3) / 3
    loss, _, _ = ppo([0.5, 1.0, 1.5], 1.0, eps_high=0.3)
    assert loss.item() == pytest.approx(-2.8 / 3)


def test_dual_clip_negative_advantage_by_hand():
    # A = -1: r = [.5, 1, 1.5, 4]; clip = [.8, 1, 1.2, 1.2]; max = [.8, 1, 1.5, 4] (clip active on token 0);
    # dual-clip c = 3 caps token 3 at 3: loss (.8 + 1 + 1.5 + 3) / 4 = 1.575 (without: 7.3 / 4 = 1.825).
    loss, metrics, _ = ppo([0.5, 1.0, 1.5, 4.0], -1.0, dual_clip=3.0)
    assert loss.item() == pytest.approx(1.575)
    assert float(metrics["clip_frac"]) == pytest.approx(0.25)
    assert float(metrics["dual_clip_frac"]) == pytest.approx(0.25)
    loss_plain, metrics_plain, _ = ppo([0.5, 1.0, 1.5, 4.0], -1.0)
    assert loss_plain.item() == pytest.approx(1.825) and float(metrics_plain["dual_clip_frac"]) == 0
    # dual-clip never touches positive advantages
    assert ppo([4.0], 1.0, dual_clip=3.0)[0].item() == pytest.approx(-1.2)
    with pytest.raises(ValueError, match="dual_clip"):
        ppo([1.0], 1.0, dual_clip=0.5)


def test_kl_entropy_and_is_weights_terms():
    logp = torch.log(torch.tensor([[0.5, 0.5]]))
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    mask = torch.ones(1, 2, dtype=torch.bool)
    base, _ = policy_loss(logp, logp, torch.tensor([1.0]), mask, normalizer=2.0)  # ratio 1: -1 per token
    assert float(base) == pytest.approx(-1.0)
    with_kl, metrics = policy_loss(
        logp, logp, torch.tensor([1.0]), mask, normalizer=2.0, ref_logp=ref, kl_coef=0.1
    )
    assert float(metrics["kl"]) == pytest.approx((LN2 - 0.5) / 2)  # k3 on token 0, 0 on token 1
    assert float(with_kl) == pytest.approx(-1.0 + 0.1 * (LN2 - 0.5) / 2)
    entropy = torch.tensor([[2.0, 4.0]])
    with_ent, metrics = policy_loss(
        logp, logp, torch.tensor([1.0]), mask, normalizer=2.0, entropy=entropy, entropy_coef=0.5
    )
    assert float(metrics["entropy"]) == pytest.approx(3.0) and float(with_ent) == pytest.approx(-1.0 - 1.5)
    weighted, _ = policy_loss(
        logp, logp, torch.tensor([1.0]), mask, normalizer=2.0, is_weights=torch.tensor([[0.5, 2.0]])
    )
    assert float(weighted) == pytest.approx((-0.5 - 2.0) / 2)
    assert all(not v.requires_grad for v in metrics.values())


def test_truncated_is_weights_and_response_kl():
    old, engine = torch.log(torch.tensor([[0.5, 0.2]])), torch.log(torch.tensor([[0.25, 0.4]]))
    torch.testing.assert_close(truncated_is_weights(old, engine, cap=1.5), torch.tensor([[1.5, 0.5]]))
    mask = torch.tensor([[True, False]])
    kl = response_kl(old, engine, mask)  # only token 0: k3 with x = ln(.25 / .5)
    assert float(kl[0]) == pytest.approx(LN2 - 0.5)


def test_entropy_from_logits():
    assert float(entropy_from_logits(torch.zeros(8))) == pytest.approx(math.log(8))
    assert float(entropy_from_logits(torch.tensor([0.0, -1e4]))) == pytest.approx(0.0, abs=1e-6)


def test_gspo_sequence_ratio_and_clipping_by_hand():
    # Response 0: token ratios e^.1, e^.3 -> s_0 = e^.2; response 1: one token, ratio e^-.5 -> s_1 = e^-.5.
    # Padding (row 1, token 1) must not count.
    old = torch.zeros(2, 2)
    logp = torch.tensor([[0.1, 0.3], [-0.5, 9.0]], requires_grad=True)
    mask = torch.tensor([[True, True], [True, False]])
    torch.testing.assert_close(sequence_log_ratio(logp, old, mask), torch.tensor([0.2, -0.5]))
    adv = torch.tensor([1.0, 1.0])
    s0, s1 = math.exp(0.2), math.exp(-0.5)
    # no clipping (wide range), seq_mean_token_mean: loss = -(s_0 + s_1) / 2
    loss, m = policy_loss(logp, old, adv, mask, eps_low=0.9, eps_high=0.9, agg="seq_mean_token_mean",
                          normalizer=2.0, ratio_level="sequence")
    assert loss.item() == pytest.approx(-(s0 + s1) / 2)
    loss.backward()
    # d/d logp_t of -s_i / (2 responses) = -s_i / (|y_i| * 2): the sequence objective's gradient
    torch.testing.assert_close(logp.grad, torch.tensor([[-s0 / 4, -s0 / 4], [-s1 / 2, 0.0]]))
    # clip .15: s_0 = 1.221 > 1.15 is clipped as a whole (A > 0); s_1 = .607 < .85 is not (A > 0 keeps min)
    logp.grad = None
    loss, m = policy_loss(logp, old, adv, mask, eps_low=0.15, eps_high=0.15, agg="seq_mean_token_mean",
                          normalizer=2.0, ratio_level="sequence")
    assert loss.item() == pytest.approx(-(1.15 + s1) / 2)
    assert float(m["clip_frac"]) == pytest.approx(0.5)  # response 0's two tokens, one of two responses
    loss.backward()
    assert logp.grad[0].abs().sum() == 0 and logp.grad[1, 0] != 0
    # the token-level ratio clips token 1 of response 0 only (e^.3 = 1.35 > 1.15; e^.1 = 1.105 < 1.15)
    loss_tok, m_tok = policy_loss(logp, old, adv, mask, eps_low=0.15, eps_high=0.15, agg="seq_mean_token_mean",
                                  normalizer=2.0)
    assert loss_tok.item() == pytest.approx(-((math.exp(0.1) + 1.15) / 2 + s1) / 2)
    assert float(m_tok["clip_frac"]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="ratio_level"):
        policy_loss(logp, old, adv, mask, normalizer=1.0, ratio_level="response")


def test_gspo_token_form_equals_the_sequence_objective_for_every_aggregation():
    # With one advantage per response, -A s_i on every token aggregated any way gives the same gradient as
    # the sequence objective sum_i w_i * -A_i s_i with s_i = exp(mean log-ratio) (w_i: the mode's weight).
    gen = torch.Generator().manual_seed(3)
    logp = -torch.rand(3, 4, generator=gen)
    old = logp + 0.05 * torch.randn(3, 4, generator=gen)
    mask = torch.tensor([[True] * 4, [True, True, False, False], [True, False, False, False]])
    adv = torch.tensor([0.5, -1.0, 2.0])
    lengths = mask.sum(-1).float()
    for mode in MODES:
        norm = loss_normalizer(mask, mode)
        a = logp.clone().requires_grad_(True)
        loss, _ = policy_loss(a, old, adv, mask, eps_low=10.0, eps_high=10.0, agg=mode, normalizer=norm,
                              ratio_level="sequence")
        loss.backward()
        b = logp.clone().requires_grad_(True)
        s = torch.exp(sequence_log_ratio(b, old, mask))
        weight = {"token_mean": lengths, "seq_mean_token_mean": torch.ones(3), "seq_mean_token_sum": lengths}[mode]
        ((-adv * s * weight).sum() / norm).backward()
        torch.testing.assert_close(loss, ((-adv * s.detach() * weight).sum() / norm))
        torch.testing.assert_close(a.grad, b.grad, msg=mode)


def test_mismatch_weights_by_hand():
    # rho = old / engine per token: row 0: [2, .5, 4]; row 1: [1, 8, pad]; row 2: [.25, pad, pad]
    old = torch.log(torch.tensor([[0.4, 0.1, 0.8], [0.5, 0.8, 0.3], [0.1, 0.9, 0.9]]))
    engine = torch.log(torch.tensor([[0.2, 0.2, 0.2], [0.5, 0.1, 0.9], [0.4, 0.1, 0.1]]))
    mask = torch.tensor([[True, True, True], [True, True, False], [True, False, False]])
    tis = mismatch_weights(old, engine, mask, "token_tis", high=2.0)
    torch.testing.assert_close(tis, torch.tensor([[2.0, 0.5, 2.0], [1.0, 2.0, 0.0], [0.25, 0.0, 0.0]]))
    torch.testing.assert_close(tis[mask], truncated_is_weights(old, engine, cap=2.0)[mask])
    ice = mismatch_weights(old, engine, mask, "icepop", low=0.5, high=5.0)
    torch.testing.assert_close(ice, torch.tensor([[2.0, 0.5, 4.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    # geometric means: row 0: (2 * .5 * 4)^(1/3) = 4^(1/3) = 1.587; row 1: (1 * 8)^(1/2) = 2.83; row 2: .25
    seq = mismatch_weights(old, engine, mask, "seq_mask", low=0.5, high=2.0)
    torch.testing.assert_close(seq, torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    # products: row 0: 4 (out of [.5, 2]); row 1: 8; row 2: .25. With [.2, 5]: row 0 and row 2 kept.
    prod = mismatch_weights(old, engine, mask, "seq_mask", low=0.2, high=5.0, seq_agg="sum")
    torch.testing.assert_close(prod, torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="mismatch correction"):
        mismatch_weights(old, engine, mask, "tis")
    with pytest.raises(ValueError, match="band"):
        mismatch_weights(old, engine, mask, "icepop", low=3.0, high=2.0)


def test_masked_tokens_have_zero_loss_and_are_counted():
    # IcePop drops token 1 (rho 8); the normaliser still counts it: loss = (-1 * 2 + 0 + -1 * 1) / 3 tokens
    logp = torch.zeros(1, 3, requires_grad=True)
    weights = mismatch_weights(
        torch.log(torch.tensor([[0.4, 0.8, 0.5]])), torch.log(torch.tensor([[0.2, 0.1, 0.5]])),
        torch.ones(1, 3, dtype=torch.bool), "icepop", low=0.5, high=5.0,
    )
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, m = policy_loss(logp, logp.detach(), torch.tensor([1.0]), mask, normalizer=3.0, is_weights=weights)
    assert loss.item() == pytest.approx(-3.0 / 3)
    assert float(m["is_masked_frac"]) == pytest.approx(1 / 3) and float(m["is_weight"]) == pytest.approx(1.0)
    loss.backward()
    assert logp.grad[0, 1] == 0 and logp.grad[0, 0] != 0


def test_nonfinite_rows():
    values = torch.tensor([[0.0, float("nan")], [float("-inf"), 1.0], [0.0, 0.0]])
    assert nonfinite_rows(values) == [0, 1]
    assert nonfinite_rows(values, torch.tensor([[True, False], [True, True], [True, True]])) == [1]
    assert nonfinite_rows(torch.tensor([1.0, float("inf"), 2.0])) == [1]


@settings(max_examples=30, deadline=None)
@given(
    st.integers(2, 7),
    st.integers(1, 6),
    st.integers(0, 10_000),
    st.sampled_from(MODES),
    st.sampled_from([None, 2.0]),
    st.sampled_from(["token", "sequence"]),
    st.sampled_from([None, "token_tis", "seq_mask", "icepop"]),
)
def test_micro_batches_sum_to_the_whole_batch(n, r, seed, mode, dual, level, correction):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, r, generator=gen) * 3
    old = logp + 0.3 * torch.randn(n, r, generator=gen)
    ref = logp + 0.3 * torch.randn(n, r, generator=gen)
    adv = torch.randn(n, generator=gen)
    lengths = torch.randint(0, r + 1, (n,), generator=gen)
    mask = torch.arange(r)[None] < lengths[:, None]  # [N, R], some responses may be empty
    engine = old + 0.3 * torch.randn(n, r, generator=gen)
    split = int(torch.randint(1, n, (1,), generator=gen))
    kw = {"agg": mode, "dual_clip": dual, "kl_coef": 0.05, "eps_high": 0.28, "ratio_level": level}
    norm = loss_normalizer([mask[:split], mask[split:]], mode)
    assert norm == loss_normalizer(mask, mode)

    def run(sl):
        lp = logp[sl].clone().requires_grad_(True)
        weights = None
        if correction is not None:  # computed per micro-batch, as the system does
            weights = mismatch_weights(old[sl], engine[sl], mask[sl], correction, low=0.7, high=1.4)
        loss, metrics = policy_loss(
            lp, old[sl], adv[sl], mask[sl], normalizer=norm, ref_logp=ref[sl], is_weights=weights, **kw
        )
        loss.backward()
        return loss, metrics, lp.grad

    whole, m_whole, g_whole = run(slice(None))
    a, m_a, g_a = run(slice(0, split))
    b, m_b, g_b = run(slice(split, None))
    torch.testing.assert_close(a + b, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([g_a, g_b]), g_whole, atol=1e-6, rtol=1e-5)
    for key in m_whole:
        torch.testing.assert_close(m_a[key] + m_b[key], m_whole[key], atol=1e-5, rtol=1e-5)
