"""FusionProjector: pooling and projection shapes, errors, and the alignment stage."""

import pytest
import torch
from torch import nn

from qoq.models.builders import TinyLM
from qoq.models.encoders import ECGEncoder
from qoq.models.projector import FusionProjector


def test_shapes_per_kind():
    proj = FusionProjector({"image": 32, "video": 16, "ecg": 8}, 64, tokens_per_item={"image": 4, "ecg": 1})
    assert proj("image", torch.randn(2, 16, 32)).shape == (2, 4, 64)
    assert proj("image", torch.randn(2, 3, 32)).shape == (2, 3, 64)  # fewer tokens than 4: all kept
    assert proj("video", torch.randn(2, 7, 16)).shape == (2, 7, 64)  # unlisted kind: every token kept
    assert proj("ecg", torch.randn(5, 50, 8)).shape == (5, 1, 64)
    assert FusionProjector({"ecg": 8}, 64, tokens_per_item=2)("ecg", torch.randn(1, 50, 8)).shape == (
        1,
        2,
        64,
    )


def test_mlp_layout():
    mlp = FusionProjector({"ecg": 8}, 64, depth=3).mlps["ecg"]
    assert [type(m) for m in mlp] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert mlp[0].in_features == 8 and mlp[-1].out_features == 64


def test_pooling_is_token_averaging():
    proj = FusionProjector({"ecg": 2}, 2, tokens_per_item=2, depth=1)
    with torch.no_grad():
        proj.mlps["ecg"][0].weight.copy_(torch.eye(2))
        proj.mlps["ecg"][0].bias.zero_()
    tokens = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, 4.0], [7.0, 10.0]]])
    torch.testing.assert_close(proj("ecg", tokens), torch.tensor([[[2.0, 1.0], [6.0, 7.0]]]))


def test_errors():
    proj = FusionProjector({"ecg": 8}, 64)
    with pytest.raises(KeyError, match="'image'"):
        proj("image", torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match=r"\[M, T, 8\]"):
        proj("ecg", torch.randn(1, 4, 9))
    with pytest.raises(ValueError, match="depth"):
        FusionProjector({"ecg": 8}, 64, depth=0)
    with pytest.raises(ValueError, match="image"):
        FusionProjector({"ecg": 8}, 64, tokens_per_item={"image": 1})
    with pytest.raises(RuntimeError, match="encoders"):
        proj.alignment_loss(None)


def _aligner():
    lm = TinyLM(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1)
    ecg = ECGEncoder(samples=500, dim=32, depth=1, heads=1)
    return FusionProjector(
        {"ecg": 32}, 64, tokens_per_item=1, encoders={"ecg": ecg}, lm=lm, temperature=0.1, lr=1e-2
    )


def test_answer_embeddings_are_mean_lm_embeddings():
    proj = _aligner()
    proj.configure_model()
    model, tok = TinyLM(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1).build()
    ids = tok("atrial fibrillation", add_special_tokens=False)["input_ids"]
    expected = model.get_input_embeddings().weight[ids].mean(0)
    torch.testing.assert_close(proj.answer_embeddings(["atrial fibrillation"])[0], expected.detach())


def test_alignment_stage_trains_only_the_projector(make_batch, fit):
    proj = _aligner()
    ecgs = torch.randn(4, 8, 500)
    answers = [["normal"], ["atrial fibrillation"], ["normal"], ["hypertrophy"]]
    batch = make_batch(["<ecg>"] * 4, answers, {"ecg": (ecgs, [0, 1, 2, 3])})
    encoder_before = {k: v.clone() for k, v in proj.encoders.state_dict().items()}
    before = proj.alignment_loss(batch).item()
    fit(proj, [batch], steps=20)
    assert proj.alignment_loss(batch).item() < 0.5 * before
    assert all(torch.equal(v, encoder_before[k]) for k, v in proj.encoders.state_dict().items())
    assert not any(k.startswith(("lm", "answer_table")) for k in proj.state_dict())  # the LM is not kept
    assert proj.alignment_loss(make_batch(["text only"], [["normal"]])) is None
