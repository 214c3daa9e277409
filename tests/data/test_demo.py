"""The embedded demo set: coverage, provenance, honesty markers, privacy, determinism, caching, and the
synthetic generators' labels (correct by construction)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qoq.data import demo as demo_module
from qoq.data.demo import SOURCES, build_demo
from qoq.data.domains import DOMAINS
from qoq.data.manifest import read_manifest
from qoq.data.phi import assert_no_phi, phi_values
from qoq.data.synthetic import DERMOSCOPY_LABELS, MAMMO_LABELS, synthetic_dermoscopy, synthetic_mammogram


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full demo build (shared by the data test modules of a session through the build cache)."""
    out = tmp_path_factory.getbasetemp() / "qoq-demo"
    build_demo(out, quiet=True)
    return out


@pytest.fixture(scope="module")
def records(demo_dir: Path):
    return read_manifest(demo_dir / "manifest.jsonl")


def test_covers_seven_domains_with_real_records(records) -> None:
    real_domains = {r.domain for r in records if r.origin == "real"}
    assert len(real_domains) >= 7, real_domains
    assert real_domains <= set(DOMAINS)
    # The two domains no package ships are synthetic, and only they are.
    assert {r.domain for r in records if r.origin == "synthetic"} == {"mammography", "dermoscopy"}
    # Several records per real source, so RL has something to learn.
    per_source: dict[str, int] = {}
    for r in records:
        per_source[r.source["path"]] = per_source.get(r.source["path"], 0) + 1
    assert min(per_source.values()) >= 2


def test_every_record_carries_provenance(records) -> None:
    for r in records:
        assert r.origin in ("real", "synthetic")
        assert r.label_source.strip(), r.id
        assert set(r.source) == {"package", "path", "licence"} and all(r.source.values()), r.id
        assert set(r.answer) <= set(r.labels)


def test_synthetic_records_say_so(records) -> None:
    synthetic = [r for r in records if r.origin == "synthetic"]
    assert len(synthetic) >= 20
    for r in synthetic:
        assert "synthetic" in r.dataset
        for path in (*r.images, r.segmentation_path or ""):
            assert path == "" or "synthetic" in Path(path).name
    assert not any("synthetic" in r.dataset for r in records if r.origin == "real")


def test_real_only_drops_synthetic_and_keeps_the_real_records(tmp_path: Path, records) -> None:
    manifest = build_demo(tmp_path / "real", real_only=True, quiet=True)
    real = read_manifest(manifest)
    assert all(r.origin == "real" for r in real)
    assert [r.id for r in real] == [r.id for r in records if r.origin == "real"]


def test_no_patient_identifiers_in_any_output(demo_dir: Path) -> None:
    """Identifying header values of every DICOM source are absent from the manifest and all files."""
    import pydicom

    values = set()
    for src in SOURCES:
        path = src.locate()
        if path is not None and path.suffix == ".dcm":
            values.update(phi_values(pydicom.dcmread(path, stop_before_pixels=True)))
    assert {"Anonymous", "642341", "CompressedSamples^RG1", "9RG1", "Sssssss^Jsssss", "021234567"} <= values
    # Person names are searched by their parts, but the NEMA samples are "named" after their own file
    # (CompressedSamples^RG1 in RG1_UNCR.dcm): a part that is in a source's path is provenance, not PHI.
    paths = " ".join(src.path for src in SOURCES)
    needles = {part for v in values for part in v.split("^") if len(part) >= 4 and part not in paths}
    texts = [p.read_text() for p in sorted(demo_dir.rglob("*")) if p.suffix in (".jsonl", ".json", ".hea")]
    assert len(texts) >= 3
    # Text outputs: every value of 4+ characters (shorter ones such as "PLA" occur in ordinary words).
    assert_no_phi(texts, needles)
    # Binary outputs (pixels, signals): long values only, so random bytes cannot match by chance.
    binaries = [p for p in sorted(demo_dir.rglob("*")) if p.suffix in (".png", ".nii", ".dat")]
    assert_no_phi(binaries, [v for v in needles if len(v) >= 8])


def test_lesion_box_comes_from_the_overlay(records) -> None:
    """The MR overlay outlines the lesion at x 46-80, y 139-173 of the 484 x 300 image (DATA.md)."""
    from PIL import Image

    full = next(r for r in records if r.id == "demo-mr-marked-lesion:mr_overlay:full")
    w, h = Image.open(full.images[0]).size
    sx, sy = w / 484, h / 300
    assert full.answer == ("lesion in view",)
    np.testing.assert_allclose(full.bbox[0], (46 * sx, 139 * sy, 81 * sx, 174 * sy), atol=0.01)
    lesion = [r for r in records if r.dataset == "demo-mr-marked-lesion"]
    assert {r.answer[0] for r in lesion} == {"lesion in view", "lesion not in view"}
    assert all(bool(r.bbox) == (r.answer[0] == "lesion in view") for r in lesion)


def test_prints_counts_and_licences(demo_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_demo(demo_dir)  # cached: prints the summary of the earlier build
    out = capsys.readouterr().out
    assert "qoq demo set (reused)" in out
    for domain in DOMAINS:
        assert domain in out
    assert "real" in out and "synthetic" in out
    assert "CC0" in out and "MIT" in out  # licences of the sources
    assert "not clinical ground truth" in out


def test_cache_reuses_a_complete_build(demo_dir: Path) -> None:
    manifest = demo_dir / "manifest.jsonl"
    before = manifest.stat().st_mtime_ns
    assert build_demo(demo_dir, quiet=True) == manifest
    assert manifest.stat().st_mtime_ns == before
    stamp = json.loads((demo_dir / "build.json").read_text())
    assert stamp["seed"] == 0 and stamp["real_only"] is False


def test_deterministic_given_the_seed(tmp_path: Path, demo_dir: Path) -> None:
    manifest = build_demo(tmp_path / "again", quiet=True)
    assert manifest.read_text() == (demo_dir / "manifest.jsonl").read_text()
    for file in sorted((demo_dir / "files").rglob("*.png"))[::7]:
        assert (tmp_path / "again" / file.relative_to(demo_dir)).read_bytes() == file.read_bytes()


def test_missing_sources_are_skipped_and_reported(tmp_path: Path, monkeypatch, capsys) -> None:
    absent = demo_module.DemoSource("nothing", "no_such_package_qoq", "no-such-package", "data/x.dcm", "none")
    retina = next(s for s in SOURCES if s.key == "retina")
    monkeypatch.setattr(demo_module, "SOURCES", (absent, retina))
    manifest = build_demo(tmp_path / "partial", real_only=True)
    out = capsys.readouterr().out
    assert "skipped nothing" in out and "pip install no-such-package" in out
    records = read_manifest(manifest)
    assert {r.source["path"] for r in records} == {"data/retina.jpg"}
    stamp = json.loads((tmp_path / "partial" / "build.json").read_text())
    assert stamp["missing"].keys() == {"nothing"} and stamp["used"] == {"retina": len(records)}


# ------------------------------------------------------------------------------ synthetic generators
def _solidity(mask: np.ndarray) -> float:
    """Mask area over its convex hull's area (1 for convex shapes, low for spiculated ones)."""
    from scipy.spatial import ConvexHull

    ys, xs = np.nonzero(mask)
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    return mask.sum() / ConvexHull(corners).volume


def test_mammogram_masses_match_their_labels() -> None:
    rng = np.random.default_rng(1)
    for _ in range(3):
        plain = synthetic_mammogram(rng, "no mass", size=128)
        assert plain.mask is None and plain.box is None
        round_mass = synthetic_mammogram(rng, "circumscribed mass", size=128)
        spiculated = synthetic_mammogram(rng, "spiculated mass", size=128)
        assert _solidity(round_mass.mask) > 0.85
        assert _solidity(spiculated.mask) < 0.7
        for sample in (round_mass, spiculated):
            x1, y1, x2, y2 = (int(v) for v in sample.box)
            assert sample.mask[y1:y2, x1:x2].sum() == sample.mask.sum()  # the box holds the whole mass
            assert (
                sample.image[sample.mask].mean()
                > sample.image[~sample.mask & (sample.image[..., 0] > 0)].mean()
            )
    assert set(MAMMO_LABELS) == {"no mass", "circumscribed mass", "spiculated mass"}


def _point_symmetry(mask: np.ndarray) -> float:
    """IoU of a mask with its reflection through its centroid (1 for centrally symmetric shapes)."""
    from scipy import ndimage

    cy, cx = ndimage.center_of_mass(mask)
    ys, xs = np.nonzero(mask)
    ry, rx = np.round(2 * cy - ys).astype(int), np.round(2 * cx - xs).astype(int)
    inside = (ry >= 0) & (ry < mask.shape[0]) & (rx >= 0) & (rx < mask.shape[1])
    mirrored = np.zeros_like(mask)
    mirrored[ry[inside], rx[inside]] = True
    return (mirrored & mask).sum() / (mirrored | mask).sum()


def test_dermoscopy_lesions_match_their_labels() -> None:
    from scipy import ndimage

    rng = np.random.default_rng(2)
    for _ in range(3):
        one, many = (synthetic_dermoscopy(rng, label, size=128) for label in DERMOSCOPY_LABELS)
        assert (
            one.label == "symmetric single-colour lesion" and many.label == "asymmetric multi-colour lesion"
        )
        # Colour spread inside the lesion (3 px in from its border): one colour vs several.
        spread = [s.image[ndimage.binary_erosion(s.mask, iterations=3)].std(0).max() for s in (one, many)]
        assert spread[0] < 8 and spread[1] > 20
        assert _point_symmetry(one.mask) > 0.93 and _point_symmetry(many.mask) < 0.85
    with pytest.raises(ValueError, match="unknown synthetic label"):
        synthetic_dermoscopy(rng, "melanoma")
