"""Modality encoders: token shapes, input handling, weight loading, and their classification stage."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qoq.models.encoders import ECGEncoder, VisionEncoder, VolumeEncoder

VIT = {"depth": 1, "embed_dim": 32, "num_heads": 1, "patch_size": 8, "mlp_ratio": 2.0}


def vision(**kwargs):
    return VisionEncoder(image_size=32, backbone_kwargs=VIT, **kwargs)


def test_vision_encoder_patch_tokens():
    enc = vision()
    assert enc.out_dim == 32
    assert enc(torch.rand(2, 3, 32, 32)).shape == (2, 16, 32)  # (32/8)^2 patches, class token dropped
    assert enc(torch.rand(2, 3, 48, 40)).shape == (2, 16, 32)  # resized to image_size
    assert enc(torch.rand(2, 1, 32, 32)).shape == (2, 16, 32)  # grey repeated to 3 channels
    with pytest.raises(ValueError, match=r"\[M, 3, h, w\]"):
        enc(torch.rand(3, 32, 32))


class PixelTokens(nn.Module):
    """A stand-in vision tower: every pixel becomes a token of its 3 channel values."""

    embed_dim = 3

    def forward(self, x):
        return x.flatten(2).transpose(1, 2)


def test_wrapped_module_gets_normalised_inputs():
    enc = VisionEncoder(PixelTokens(), image_size=2, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    x = torch.tensor([[[[0.0, 1.0], [0.5, 0.5]], [[0.25, 0.25], [0.0, 1.0]], [[1.0, 0.0], [0.5, 2.0]]]])
    expected = torch.tensor([[[-1.0, 0.0, 0.5], [1.0, 0.0, 0.0], [0.0, -1.0, 0.25], [0.0, 3.0, 1.0]]])
    assert enc.out_dim == 3
    torch.testing.assert_close(enc(x), expected)


def test_wraps_an_hf_vision_model():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    enc = VisionEncoder(SiglipVisionModel(config), image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert enc.out_dim == 32
    assert enc(torch.rand(2, 3, 32, 32)).shape == (2, 16, 32)


def test_unknown_width_asks_for_out_dim():
    with pytest.raises(ValueError, match="out_dim"):
        VisionEncoder(nn.Identity())


@pytest.mark.parametrize("form", ["safetensors", "lightning"])
def test_checkpoint_loaded_in_configure_model(tmp_path, form):
    source = vision(labels=("a", "b"))
    if form == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "vit.safetensors"
        save_file({k: v.contiguous() for k, v in source.backbone.state_dict().items()}, str(path))
    else:  # a checkpoint of the encoder's own stage: keys "backbone.*" and "head.*"
        path = tmp_path / "stage.ckpt"
        torch.save({"state_dict": source.state_dict()}, path)
    target = vision(checkpoint=str(path))
    x = torch.rand(1, 3, 32, 32)
    assert not torch.equal(target(x), source(x))
    target.configure_model()
    torch.testing.assert_close(target(x), source(x))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        vision(checkpoint=str(tmp_path / "missing.pt")).configure_model()
    torch.save({"blocks.0.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="does not fit"):
        vision(checkpoint=str(tmp_path / "other.pt")).configure_model()


def test_volume_encoder_frame_tokens():
    enc = VolumeEncoder(vision(), num_frames=4)
    assert enc(torch.rand(2, 4, 3, 32, 32)).shape == (2, 4, 32)
    assert enc(torch.rand(2, 6, 3, 32, 32)).shape == (2, 6, 32)  # positions resampled
    assert VolumeEncoder(vision(), num_frames=4, tokens_per_frame=2)(torch.rand(1, 4, 3, 32, 32)).shape == (
        1,
        8,
        32,
    )
    # identical frames differ only by their frame position embedding
    frames = torch.rand(1, 1, 3, 32, 32).expand(1, 4, 3, 32, 32)
    out = enc(frames)
    torch.testing.assert_close(out[0] - out[0, :1], enc.frame_pos - enc.frame_pos[:1])


def test_ecg_encoder_tokens_and_shape_errors():
    enc = ECGEncoder(leads=8, samples=2500, patch_size=50, dim=64)
    assert enc(torch.randn(3, 8, 2500)).shape == (3, 50, 64)
    with pytest.raises(ValueError, match=r"\[M, 8, 2500\]"):
        enc(torch.randn(3, 12, 2500))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ECGEncoder(samples=1000, patch_size=300)


def _loss(enc, values, target):
    with torch.no_grad():
        logits = enc.classify(values)
    if enc.multi_label:
        return F.binary_cross_entropy_with_logits(logits, target).item()
    return F.cross_entropy(logits, target).item()


def test_vision_encoder_stage_reduces_loss(make_batch, fit):
    images = torch.rand(4, 3, 32, 32)
    images[2:] *= 0.2  # class "abnormal" is darker
    batch = make_batch(
        ["<image>"] * 4,
        [["normal"], ["normal"], ["abnormal"], ["abnormal"]],
        {"image": (images, [0, 1, 2, 3])},
    )
    enc = vision(labels=("normal", "abnormal"), lr=3e-3)
    target = torch.tensor([0, 0, 1, 1])
    before = _loss(enc, images, target)
    fit(enc, [batch], steps=15)
    assert _loss(enc, images, target) < 0.5 * before


def test_volume_encoder_stage_reduces_loss(make_batch, fit):
    volumes = torch.rand(2, 3, 3, 32, 32)
    volumes[1] *= 0.2
    batch = make_batch(["<video>"] * 2, [["normal"], ["abnormal"]], {"video": (volumes, [0, 1])})
    enc = VolumeEncoder(vision(), num_frames=3, labels=("normal", "abnormal"), lr=3e-3)
    before = _loss(enc, volumes, torch.tensor([0, 1]))
    fit(enc, [batch], steps=15)
    assert _loss(enc, volumes, torch.tensor([0, 1])) < 0.5 * before


def test_ecg_encoder_multi_label_stage_reduces_loss(make_batch, fit):
    ecgs = torch.randn(3, 8, 500)
    labels = ("normal", "atrial fibrillation", "hypertrophy")
    answers = [["normal"], ["atrial fibrillation", "hypertrophy"], ["hypertrophy"]]
    batch = make_batch(["<ecg>"] * 3, answers, {"ecg": (ecgs, [0, 1, 2])}, labels=labels)
    enc = ECGEncoder(samples=500, dim=32, depth=1, heads=1, labels=labels, multi_label=True, lr=3e-3)
    target = torch.tensor([[1.0, 0, 0], [0, 1, 1], [0, 0, 1]])
    before = _loss(enc, ecgs, target)
    fit(enc, [batch], steps=15)
    assert _loss(enc, ecgs, target) < 0.5 * before


def test_stage_label_errors_and_skips(make_batch):
    enc = ECGEncoder(samples=500, dim=32, depth=1, heads=1, labels=("normal", "abnormal"))
    ecg = {"ecg": (torch.randn(1, 8, 500), [0])}
    with pytest.raises(ValueError, match="rec-0.*not in ECGEncoder.labels"):
        enc.training_step(make_batch(["<ecg>"], [["stemi"]], ecg), 0)
    with pytest.raises(ValueError, match="rec-0.*multi_label"):
        enc.training_step(make_batch(["<ecg>"], [["normal", "abnormal"]], ecg), 0)
    assert enc.training_step(make_batch(["text only"], [["normal"]]), 0) is None
    with pytest.raises(RuntimeError, match="labels"):
        ECGEncoder(samples=500, dim=32).training_step(make_batch(["<ecg>"], [["normal"]], ecg), 0)
