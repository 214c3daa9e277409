"""The paper's policy path on a tiny random Qwen2.5-VL: exact split into LM / tower / merger, DRPO steps with
image (and ECG) rollouts, vLLM rollouts equal to HF's, and the clear error for missing released weights."""

from __future__ import annotations

import pytest
import torch
from scale_helpers import fit_system, vllm_greedy_after_sync

from qoq.models import adamw
from qoq.models.qwen_vl import PretrainedQwen2_5_VL, QwenVLPolicy, TinyQwen2_5_VL, tiny_qwen_vl_policy
from qoq.rl.advantages import DRPO
from qoq.rl.rewards import RewardFn
from qoq.rl.rollout import HFEngine
from qoq.strategies import layer_classes
from qoq.systems import PolicyOptimization
from qoq.systems.policy_optimization import LossConfig
from qoq.testing import make_batch
from qoq.types import PromptBatch, SamplingParams


@pytest.fixture(scope="module")
def native():
    """The unsplit tiny Qwen2.5-VL (same seed as the policy's)."""
    model, _ = TinyQwen2_5_VL()._load(None)
    return model.eval()


@pytest.fixture(scope="module")
def policy():
    return tiny_qwen_vl_policy().build()


def _batch(n_images: int = 2) -> PromptBatch:
    g = torch.Generator().manual_seed(0)
    questions = ["<image>\nIs this chest x-ray normal?", "<image>\nAny lesion?"]
    texts = [questions[i % 2] for i in range(n_images)] + ["<ecg>\nRhythm?"]
    images = torch.rand(n_images, 3, 64, 64, generator=g)
    modalities = {"image": (images, range(n_images)), "ecg": (torch.randn(1, 8, 2500, generator=g), [n_images])}
    return make_batch(texts, modalities=modalities, domains=["chest_xray", "dermoscopy"][:n_images] + ["ecg"])


def test_language_model_split_is_exact(policy, native):
    assert type(policy.lm).__name__ == "Qwen2ForCausalLM"
    ids = torch.randint(3, 400, (2, 9))
    with torch.no_grad():
        embeds = native.get_input_embeddings()(ids)
        torch.testing.assert_close(
            policy.lm(inputs_embeds=embeds).logits, native(inputs_embeds=embeds).logits, rtol=0, atol=0
        )


def test_tower_plus_merger_reproduce_the_native_image_features(policy, native):
    encoder = policy.encoders["image"]
    images = torch.rand(3, 3, 56, 56)
    with torch.no_grad():
        tokens = encoder(images)  # [M, units, 4 * vision_hidden]
        ours = policy.projector("image", tokens)  # [M, units, H]
        patches, grid = encoder.patchify(((images - encoder.mean) / encoder.std)[:, None])
        want = native.model.visual(patches, grid_thw=grid).pooler_output  # [M * units, H]
    assert tokens.shape == (3, 4, 4 * 32) and ours.shape == (3, 4, 64)  # 56 px: 2 x 2 units of 28 px
    torch.testing.assert_close(ours.reshape(-1, 64), want, rtol=0, atol=0)


def test_patches_equal_qwens_own_image_processor():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    image = torch.rand(56, 56, 3)
    processor = Qwen2VLImageProcessor(do_resize=False, do_rescale=False)
    want = processor(images=[image.numpy()], return_tensors="pt")
    encoder = tiny_qwen_vl_policy(ecg=False).encoders["image"]  # patchify needs no weights
    x = image.permute(2, 0, 1)[None]
    patches, grid = encoder.patchify(((x - encoder.mean) / encoder.std)[:, None])
    assert grid.tolist() == want["image_grid_thw"].tolist() == [[1, 4, 4]]
    torch.testing.assert_close(patches, want["pixel_values"], rtol=0, atol=1e-6)


def test_videos_go_through_the_tower_two_frames_per_temporal_patch(policy):
    encoder = policy.encoders["image"]
    frame = torch.rand(1, 3, 56, 56)
    with torch.no_grad():
        still = encoder(frame)  # an image is its frame repeated over the temporal patch
        pair = encoder(frame[:, None].expand(1, 2, 3, 56, 56))
        volume = encoder(torch.rand(1, 4, 3, 56, 56))
    torch.testing.assert_close(pair, still, rtol=0, atol=0)
    assert volume.shape == (1, 2 * 4, 4 * 32)  # 2 temporal patches x 2 x 2 merge units


def test_one_d_positions_equal_native_before_the_image_and_differ_after(policy, native):
    """What the prompt-embedding path changes: image tokens and the text after them get 1-D positions."""
    image_id, start_id = 300, 301  # stand-ins: the run-time tokenizer has no Qwen vision tokens
    for config in (native.config, native.model.config):
        config.image_token_id, config.vision_start_token_id = image_id, start_id
    encoder = policy.encoders["image"]
    image = torch.rand(1, 3, 56, 56)
    pre, post = torch.randint(3, 290, (7,)), torch.randint(3, 290, (8,))
    ids = torch.cat([pre, torch.tensor([start_id]), torch.full((4,), image_id), post])[None]
    with torch.no_grad():
        patches, grid = encoder.patchify(((image - encoder.mean) / encoder.std)[:, None])
        want = native(
            input_ids=ids,
            pixel_values=patches,
            image_grid_thw=grid,
            mm_token_type_ids=(ids == image_id).long(),
        ).logits[0]
        embeds = torch.cat(
            [
                policy.embed_ids(ids[0, :8]),
                policy.projector("image", encoder(image))[0],
                policy.embed_ids(post),
            ]
        )
        got = policy.lm(inputs_embeds=embeds[None]).logits[0]
    torch.testing.assert_close(
        got[:9], want[:9], rtol=0, atol=0
    )  # text and first image token: same positions
    assert (got[9:] - want[9:]).abs().max() > 1e-5  # M-RoPE positions differ from here on


def test_fsdp_units_are_the_decoder_layers_and_vision_blocks(policy):
    names = {c.__name__ for c in layer_classes(policy)}
    assert {"Qwen2DecoderLayer", "Qwen2_5_VLVisionBlock", "TransformerEncoderLayer"} <= names


def test_drpo_steps_with_image_and_ecg_rollouts():
    system = PolicyOptimization(
        tiny_qwen_vl_policy(),
        advantage=DRPO(window=10),
        reward=RewardFn(weights={"accuracy": 0.5, "format": 0.1, "length": 0.4}),
        rollout=HFEngine(),
        sampling=SamplingParams(n=2, max_new_tokens=8, seed=0),
        loss=LossConfig(kl_coef=0.01),
        optimizer=adamw(lr=1e-3, weight_decay=0.01),
    )
    system.configure_model()
    tower, merger, ecg_linear = (
        system.policy.encoders["image"].tower,
        system.policy.projector.mlps["image"],
        system.policy.projector.mlps["ecg"],
    )
    before = [
        torch.cat([p.detach().flatten().clone() for p in m.parameters()]) for m in (tower, merger, ecg_linear)
    ]
    trainer = fit_system(system, [_batch()], steps=2)
    after = [torch.cat([p.detach().flatten() for p in m.parameters()]) for m in (tower, merger, ecg_linear)]
    for name, b, a in zip(("vision tower", "merger", "ECG projection"), before, after):
        assert not torch.equal(b, a), f"the {name} did not train"
    metrics = trainer.logged_metrics
    assert torch.isfinite(metrics["train/loss"]) and metrics["train/response_length"] > 0
    assert system.advantage.state_dict()["stats"]["step"] == 1  # the last pushed step, 0-based


def test_image_prompts_have_one_token_per_merge_unit(policy):
    batch = _batch(1)
    embeds = policy.prompt_embeds(batch)
    text_only = policy.prompt_embeds(make_batch(["\nIs this chest x-ray normal?"], domains=["chest_xray"]))
    assert embeds[0].shape[0] - text_only[0].shape[0] == (56 // 28) ** 2
    assert embeds[1].shape[0] > 0  # the ECG prompt: one projected token


@pytest.mark.vllm
def test_vllm_rollouts_of_image_prompts_match_hf(policy, tmp_path):
    with torch.no_grad():
        prompts = [e.detach() for e in policy.prompt_embeds(_batch())]
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=12)
    hf = HFEngine()
    hf.setup(policy.lm, policy.tokenizer, tmp_path, eos_token_ids=policy.eos_token_ids)
    got = vllm_greedy_after_sync(policy, prompts, tmp_path / "engine")
    want = hf.generate(prompts, greedy)
    assert got.response_ids.tolist() == want.response_ids.tolist()


def test_released_weights_need_a_local_folder(tmp_path):
    missing = tmp_path / "QoQ-Med-VL-7B"
    with pytest.raises(FileNotFoundError, match="QoQ-Med-VL-7B.*config.json missing.*never downloads"):
        QwenVLPolicy(PretrainedQwen2_5_VL(str(missing)))


def test_image_size_must_fit_the_merge_units():
    with pytest.raises(ValueError, match="multiple of 28"):
        tiny_qwen_vl_policy(image_size=50)


@pytest.mark.vllm
def test_cli_fit_with_the_tiny_qwen_vl_policy_on_the_demo(tmp_path):
    """The real CLI: demo images, volumes and ECGs through the Qwen2.5-VL parts, vLLM rollouts, DRPO."""
    from scale_helpers import ROOT, load_ckpt

    from qoq.cli import run

    run(
        [
            "fit",
            "--config",
            str(ROOT / "configs/demo.yaml"),
            "--config",
            str(ROOT / "configs/smoke.yaml"),
            "--model.init_args.policy",
            str(ROOT / "configs/policy/tiny_qwen2_5_vl.yaml"),
            "--trainer.max_steps",
            "2",
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    )
    ckpt = load_ckpt(tmp_path)
    assert ckpt["global_step"] == 2
    keys = ckpt["state_dict"]
    assert any(k.startswith("policy.encoders.image.tower.blocks.") for k in keys)
    assert any(k.startswith("policy.projector.mlps.image.mlp.") for k in keys)
    assert not any(".visual." in k for k in keys)  # the tower lives in the encoder only
