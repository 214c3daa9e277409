"""Policy: prompt splicing, placeholder errors, log-probs vs HF forward / generate, SFT, freezing, copies."""

import dataclasses
import functools

import pytest
import torch
from transformers import AutoModelForCausalLM

from qoq.models import DEFAULT_SYSTEM_PROMPT, adamw, FusionProjector, Policy, TinyLM, logprobs
from qoq.models.encoders import ECGEncoder
from qoq.testing import TINY_LM, tiny_text_policy



@pytest.fixture(scope="module")
def policy():
    return Policy.tiny().build().eval()


@pytest.fixture(scope="module")
def text_policy():
    return tiny_text_policy(system_prompt=None).build().eval()


def _items():
    return {
        "image": (torch.rand(3, 3, 32, 32), [0, 0, 1]),
        "ecg": (torch.randn(1, 8, 2500), [0]),
        "video": (torch.rand(1, 4, 3, 32, 32), [1]),
    }


TEXTS = ["A <image> then <ecg> and <image>.", "Only <video> and <image>"]


def test_prompt_embeds_splices_projected_tokens_in_order(policy, make_batch):
    batch = make_batch(TEXTS, [["normal"], ["abnormal"]], _items())
    tok = policy.tokenizer

    def text(s):
        return policy.embed_ids(torch.tensor(tok(s, add_special_tokens=False)["input_ids"]))

    with torch.no_grad():
        embeds = policy.prompt_embeds(batch)
        proj = {k: policy.projector(k, policy.encoders[k](m.values)) for k, m in batch.modalities.items()}
        chat = policy.chat_texts(batch.texts)
        assert chat[0].startswith(
            f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nA "
        )
        assert chat[0].endswith("and <image>.<|im_end|>\n<|im_start|>assistant\n")
        a, rest = chat[0].split("<image>", 1)
        b, rest = rest.split("<ecg>", 1)
        c, d = rest.split("<image>", 1)
        expected0 = [text(a), proj["image"][0], text(b), proj["ecg"][0], text(c), proj["image"][1], text(d)]
        a, rest = chat[1].split("<video>", 1)
        b, c = rest.split("<image>", 1)
        expected1 = [text(a), proj["video"][0], text(b), proj["image"][2], text(c)]
    assert [p.shape[0] for p in (proj["image"][0], proj["ecg"][0], proj["video"][0])] == [4, 1, 4]
    torch.testing.assert_close(embeds[0], torch.cat(expected0), rtol=0, atol=0)
    torch.testing.assert_close(embeds[1], torch.cat(expected1), rtol=0, atol=0)


def test_gradients_reach_trainable_encoders_and_projector(make_batch):
    frozen = Policy.tiny(freeze=["encoders"]).build()
    trained = Policy.tiny().build()
    batch = make_batch(TEXTS, [["normal"], ["abnormal"]], _items())
    for pol in (frozen, trained):
        sum(e.square().sum() for e in pol.prompt_embeds(batch)).backward()
        assert all(p.grad is not None for p in pol.projector.parameters())
    assert all(p.grad is not None for p in trained.encoders.parameters())
    assert not any(p.requires_grad or p.grad is not None for p in frozen.encoders.parameters())
    frozen.train()
    assert frozen.training and not any(m.training for m in frozen.encoders.modules())


@pytest.mark.parametrize(
    ("texts", "owners", "match"),
    [
        (["<image> <image>", "no image"], [0], "rec-0.*2 <image> placeholder.*1 'image' item"),
        (["<image>", "no image"], [0, 1], "rec-1.*0 <image> placeholder.*1 'image' item"),
        (["<image>", "<ecg>"], [0], "rec-1.*1 <ecg> placeholder.*0 'ecg' item"),
        (["<image>", "x"], [0, 5], "owner 5 outside"),
    ],
)
def test_placeholder_item_mismatch_is_a_clear_error(policy, make_batch, texts, owners, match):
    images = torch.rand(len(owners), 3, 32, 32)
    with pytest.raises(ValueError, match=match):
        policy.prompt_embeds(make_batch(texts, [["normal"]] * 2, {"image": (images, owners)}))


def test_items_without_encoder_and_long_prompts_raise(text_policy, make_batch):
    batch = make_batch(["<ecg>"], [["normal"]], {"ecg": (torch.randn(1, 8, 2500), [0])})
    with pytest.raises(ValueError, match="rec-0.*no 'ecg' encoder"):
        text_policy.prompt_embeds(batch)
    short = tiny_text_policy(max_prompt_tokens=8).build()
    with pytest.raises(ValueError, match="rec-0.*max_prompt_tokens=8"):
        short.prompt_embeds(make_batch(["a question"], [["normal"]]))


def test_constructor_checks():
    ecg = ECGEncoder(samples=500, dim=32, depth=1, heads=1)
    with pytest.raises(ValueError, match="projector"):
        Policy(TinyLM(**TINY_LM), encoders={"ecg": ecg})
    with pytest.raises(ValueError, match="no projection for the 'ecg'"):
        Policy(TinyLM(**TINY_LM), encoders={"ecg": ecg}, projector=FusionProjector({"image": 32}, 64))
    with pytest.raises(ValueError, match="32-dim tokens, projector expects 16"):
        Policy(TinyLM(**TINY_LM), encoders={"ecg": ecg}, projector=FusionProjector({"ecg": 16}, 64))
    with pytest.raises(ValueError, match="not modality kinds"):
        Policy(TinyLM(**TINY_LM), encoders={"audio": ecg}, projector=FusionProjector({"audio": 32}, 64))
    with pytest.raises(ValueError, match="quantization"):
        tiny_text_policy(quantization="3bit")
    with pytest.raises(ValueError, match="hidden_size=32"):
        Policy(TinyLM(**TINY_LM), encoders={"ecg": ecg}, projector=FusionProjector({"ecg": 32}, 32)).build()
    with pytest.raises(ValueError, match="no submodule 'projector'"):
        tiny_text_policy(freeze=["projector"]).build()
    with pytest.raises(RuntimeError, match="not built"):
        tiny_text_policy().tokenizer  # noqa: B018


def test_build_is_idempotent_and_token_ids(text_policy):
    lm = text_policy.lm
    assert text_policy.build().lm is lm
    tok = text_policy.tokenizer
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert text_policy.eos_token_ids == sorted([im_end, tok.eos_token_id])
    assert text_policy.suppress_token_ids == [im_start]
    assert text_policy.hidden_size == 64


def _responses(tok):
    texts = ["<think>ok</think> \\boxed{normal}", "\\boxed{abnormal}", "abnormal"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    r = max(map(len, ids))
    response_ids = torch.full((3, r), tok.pad_token_id)
    mask = torch.zeros(3, r, dtype=torch.bool)
    for n, row in enumerate(ids):
        response_ids[n, : len(row)] = torch.tensor(row)
        mask[n, : len(row)] = True
    return response_ids, mask


def test_response_logprobs_equal_a_direct_forward_on_ids(text_policy, make_batch):
    batch = make_batch(["What is it?", "Is the chest normal or abnormal? Answer briefly."], [["normal"]] * 2)
    tok = text_policy.tokenizer
    prompt_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in text_policy.chat_texts(batch.texts)]
    response_ids, mask = _responses(tok)
    index = torch.tensor([0, 1, 1])
    with torch.no_grad():
        embeds = text_policy.prompt_embeds(batch)
        logp, entropy = text_policy.response_logprobs(embeds, response_ids, mask, index, with_entropy=True)
        logp_t, _ = text_policy.response_logprobs(embeds, response_ids, mask, index, temperature=2.0)
        for n, p in enumerate(index.tolist()):
            k = int(mask[n].sum())
            ids = torch.tensor([prompt_ids[p] + response_ids[n, :k].tolist()])
            logits = text_policy.lm(ids).logits[0, len(prompt_ids[p]) - 1 : -1]  # [k, V]
            for t, got in ((1.0, logp), (2.0, logp_t)):
                ref = torch.log_softmax(logits / t, -1)
                torch.testing.assert_close(got[n, :k], ref.gather(-1, response_ids[n, :k, None])[:, 0])
            ref = torch.log_softmax(logits, -1)
            torch.testing.assert_close(entropy[n, :k], -(ref.exp() * ref).sum(-1))
    assert (logp[~mask] == 0).all() and (entropy[~mask] == 0).all()
    assert logp.shape == entropy.shape == (3, response_ids.shape[1])


def test_response_logprobs_equal_hf_generate_scores(policy, make_batch):
    batch = make_batch(TEXTS, [["normal"], ["abnormal"]], _items())
    r = 8
    with torch.no_grad():
        embeds = policy.prompt_embeds(batch)
        sequences, scores = [], []
        for e in embeds:
            out = policy.lm.generate(
                inputs_embeds=e[None],
                attention_mask=torch.ones(1, len(e), dtype=torch.long),
                do_sample=False,
                max_new_tokens=r,
                min_new_tokens=r,
                output_logits=True,
                return_dict_in_generate=True,
            )
            sequences.append(out.sequences[0, -r:])
            scores.append(torch.log_softmax(torch.stack(out.logits, 1)[0].float(), -1))  # [R, V]
        response_ids = torch.stack(sequences)
        logp, _ = policy.response_logprobs(
            embeds, response_ids, torch.ones_like(response_ids, dtype=torch.bool), torch.tensor([0, 1])
        )
    expected = torch.stack(scores).gather(-1, response_ids[..., None])[..., 0]
    torch.testing.assert_close(logp, expected, rtol=0, atol=1e-4)


def test_sft_reduces_loss_and_freeze_holds(make_batch, fit):
    pol = Policy.tiny(freeze=["encoders"], optimizer=adamw(lr=3e-3))
    refs = ["<think>clear</think>\n```json\n[]\n```\n\\boxed{normal}", "\\boxed{abnormal}"]
    batch = make_batch(TEXTS, [["normal"], ["abnormal"]], _items(), references=refs)
    pol.build()
    before = {n: p.detach().clone() for n, p in pol.named_parameters()}
    with torch.no_grad():
        loss_before = pol.sft_loss(batch).item()
    fit(pol, [batch], steps=8)
    with torch.no_grad():
        assert pol.sft_loss(batch).item() < 0.7 * loss_before
    after = dict(pol.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert not any(n.startswith("encoders.") for n in changed)
    assert any(n.startswith("projector.") for n in changed) and any(
        n.startswith("language_model.") for n in changed
    )
    twin = pol.frozen_copy()  # after a fit: the Trainer is not copied along
    assert twin._trainer is None and pol._trainer is not None


def test_frozen_copy_shares_nothing(text_policy):
    twin = text_policy.frozen_copy()
    assert not twin.training and not any(p.requires_grad for p in twin.parameters())
    assert {p.data_ptr() for p in twin.parameters()}.isdisjoint(
        p.data_ptr() for p in text_policy.parameters()
    )
    ids = torch.randint(3, 500, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(twin.lm(ids).logits, text_policy.lm(ids).logits)
    with pytest.raises(RuntimeError, match="frozen_copy"), text_policy.reference_mode():
        pass


def test_frozen_copy_shares_the_options_and_copies_nothing_they_reach():
    """LightningCLI's optimizer callable holds the CLI, and through it the whole run: the frozen copy keeps the
    (immutable) options as they are instead of deep-copying everything reachable from them."""

    class Run:  # stands for the CLI an optimizer callable holds on to
        copies = 0

        def __deepcopy__(self, memo):
            Run.copies += 1
            return Run()

    pol = tiny_text_policy(optimizer=functools.partial(_optimizer_with_owner, owner=Run()))
    twin = pol.frozen_copy()
    assert twin.options is pol.options and Run.copies == 0


def _optimizer_with_owner(params, owner):  # an optimizer callable that references another object
    return torch.optim.AdamW(params)


def test_save_lm_loads_in_transformers(text_policy, tmp_path):
    folder = text_policy.save_lm(tmp_path / "lm")
    loaded = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    ids = torch.randint(3, 500, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, text_policy.lm(ids).logits)
    assert (folder / "tokenizer.json").is_file() and (folder / "chat_template.jinja").is_file()


def test_weights_from_another_tokenizer_are_refused(text_policy, tmp_path):
    from qoq.systems.policy_optimization import load_policy_weights

    path = tmp_path / "sft.ckpt"
    checkpoint = {"state_dict": text_policy.state_dict()}
    text_policy.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    twin = tiny_text_policy(system_prompt=None).build()
    load_policy_weights(twin, path)  # the same config builds the same tokenizer
    corpus = {"extra_corpus": lambda: ["zebra giraffe okapi"] * 50}
    other = tiny_text_policy({**TINY_LM, **corpus}, system_prompt=None).build()
    assert other.tokenizer_fingerprint != text_policy.tokenizer_fingerprint
    with pytest.raises(ValueError, match="another tokenizer"):
        load_policy_weights(other, path)


def _both_paths(pol, embeds, response_ids, mask, index, **kwargs):
    """logp, entropy and every gradient (parameters and ``embeds``) of the shared-prompt and per-row paths."""
    out = {}
    for share in (True, False):
        pol.zero_grad(set_to_none=True)
        for e in embeds:
            e.grad = None
        logp, entropy = pol.response_logprobs(
            embeds, response_ids, mask, index, with_entropy=True, share_prompts=share, **kwargs
        )
        (logp.sum() + 0.3 * entropy.sum()).backward()
        grads = {n: p.grad.clone() for n, p in pol.named_parameters() if p.grad is not None}
        grads |= {f"embeds.{i}": e.grad.clone() for i, e in enumerate(embeds) if e.grad is not None}
        out[share] = (logp.detach(), entropy.detach(), grads)
    return out[True], out[False]


def _assert_paths_agree(shared, per_row):
    torch.testing.assert_close(shared[0], per_row[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(shared[1], per_row[1], rtol=0, atol=1e-5)
    assert shared[2].keys() == per_row[2].keys() and shared[2]
    for name, grad in per_row[2].items():
        torch.testing.assert_close(shared[2][name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_shared_prompt_logprobs_and_gradients_equal_the_per_row_path():
    pol = tiny_text_policy(system_prompt=None).build().train()
    gen = torch.Generator().manual_seed(0)
    h = pol.hidden_size
    # prompt lengths differ (one of a single token); prompt 3 is unused; groups of different sizes, out of order
    embeds = [torch.randn(length, h, generator=gen).requires_grad_() for length in (5, 1, 12, 3, 7)]
    index = torch.tensor([0, 2, 0, 2, 2, 1, 1, 4, 0])
    response_ids = torch.randint(0, 400, (len(index), 6), generator=gen)
    mask = torch.ones_like(response_ids, dtype=torch.bool)
    mask[1, 3:] = False
    mask[5, 1:] = False
    shared, per_row = _both_paths(pol, embeds, response_ids, mask, index, temperature=0.7)
    _assert_paths_agree(shared, per_row)
    assert "embeds.3" not in shared[2]  # an unused prompt is not run
    assert (shared[0][~mask] == 0).all()


def test_shared_prompts_reach_trainable_encoders_like_the_per_row_path(make_batch):
    pol = Policy.tiny().build().train()
    batch = make_batch(TEXTS, [["normal"], ["abnormal"]], _items())
    index = torch.tensor([1, 0, 1, 0])
    response_ids = torch.randint(0, 400, (4, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(response_ids, dtype=torch.bool)
    out = []
    for share in (True, False):
        pol.zero_grad(set_to_none=True)
        logp, _ = pol.response_logprobs(pol.prompt_embeds(batch), response_ids, mask, index, share_prompts=share)
        logp.sum().backward()
        out.append((logp.detach(), {n: p.grad.clone() for n, p in pol.named_parameters() if p.grad is not None}))
    (logp_s, grads_s), (logp_r, grads_r) = out
    torch.testing.assert_close(logp_s, logp_r, rtol=0, atol=1e-5)
    assert grads_s.keys() == grads_r.keys() and any(k.startswith("encoders.") for k in grads_s)
    for name in grads_r:
        torch.testing.assert_close(grads_s[name], grads_r[name], rtol=1e-4, atol=1e-5, msg=name)


def test_policy_flag_and_gradient_checkpointing_select_the_per_row_path(monkeypatch):
    pol = tiny_text_policy(system_prompt=None, share_prompts=False).build().train()
    calls = []
    per_row = logprobs.per_row_logits
    monkeypatch.setattr(logprobs, "per_row_logits", lambda *a: calls.append(1) or per_row(*a))
    embeds = [torch.randn(4, pol.hidden_size), torch.randn(6, pol.hidden_size)]
    args = (torch.randint(0, 400, (3, 5)), torch.ones(3, 5, dtype=torch.bool), torch.tensor([0, 1, 1]))
    pol.response_logprobs(embeds, *args)
    assert calls == [1]
    pol.options = dataclasses.replace(pol.options, share_prompts=True)
    pol.response_logprobs(embeds, *args)
    assert calls == [1]
    pol.lm.gradient_checkpointing_enable()  # transformers gives no cache then: fall back
    logp, _ = pol.response_logprobs(embeds, *args)
    assert calls == [1, 1]
    torch.testing.assert_close(logp, pol.response_logprobs(embeds, *args, share_prompts=False)[0])


def test_prompt_batch_select_keeps_items_with_their_prompts(policy, make_batch):
    texts = ["A <image> then <ecg> and <image>.", "Only <video> and <image>", "Plain text", "<image> last"]
    items = {
        "image": (torch.rand(4, 3, 32, 32), [0, 0, 1, 3]),
        "ecg": (torch.randn(1, 8, 2500), [0]),
        "video": (torch.rand(1, 4, 3, 32, 32), [1]),
    }
    batch = make_batch(texts, [["normal"]] * 4, items)
    sub = batch.select([3, 1])
    assert sub.texts == [texts[3], texts[1]] and sub.ids == ["rec-3", "rec-1"]
    assert sub.modalities["image"].owner.tolist() == [0, 1] and len(sub.modalities["ecg"].values) == 0
    with torch.no_grad():
        full, part = policy.prompt_embeds(batch), policy.prompt_embeds(sub)
    torch.testing.assert_close(part[0], full[3], rtol=0, atol=0)
    torch.testing.assert_close(part[1], full[1], rtol=0, atol=0)
