"""LM builders: TinyLM determinism and size, PretrainedLM from a local folder, clear errors."""

import pytest
import torch

from qoq.models.builders import PretrainedLM, Qwen2_5_0_5B_Instruct, Qwen2_5_7B_Instruct, TinyLM
from qoq.testing import TINY_LM


def test_tiny_lm_is_deterministic_given_seed():
    a, _ = TinyLM(**TINY_LM).build()
    b, _ = TinyLM(**TINY_LM).build()
    c, _ = TinyLM(**TINY_LM, seed=1).build()
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(
        sa["model.layers.0.self_attn.q_proj.weight"], sc["model.layers.0.self_attn.q_proj.weight"]
    )


def _count(hidden: int, layers: int, kv_dim: int, inter: int, vocab: int = 512) -> int:
    attn = hidden * hidden + hidden + 2 * (hidden * kv_dim + kv_dim) + hidden * hidden  # q(+b), k/v(+b), o
    per_layer = attn + 3 * hidden * inter + 2 * hidden  # + gate/up/down + two RMSNorms
    return vocab * hidden + layers * per_layer + hidden  # tied embeddings + final norm


def test_tiny_lm_parameter_counts():
    tiny, tok = TinyLM(**TINY_LM).build()
    assert len(tok) == 512 and tiny.config.vocab_size == 512
    assert sum(p.numel() for p in tiny.parameters()) == _count(64, 2, 32, 192) == 131_648
    default, _ = TinyLM().build()  # the ~5M demo size
    assert sum(p.numel() for p in default.parameters()) == _count(256, 6, 128, 768) == 4_856_064
    assert default.lm_head.weight is default.model.embed_tokens.weight


def test_tiny_lm_stops_on_im_end():
    model, tok = TinyLM(**TINY_LM).build()
    assert model.generation_config.eos_token_id == [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    assert model.generation_config.pad_token_id == tok.pad_token_id


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(hidden_size=64, num_heads=4), "head_dim >= 32"),
        (dict(hidden_size=96, num_heads=3, num_kv_heads=2), "must divide"),
        (dict(dtype="int8"), "floating-point"),
    ],
)
def test_tiny_lm_rejects_bad_shapes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TinyLM(**kwargs)


def test_pretrained_lm_loads_a_local_folder(tmp_path):
    model, tok = TinyLM(**TINY_LM).build()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = PretrainedLM(str(tmp_path), dtype="float32").build()
    ids = torch.tensor([tok("<|im_start|>user\nhello")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert loaded_tok.pad_token_id == tok.pad_token_id


@pytest.mark.parametrize("builder", [PretrainedLM, Qwen2_5_7B_Instruct, Qwen2_5_0_5B_Instruct])
def test_missing_model_folder_is_a_clear_error(builder, tmp_path):
    lm = builder(str(tmp_path / "nowhere"))  # constructing does no work
    with pytest.raises(FileNotFoundError, match="nowhere.*never downloads"):
        lm.build()
