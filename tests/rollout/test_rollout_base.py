"""The shared pieces of the rollout engines: batch assembly, parameter checks, special ids, the protocol."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from rollout_helpers import tiny_lm

import qoq.rl.rollout
from qoq.rl.rollout import HFEngine, RolloutEngine, VLLMEngine, assemble_rollout
from qoq.rl.rollout.base import check_prompt_embeds, check_sampling_params, resolve_special_ids
from qoq.types import SamplingParams


class _JoinTokenizer:
    """Decodes ids as 'a-b-c' so the texts are hand-checkable."""

    def batch_decode(self, seqs, skip_special_tokens):
        assert skip_special_tokens
        return ["-".join(map(str, s)) for s in seqs]


def test_assemble_rollout_pads_masks_and_groups():
    tokens = [[5, 2], [7], [7, 8, 9], []]
    logprobs = [[-0.5, -1.0], [-2.0], [-0.1, -0.2, -0.3], []]
    batch = assemble_rollout(
        tokens, logprobs, [False, True, True, False], n=2, pad_id=0, tokenizer=_JoinTokenizer()
    )
    assert batch.prompt_index.tolist() == [0, 0, 1, 1]
    assert batch.response_ids.tolist() == [[5, 2, 0], [7, 0, 0], [7, 8, 9], [0, 0, 0]]
    assert batch.response_mask.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]]
    want = torch.tensor([[-0.5, -1.0, 0], [-2.0, 0, 0], [-0.1, -0.2, -0.3], [0, 0, 0]])
    torch.testing.assert_close(batch.engine_logprobs, want)
    assert batch.texts == ["5", "7", "7-8-9", ""]  # the final EOS of an untruncated response is not text
    assert batch.truncated.tolist() == [False, True, True, False]
    assert len(batch) == 4


def test_assemble_rollout_without_logprobs_and_all_empty():
    batch = assemble_rollout([[], []], None, [False, False], n=1, pad_id=3, tokenizer=_JoinTokenizer())
    assert batch.response_ids.shape == (2, 0) and batch.response_mask.shape == (2, 0)
    assert batch.engine_logprobs is None
    assert batch.prompt_index.tolist() == [0, 1]


def test_assemble_rollout_rejects_sizes_that_do_not_group():
    with pytest.raises(ValueError, match="groups of 2"):
        assemble_rollout([[1], [2], [3]], None, [False] * 3, n=2, pad_id=0, tokenizer=_JoinTokenizer())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 0),
        ("max_new_tokens", 0),
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", 0),
        ("top_k", -2),
    ],
)
def test_check_sampling_params_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        check_sampling_params(SamplingParams(**{field: value}))


def test_check_prompt_embeds_names_the_prompt():
    check_prompt_embeds([torch.zeros(3, 8)], 8)
    with pytest.raises(ValueError, match=r"prompt_embeds\[1\]"):
        check_prompt_embeds([torch.zeros(3, 8), torch.zeros(3, 7)], 8)
    with pytest.raises(ValueError, match=r"prompt_embeds\[0\]"):
        check_prompt_embeds([torch.zeros(0, 8)], 8)
    with pytest.raises(ValueError, match="at least one"):
        check_prompt_embeds([], 8)


def test_resolve_special_ids_precedence_and_checks():
    model, tokenizer = tiny_lm()
    ids = resolve_special_ids(model, tokenizer, suppress_token_ids=(7, 1, 7), eos_token_ids=())
    assert ids.eos == (2, 0)  # the model's generation config: <|im_end|>, <|endoftext|>
    assert ids.pad == tokenizer.pad_token_id == 0
    assert ids.suppress == (1, 7)
    assert resolve_special_ids(model, tokenizer, (), eos_token_ids=(9,)).eos == (9,)
    with pytest.raises(ValueError, match="also in suppress_token_ids"):
        resolve_special_ids(model, tokenizer, suppress_token_ids=(2,), eos_token_ids=())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        resolve_special_ids(model, tokenizer, suppress_token_ids=(512,), eos_token_ids=())


def test_engines_implement_the_protocol():
    assert isinstance(HFEngine(), RolloutEngine)
    assert isinstance(VLLMEngine(), RolloutEngine)


def test_vllm_is_only_imported_inside_functions():
    """Importing qoq.rl.rollout must not need vllm: no module-level vllm import in the package, except in
    ``vllm_logits`` (vLLM's plugin, which vLLM imports by name and no module of the package imports)."""
    for path in Path(qoq.rl.rollout.__file__).parent.glob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if path.name != "vllm_logits.py":
                assert not any(n == "vllm" or n.startswith("vllm.") for n in names), f"{path.name} imports vllm"
            assert not any(n.endswith("vllm_logits") for n in names), f"{path.name} imports vllm_logits"
