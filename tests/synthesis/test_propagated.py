"""The propagated hologram generator, domain randomisation and ``app.synth --like``."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tracemalloc

import cv2
import numpy as np
import pytest

from app.config import SynthConfig
from app.pipeline import hologram as H
from app.synth import main
from app.synthesis import make_sequence
from app.synthesis.generator import IGNORE, SynthError
from app.synthesis.like import measure
from app.synthesis.propagated import RANDOM_RANGES, HologramSequence, randomized
from tests.conftest import REPO_ROOT


def holo(**changes) -> SynthConfig:
    return dataclasses.replace(SynthConfig(size=128, frames=3, seed=3, generator="propagated", num_cells=4), **changes)


def test_same_seed_same_frames_and_background() -> None:
    a, b = HologramSequence(holo()), HologramSequence(holo())
    np.testing.assert_array_equal(a.frame(2).image, b.frame(2).image)
    np.testing.assert_array_equal(a.frame(2).mask, b.frame(2).mask)
    np.testing.assert_array_equal(a.background(), b.background())
    assert not np.array_equal(a.frame(0).image, HologramSequence(holo(seed=4)).frame(0).image)


def test_make_sequence_picks_the_generator() -> None:
    assert isinstance(make_sequence(holo()), HologramSequence)
    assert isinstance(make_sequence(holo(generator="classic", randomize=True)), HologramSequence)
    assert not isinstance(make_sequence(holo(generator="classic")), HologramSequence)


@pytest.mark.parametrize("bits", [8, 10, 12, 16])
def test_bit_depths(bits: int) -> None:
    image = HologramSequence(holo(bit_depth=bits)).frame(0).image
    assert image.dtype == (np.uint8 if bits == 8 else np.uint16)
    assert 0.5 * 2**bits < image.max() < 2**bits  # uses the range, never beyond it


def test_objects_change_the_phase_only_where_the_mask_says() -> None:
    """Background hologram vs frame, demodulated: the phase difference sits on the objects."""
    seq = HologramSequence(holo(size=192, num_cells=3, noise_std=0.003, defocus_px=0.0, speckle_rad=0.0,
                                bead_fraction=0.0, organism_fraction=0.0, cluster_fraction=0.0))
    frame = seq.frame(0)
    phase = np.abs(np.angle(H.OffAxisDemodulator(background=seq.background()).full_field(frame.image)))
    inside = cv2.erode((frame.mask == 1).astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    outside = cv2.dilate((frame.mask != 0).astype(np.uint8), np.ones((15, 15), np.uint8)) == 0
    assert inside.sum() > 200 and outside.sum() > 2000
    assert np.median(phase[inside]) > 0.5
    assert np.median(phase[outside]) < 0.1


def test_defocus_spreads_the_object_and_widens_the_ignore_band() -> None:
    focused = HologramSequence(holo(size=192, defocus_px=0.0, noise_std=0.0, num_dust_rings=0, speckle_rad=0.0))
    blurred = HologramSequence(holo(size=192, defocus_px=30.0, noise_std=0.0, num_dust_rings=0, speckle_rad=0.0))
    assert focused.meta()["ignore_band_px"] == 1
    assert blurred.meta()["ignore_band_px"] > 1
    band_focused = (focused.frame(0).mask == IGNORE).sum()
    band_blurred = (blurred.frame(0).mask == IGNORE).sum()
    assert band_blurred > 1.5 * band_focused
    # Same objects, same support; the recorded fringes differ (Fresnel rings of the defocused objects).
    np.testing.assert_array_equal(focused.frame(0).mask == 1, (blurred.frame(0).mask == 1) | (
        (focused.frame(0).mask == 1) & (blurred.frame(0).mask == IGNORE)))
    assert np.abs(focused.frame(0).image.astype(float) - blurred.frame(0).image).mean() > 1.0


def test_object_kinds_and_clusters() -> None:
    meta = HologramSequence(holo(size=256, num_cells=12, bead_fraction=0.3, organism_fraction=0.3,
                                 cluster_fraction=1.0)).meta()
    kinds = meta["objects_in_sequence"]
    assert kinds.get("bead", 0) > 0 and kinds.get("organism", 0) > 0 and kinds.get("cell", 0) > 1
    assert meta["clusters_in_sequence"] > 0


def test_randomize_draws_within_the_documented_ranges() -> None:
    drawn = [randomized(holo(seed=seed, randomize=True)) for seed in range(30)]
    periods = [cfg.fringe_period_px for cfg in drawn]
    assert min(periods) >= 2.2 and max(periods) <= 10.0 and np.std(periods) > 1.0
    assert len({cfg.bit_depth for cfg in drawn}) == 4
    assert all(RANDOM_RANGES["fringe_visibility"][0] <= cfg.fringe_visibility <= RANDOM_RANGES["fringe_visibility"][1]
               for cfg in drawn)
    assert any(abs(cfg.defocus_px) > 10 for cfg in drawn) and any(abs(cfg.defocus_px) < 3 for cfg in drawn)
    assert randomized(holo(seed=7, randomize=True)) == randomized(holo(seed=7, randomize=True))


def test_randomize_keeps_what_keep_names() -> None:
    cfg = randomized(holo(seed=1, randomize=True, fringe_period_px=3.0, defocus_px=12.0,
                          keep=("fringe_period_px", "defocus_px")))
    assert cfg.fringe_period_px == 3.0 and cfg.defocus_px == 12.0
    with pytest.raises(SynthError, match="unknown settings: nonsense"):
        randomized(holo(randomize=True, keep=("nonsense",)))


def test_like_recovers_a_synthetic_holograms_own_parameters() -> None:
    for seed in (11, 12, 13):
        seq = make_sequence(SynthConfig(size=256, frames=1, seed=seed, randomize=True))
        truth = seq.meta()
        found = measure(seq.frame(0).image)
        assert found["fringe_period_px"] == pytest.approx(truth["fringe_period_px"], rel=0.03)
        # The fringes of angle a and a + 180° are the same.
        assert abs((found["fringe_angle_deg"] - truth["fringe_angle_deg"] + 90.0) % 180.0 - 90.0) < 2.0
        assert found["fringe_visibility"] == pytest.approx(truth["fringe_visibility"], rel=0.15)
        assert found["noise_std"] == pytest.approx(truth["noise_std"], rel=0.4)
        assert found["bit_depth"] == truth["bit_depth"]


def test_synth_cli_like_writes_matched_sequences(tmp_path) -> None:
    source = make_sequence(SynthConfig(size=192, frames=1, seed=21, randomize=True))
    assert cv2.imwrite(str(tmp_path / "real.png"), source.frame(0).image)
    out = tmp_path / "like"
    assert main(["--out", str(out), "--like", str(tmp_path / "real.png"), "--sequences", "2", "--frames", "2",
                 "--size", "128"]) == 0
    metas = [json.loads((out / f"seq{k:03d}" / "meta.json").read_text()) for k in range(2)]
    for meta in metas:
        assert meta["fringe_period_px"] == pytest.approx(source.meta()["fringe_period_px"], rel=0.03)
        assert meta["bit_depth"] == source.meta()["bit_depth"]
        assert (out / f"seq{metas.index(meta):03d}" / "background.png").is_file()
    assert metas[0]["seed"] != metas[1]["seed"] and metas[0]["defocus_px"] != metas[1]["defocus_px"]


def test_synth_cli_bad_like_file_is_one_line(tmp_path) -> None:
    (tmp_path / "x.png").write_bytes(b"junk")
    result = subprocess.run([sys.executable, "-m", "app.synth", "--out", str(tmp_path / "o"), "--like",
                             str(tmp_path / "x.png")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "cannot read hologram" in result.stderr


def test_randomized_sequence_written_with_background(tmp_path) -> None:
    assert main(["--out", str(tmp_path / "r"), "--randomize", "--frames", "2", "--size", "96", "--seed", "5"]) == 0
    background = cv2.imread(str(tmp_path / "r" / "background.png"), cv2.IMREAD_UNCHANGED)
    image = cv2.imread(str(tmp_path / "r" / "images" / "000000.png"), cv2.IMREAD_UNCHANGED)
    assert background.shape == image.shape == (96, 96) and background.dtype == image.dtype
    assert json.loads((tmp_path / "r" / "meta.json").read_text())["generator"].startswith("app.synth propagated")


def test_long_sequence_builds_in_bounded_memory() -> None:
    """The propagated generator shares the classic one's tracks: bodies' walks end once they have left."""
    tracemalloc.start()
    try:
        sequence = HologramSequence(holo(size=32, frames=5000, num_cells=8, drift_px_per_frame=1.5))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 40e6, f"building 5000 frames peaked at {peak / 1e6:.0f} MB"
    assert sequence.frame(4999).image.shape == (32, 32)
