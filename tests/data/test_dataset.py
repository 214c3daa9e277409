"""ClinicalDataset, prompt texts, SFT references and the collate into PromptBatch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qoq.data.dataset import ClinicalDataset, collate, prompt_text, reference_response
from qoq.data.demo import build_demo
from qoq.data.domains import DOMAINS
from qoq.data.errors import DataError, SkipCounter
from qoq.data.loaders import ECGSpec
from qoq.data.manifest import read_manifest
from qoq.data.records import Record
from qoq.rl.rewards import RESPONSE_FORMAT, extract_answer, format_reward, parse_boxes

SMALL_ECG = ECGSpec(leads=("I", "II"), sample_rate=10, seconds=1.0)


def _png(path: Path, h: int, w: int, value: int = 120) -> str:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, dtype=np.uint8)).save(path)
    return str(path)


def _ecg(path: Path) -> str:
    np.save(path, np.arange(20, dtype=np.float32).reshape(2, 10) / 10)  # [2 leads, 1 s at 10 Hz]
    return str(path)


def _record(rid: str, domain: str = "ct", **fields) -> Record:
    counts = {k: len(fields.get(k, ())) for k in ("images", "videos", "time_series")}
    problem = "<image>" * counts["images"] + "<video>" * counts["videos"] + "<ecg>" * counts["time_series"]
    return Record(
        id=rid,
        problem=problem + " Which? Options: a, b.",
        answer=("a",),
        labels=("a", "b"),
        domain=domain,
        dataset="toy",
        **fields,
    )


@pytest.fixture(scope="module")
def demo_records(tmp_path_factory: pytest.TempPathFactory) -> list[Record]:
    return read_manifest(build_demo(tmp_path_factory.getbasetemp() / "qoq-demo", quiet=True))


def test_every_demo_record_loads_with_the_right_shapes(demo_records: list[Record]) -> None:
    from PIL import Image

    dataset = ClinicalDataset(demo_records, image_size=32, num_frames=3)
    kinds = set()
    for i, record in enumerate(demo_records):
        sample = dataset[i]
        for kind, field in (("image", "images"), ("video", "videos"), ("ecg", "time_series")):
            assert len(sample.items.get(kind, [])) == len(getattr(record, field))
        for image in sample.items.get("image", []):
            assert image.shape == (3, 32, 32) and 0.0 <= image.min() and image.max() <= 1.0
        for video in sample.items.get("video", []):
            assert video.shape == (3, 3, 32, 32)
        for ecg in sample.items.get("ecg", []):
            assert ecg.shape == (8, 2500) and ecg.dtype == torch.float32 and ecg.abs().max() > 0.1
        kinds |= set(sample.items)
        if record.bbox:  # ground truth rescaled into the 32 x 32 frame
            w, h = Image.open(record.images[0]).size
            expected = torch.tensor(record.bbox) * torch.tensor([32 / w, 32 / h, 32 / w, 32 / h])
            torch.testing.assert_close(sample.target.boxes, expected)
        else:
            assert sample.target.boxes is None
        assert (sample.target.mask is not None) == (record.segmentation_path is not None)
        assert sample.target.answer == record.answer and sample.target.labels == record.labels
    assert kinds == {"image", "video", "ecg"}


def test_boxes_and_mask_follow_the_resize(tmp_path: Path) -> None:
    from PIL import Image

    image = _png(tmp_path / "a.png", h=20, w=40)
    mask = np.zeros((20, 40), dtype=np.uint8)
    mask[2:10, 4:20] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    record = _record(
        "r", images=(image,), bbox=((4.0, 2.0, 20.0, 10.0),), segmentation_path=str(tmp_path / "m.png")
    )
    sample = ClinicalDataset([record], image_size=10)[0]
    # Scale (sx, sy) = (10 / 40, 10 / 20) = (0.25, 0.5).
    torch.testing.assert_close(sample.target.boxes, torch.tensor([[1.0, 1.0, 5.0, 5.0]]))
    assert sample.target.image_size == (10, 10)  # the boxes' frame, for the box-reward guard
    expected = torch.zeros(10, 10, dtype=torch.bool)
    expected[1:5, 1:5] = True
    assert torch.equal(sample.target.mask, expected)


def test_mask_of_another_size_is_refused(tmp_path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.ones((5, 5), dtype=np.uint8)).save(tmp_path / "m.png")
    record = _record(
        "r", images=(_png(tmp_path / "a.png", 20, 40),), segmentation_path=str(tmp_path / "m.png")
    )
    with pytest.raises(DataError, match=r"m\.png.*mask is \[5, 5\], its image \[20, 40\]"):
        ClinicalDataset([record])[0]


def test_collate_owner_indices_and_domain_ids(tmp_path: Path) -> None:
    a, b = _png(tmp_path / "a.png", 8, 8, 10), _png(tmp_path / "b.png", 8, 8, 200)
    ecg = _ecg(tmp_path / "e.npy")
    records = [
        _record("two-images", "ct", images=(a, b)),
        _record("ecg-only", "ecg", time_series=(ecg,)),
        _record("image-and-ecg", "fundus", images=(b,), time_series=(ecg,)),
    ]
    dataset = ClinicalDataset(records, image_size=4, ecg_spec=SMALL_ECG)
    batch = collate([dataset[i] for i in range(3)], DOMAINS)
    assert set(batch.modalities) == {"image", "ecg"}
    assert batch.modalities["image"].owner.tolist() == [0, 0, 2]
    assert batch.modalities["image"].values.shape == (3, 3, 4, 4)
    # Items keep placeholder order: image a (dark) then b (bright) for prompt 0.
    means = batch.modalities["image"].values.mean(dim=(1, 2, 3))
    assert means[0] < 0.1 and means[1] > 0.7
    assert batch.modalities["ecg"].owner.tolist() == [1, 2]
    assert batch.modalities["ecg"].values.shape == (2, 2, 10)
    assert batch.domain_ids.tolist() == [DOMAINS.index("ct"), DOMAINS.index("ecg"), DOMAINS.index("fundus")]
    assert batch.ids == ["two-images", "ecg-only", "image-and-ecg"] and len(batch) == 3
    assert batch.origins == ["real"] * 3 and batch.stream_index == -1
    assert batch.references is not None and len(batch.references) == 3
    with pytest.raises(ValueError, match="not in the domain vocabulary"):
        collate([dataset[0]], ["mri"])


def test_a_missing_file_raises_naming_it_or_is_skipped_and_counted(tmp_path: Path) -> None:
    good = _record("good", images=(_png(tmp_path / "a.png", 8, 8),))
    bad = _record("bad", images=(str(tmp_path / "gone.png"),))
    with pytest.raises(DataError, match="gone.png"):
        ClinicalDataset([good, bad])[1]
    counter = SkipCounter()
    dataset = ClinicalDataset([good, bad], image_size=4, skip_invalid=True, counter=counter)
    samples = [dataset[0], dataset[1]]
    assert samples[1] is None and counter.total == 1 and counter.as_dict() == {"missing_file": 1}
    batch = collate(samples, DOMAINS)
    assert batch.ids == ["good"] and batch.modalities["image"].owner.tolist() == [0]
    with pytest.raises(DataError, match="empty_batch|were skipped"):
        collate([None, None], DOMAINS)


def test_prompt_text_and_reference_follow_the_contract(tmp_path: Path) -> None:
    record = _record("r", images=(_png(tmp_path / "a.png", 20, 40),), bbox=((4.0, 2.0, 20.0, 10.0),))
    text = prompt_text(record)
    assert text.startswith(record.problem) and text.endswith(RESPONSE_FORMAT)
    sample = ClinicalDataset([record], image_size=10)[0]
    reference = sample.reference
    assert reference == reference_response(record, sample.target.boxes)
    assert format_reward(reference) == 1.0
    assert extract_answer(reference, record.labels) == frozenset({"a"})
    assert parse_boxes(reference) == [(1.0, 1.0, 5.0, 5.0)]
    plain = reference_response(record, None)
    assert "```json\n[]\n```" in plain and plain.endswith("\\boxed{a}") and format_reward(plain) == 1.0


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="image_size"):
        ClinicalDataset([], image_size=0)
