from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import tracemalloc

import cv2
import numpy as np
import pytest

from app.config import SynthConfig
from app.synth import main
from app.synthesis.generator import InterferogramSequence, SynthError, _smooth_walk, _track, carrier_frequency


def small(**changes) -> SynthConfig:
    """A tiny, fast sequence; ``changes`` override single fields."""
    fields = {"size": 64, "frames": 4, "num_cells": 3, "num_particles": 2, "num_dust_rings": 1, "drift_px_per_frame": 2.0}
    fields.update(changes)
    return SynthConfig(**fields)


def test_same_seed_same_frames_other_seed_differs():
    first, again, other = (InterferogramSequence(small(seed=s)) for s in (3, 3, 4))
    for index in range(len(first)):
        a, b = first.frame(index), again.frame(index)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.mask, b.mask)
    assert not np.array_equal(first.frame(0).image, other.frame(0).image)
    assert not np.array_equal(first.frame(0).mask, other.frame(0).mask)


def test_random_access_and_longer_sequence_extends_shorter():
    """frame(i) needs no earlier frames, and more frames with the same seed only append."""
    short, long = InterferogramSequence(small(frames=6)), InterferogramSequence(small(frames=12))
    assert len(short) == 6 and len(long) == 12
    iterated = list(short)
    for index in (5, 0, 3):
        np.testing.assert_array_equal(short.frame(index).image, iterated[index].image)
        np.testing.assert_array_equal(long.frame(index).image, iterated[index].image)
        np.testing.assert_array_equal(long.frame(index).mask, iterated[index].mask)
    with pytest.raises(IndexError):
        short.frame(6)


@pytest.mark.parametrize("ignore_border_px", [0, 2])
def test_mask_covers_exactly_the_cells(ignore_border_px):
    seq = InterferogramSequence(small(size=96, frames=3, num_cells=4, ignore_border_px=ignore_border_px))
    for frame in seq:
        assert frame.mask.dtype == np.uint8 and frame.cell_phase.dtype == np.float32
        assert frame.mask.shape == frame.cell_phase.shape == frame.image.shape == (96, 96)
        cell, background = frame.mask == 1, frame.mask == 0
        assert cell.any()
        assert np.all(frame.cell_phase[cell] > 0)
        assert np.all(frame.cell_phase[background] == 0)
        if ignore_border_px:
            assert set(np.unique(frame.mask)) == {0, 1, 255}
        else:
            assert set(np.unique(frame.mask)) == {0, 1}
            np.testing.assert_array_equal(frame.cell_phase > 0, cell)


def test_cells_change_the_image_exactly_where_the_mask_is():
    """With noise, blur, halo and particles off, removing the cells changes only mask pixels, nearly all of them."""
    clean = {"size": 96, "frames": 3, "num_particles": 0, "noise_std": 0.0, "defocus_sigma_px": 0.0, "defocus_halo": 0.0}
    with_cells = InterferogramSequence(small(num_cells=4, **clean))
    without_cells = InterferogramSequence(small(num_cells=0, **clean))
    for index in range(len(with_cells)):
        frame = with_cells.frame(index)
        changed, cell = frame.image != without_cells.frame(index).image, frame.mask == 1
        assert not (changed & ~cell).any()
        assert (changed & cell).sum() > 0.9 * cell.sum() > 0


def test_cells_move_enter_and_leave():
    cfg = small(size=96, frames=40, num_cells=3)
    seq = InterferogramSequence(cfg)
    masks = [seq.frame(i).mask == 1 for i in range(0, 40, 4)]
    assert sum(m.any() for m in masks) >= 8
    first, later = masks[0], masks[3]
    overlap = (first & later).sum() / max((first | later).sum(), 1)
    assert overlap < 0.8
    # Arrivals from outside the border keep the field populated as cells drift out of it.
    assert seq.meta()["cells_in_sequence"] > cfg.num_cells


@pytest.mark.parametrize(("period", "angle"), [(4.0, 45.0), (6.0, 20.0), (5.0, 120.0)])
def test_fft_peak_at_carrier_frequency(period, angle):
    cfg = small(size=128, frames=1, fringe_period_px=period, fringe_angle_deg=angle)
    image = InterferogramSequence(cfg).frame(0).image.astype(np.float64)
    spectrum = np.abs(np.fft.fft2(image - image.mean()))
    fy, fx = np.meshgrid(np.fft.fftfreq(128), np.fft.fftfreq(128), indexing="ij")
    spectrum[np.hypot(fy, fx) < 0.06] = 0  # envelope, dust rings and halo live near DC
    peak_y, peak_x = np.unravel_index(np.argmax(spectrum), spectrum.shape)
    expected_y, expected_x = np.sin(np.radians(angle)) / period, np.cos(np.radians(angle)) / period
    assert carrier_frequency(cfg) == pytest.approx((expected_y, expected_x))
    bins = [(abs(fy[peak_y, peak_x] - s * expected_y) * 128, abs(fx[peak_y, peak_x] - s * expected_x) * 128) for s in (1, -1)]
    assert min(max(b) for b in bins) <= 1.0, (fy[peak_y, peak_x], fx[peak_y, peak_x], expected_y, expected_x)


def test_bit_depth_16_uses_more_than_8_bits():
    image = InterferogramSequence(small(frames=1, bit_depth=16)).frame(0).image
    assert image.dtype == np.uint16
    assert int(image.max()) - int(image.min()) > 255
    assert InterferogramSequence(small(frames=1)).frame(0).image.dtype == np.uint8


def test_meta_is_json_with_parameters():
    cfg = small(seed=7)
    meta = json.loads(json.dumps(InterferogramSequence(cfg).meta()))
    assert meta["seed"] == 7 and meta["size"] == 64 and meta["frames"] == 4
    assert meta["carrier_frequency_cycles_per_px"] == pytest.approx(dict(zip(("fy", "fx"), carrier_frequency(cfg), strict=True)))


@pytest.mark.parametrize("changes", [{"size": 16}, {"frames": 0}, {"bit_depth": 9}, {"generator": "holo"}, {"fringe_period_range_px": (1.5, 3.0)}, {"fringe_period_px": 2.0}])
def test_invalid_settings_are_rejected(changes):
    with pytest.raises(SynthError, match=next(iter(changes))):
        InterferogramSequence(small(**changes))


def run_cli(repo_root, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.synth", *args], cwd=repo_root, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("container", ["mp4", "avi"])
def test_cli_writes_images_masks_meta_and_video(repo_root, tmp_path, container):
    out, video = tmp_path / "seq", tmp_path / f"seq.{container}"
    result = run_cli(repo_root, "--out", str(out), "--frames", "3", "--size", "64", "--seed", "5",
                     "--video", str(video), "--set", "synth.ignore_border_px=1")
    assert result.returncode == 0, result.stderr
    images, masks = sorted((out / "images").glob("*.png")), sorted((out / "masks").glob("*.png"))
    assert [p.name for p in images] == [p.name for p in masks] == ["000000.png", "000001.png", "000002.png"]
    meta = json.loads((out / "meta.json").read_text())
    assert {"seed", "size", "frames", "carrier_frequency_cycles_per_px", "classes"} <= meta.keys()
    assert meta["seed"] == 5 and meta["ignore_border_px"] == 1
    for path in masks:
        mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert mask.dtype == np.uint8 and mask.shape == (64, 64)
        assert set(np.unique(mask)) <= {0, 1, 255}
    capture = cv2.VideoCapture(str(video))
    frames = []
    while (read := capture.read())[0]:
        frames.append(read[1])
    capture.release()
    assert len(frames) == 3 and frames[0].shape[:2] == (64, 64)
    # the video shows the frames written as PNGs (lossy codec: compare loosely)
    first = cv2.imread(str(images[0]), cv2.IMREAD_UNCHANGED)
    assert np.abs(frames[0][..., 0].astype(int) - first).mean() < 12
    assert not list(tmp_path.glob(".*partial*"))


def test_cli_rerun_with_fewer_frames_leaves_only_the_new_sequence(repo_root, tmp_path):
    out = tmp_path / "seq"
    for frames in ("4", "2"):
        result = run_cli(repo_root, "--out", str(out), "--frames", frames, "--size", "32")
        assert result.returncode == 0, result.stderr
    for folder in ("images", "masks"):
        assert sorted(p.name for p in (out / folder).iterdir()) == ["000000.png", "000001.png"]


@pytest.mark.parametrize(("args", "message"), [
    (["--size", "16"], "synth.size must be at least 32"),
    (["--frames", "-1"], "synth.frames must be at least 1, got -1"),
    (["--set", "synth.sizee=64"], "unknown config key 'synth.sizee'; did you mean 'synth.size'?"),
    (["--set", "synth.size=big"], "synth.size: expected int, got str 'big'"),
    (["UNWRITABLE"], "Not a directory"),
])
def test_cli_bad_input_exits_2_with_one_line(repo_root, tmp_path, args, message):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    if args == ["UNWRITABLE"]:
        args = ["--out", str(blocker / "out"), "--frames", "1", "--size", "32"]
    else:
        args = ["--out", str(tmp_path / "out"), *args]
    result = run_cli(repo_root, *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("app.synth: error: "), result.stderr
    assert message in lines[0]


def test_cli_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--out", "--frames", "--size", "--seed", "--bit-depth", "--video", "--fps", "--config", "--set",
                   "--randomize", "--like", "--sequences"):
        assert option in text
    # Where the physical settings live and how to get the frames in memory.
    assert "synth.fringe_period_px" in " ".join(text.split())
    assert "make_sequence" in text


def whole_walk(rng, length, step_std, smoothing):
    """The walk as it was drawn before blocks: all ``length`` samples at once (the oracle)."""
    noise = rng.standard_normal((length, 2))
    if smoothing <= 0.0:
        return noise * step_std
    kernel = np.exp(-np.arange(int(4 * smoothing) + 1) / smoothing)
    kernel /= np.sqrt((kernel**2).sum())
    return np.stack([np.convolve(noise[:, i], kernel)[:length] for i in range(2)], axis=1) * step_std


def whole_track(rng, bound, birth, entering, size, frames, speed, jitter, smoothing):
    """A track drawn to the end of the sequence and cut after its last visible frame (the oracle)."""
    magnitude = speed * rng.uniform(0.5, 1.5)
    if entering:
        side, along = int(rng.integers(4)), rng.uniform(0.0, size)
        start = np.array([(along, -bound), (size + bound, along), (along, size + bound), (-bound, along)][side])
        target = rng.uniform(0.2 * size, 0.8 * size, 2)
        heading = math.atan2(target[1] - start[1], target[0] - start[0])
    else:
        start = rng.uniform(0.0, size, 2)
        heading = rng.uniform(0.0, 2.0 * math.pi)
    steps = magnitude * np.array([math.cos(heading), math.sin(heading)]) + whole_walk(rng, frames - birth, jitter,
                                                                                        smoothing)
    steps[0] = 0.0
    path = start + np.cumsum(steps, axis=0)
    visible = np.flatnonzero(np.all((path > -bound) & (path < size + bound), axis=1))
    return path[: visible[-1] + 1] if visible.size else None


@pytest.mark.parametrize("smoothing", [0.0, 8.0])
@pytest.mark.parametrize("length", [1, 20, 33, 34, 300, 2000])
@pytest.mark.parametrize("first_block", [1, 33, 100])
def test_walk_drawn_in_blocks_is_the_walk_drawn_at_once(smoothing, length, first_block):
    blocks = list(_smooth_walk(np.random.default_rng(7), length, 0.3, smoothing, first_block=first_block))
    assert sum(len(b) for b in blocks) == length
    np.testing.assert_array_equal(np.concatenate(blocks), whole_walk(np.random.default_rng(7), length, 0.3, smoothing))


def test_tracks_stop_early_but_equal_tracks_drawn_to_the_end():
    """Same seed, same sequence: a body's walk is cut once it has left for good, and the positions are
    bit for bit those of the walk drawn to the end of the sequence (slow and fast bodies, both noises)."""
    for k in range(300):
        size, frames = (32, 3000) if k % 2 else (96, 400)
        args = (4.0 + k % 7, k % 50, bool(k % 3), size, frames, [0.05, 0.3, 1.5, 4.0][k % 4])
        noise = (args[-1] * 0.3, 8.0) if k % 5 else (0.4, 0.0)
        new = _track(np.random.default_rng([k, 1]), *args, *noise)
        old = whole_track(np.random.default_rng([k, 1]), *args, *noise)
        assert (new is None) == (old is None), k
        if new is not None:
            np.testing.assert_array_equal(new, old, err_msg=f"body {k}")


def test_long_sequence_builds_in_linear_time_and_memory():
    """Walks were once drawn to the end of the sequence for every body: 20,000 frames took 3 GB."""
    cfg = SynthConfig(size=32, frames=5000)
    tracemalloc.start()
    try:
        start = time.perf_counter()
        sequence = InterferogramSequence(cfg)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 40e6, f"building {cfg.frames} frames peaked at {peak / 1e6:.0f} MB"
    assert elapsed < 10.0
    assert sequence.frame(cfg.frames - 1).image.shape == (32, 32)
