"""The hologram stage end to end: recipe in the checkpoint, --background on replay/live/evaluate, bad backgrounds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from app.config import PreprocessConfig, SynthConfig
from app.pipeline.hologram import NUM_CHANNELS
from app.pipeline.preprocess import PreprocessError, Preprocessor, PreprocessSettings, recipe, settings_from
from app.synth import main as synth_main
from app.synthesis import make_sequence
from tests.conftest import REPO_ROOT

HOLOGRAM_RECIPE = {"clahe": False, "clahe_clip_limit": 2.0, "clahe_tile_grid": 8, "background": "none",
                   "background_frames": 10, "background_alpha": 0.05, "hologram": "offaxis",
                   "hologram_filter": "smooth_disk", "hologram_filter_size": 0.5}


@pytest.fixture(scope="module")
def hologram_weights(tmp_path_factory) -> Path:
    """A tiny untrained ICNet whose checkpoint records the hologram stage (3 field channels)."""
    from models import build_model, save_checkpoint

    path = tmp_path_factory.mktemp("weights") / "holo.pt"
    model = build_model("icnet", num_classes=2, in_channels=NUM_CHANNELS, backbone="resnet18", width=0.25)
    save_checkpoint(path, model, arch="icnet", options={"backbone": "resnet18", "width": 0.25},
                    class_names=["background", "cell"], palette=None, input_size=64,
                    normalization={"mode": "none"}, train_config={"preprocess": HOLOGRAM_RECIPE})
    return path


@pytest.fixture(scope="module")
def sequence_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("seq") / "seq"
    assert synth_main(["--out", str(out), "--randomize", "--frames", "3", "--size", "96", "--seed", "8"]) == 0
    return out


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("DISPLAY", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=90)


def test_recipe_round_trips_through_the_checkpoint_format() -> None:
    settings = PreprocessSettings(in_channels=3, hologram="offaxis", hologram_filter="disk", hologram_filter_size=0.4)
    recorded = recipe(settings)
    assert recorded["hologram"] == "offaxis" and recorded["hologram_filter_size"] == 0.4
    back = settings_from(PreprocessConfig(), 3, {"mode": "none"}, recorded)
    assert (back.hologram, back.hologram_filter, back.hologram_filter_size) == ("offaxis", "disk", 0.4)
    assert "background_file" not in recorded  # a run-time input, not part of the recipe
    assert recorded["hologram_channels"] == ["sin_phase", "one_minus_cos_phase", "log_amplitude"]
    with pytest.raises(PreprocessError, match="trained on hologram channels phase, amplitude"):
        settings_from(PreprocessConfig(), 3, {"mode": "none"}, {**recorded, "hologram_channels": ["phase", "amplitude"]})


def test_preprocessor_gives_field_channels() -> None:
    seq = make_sequence(SynthConfig(size=96, frames=1, seed=2, randomize=True))
    settings = PreprocessSettings(in_channels=3, hologram="offaxis", normalization=(("mode", "none"),))
    tensor = Preprocessor(settings, seq.background())(seq.frame(0).image)
    assert tensor.shape == (3, 96, 96) and tensor.dtype == np.float32
    assert np.abs(tensor[0]).max() <= 1.0 + 1e-5 and tensor[1].min() >= -1e-5 and tensor[1].max() <= 2.0 + 1e-5


def test_background_file_without_hologram_stage_is_an_error(tmp_path) -> None:
    with pytest.raises(PreprocessError, match="needs preprocess.hologram=offaxis"):
        Preprocessor(PreprocessSettings(background_file=str(tmp_path / "bg.png")))


def test_replay_uses_the_background_and_records_it(hologram_weights, sequence_dir, tmp_path) -> None:
    stats = tmp_path / "stats.json"
    background = sequence_dir / "background.png"
    result = run_cli("app.replay", str(sequence_dir / "images"), "--weights", str(hologram_weights),
                     "--background", str(background), "--masks", str(tmp_path / "m"), "--stats", str(stats))
    assert result.returncode == 0, result.stderr
    summary = json.loads(stats.read_text())
    assert summary["config"]["background_file"] == str(background)
    used = summary["preprocessing"]
    assert used["hologram"] == "offaxis" and used["background_file"] == str(background)
    period = json.loads((sequence_dir / "meta.json").read_text())["fringe_period_px"]
    assert used["carrier"]["period_px"] == pytest.approx(period, rel=0.03)
    assert len(list((tmp_path / "m").glob("*.png"))) == 3


def test_the_background_changes_the_prediction(hologram_weights, sequence_dir, tmp_path) -> None:
    """The file is really used: the same frames with and without it give different model inputs."""
    from app.pipeline.hologram import OffAxisDemodulator

    image = cv2.imread(str(sequence_dir / "images" / "000000.png"), cv2.IMREAD_UNCHANGED)
    background = cv2.imread(str(sequence_dir / "background.png"), cv2.IMREAD_UNCHANGED)
    settings = PreprocessSettings(in_channels=3, hologram="offaxis", normalization=(("mode", "none"),),
                                  background_file=str(sequence_dir / "background.png"))
    from_file = Preprocessor(settings)(image)
    np.testing.assert_allclose(from_file, OffAxisDemodulator(background=background).channels(image).transpose(2, 0, 1),
                               atol=1e-6)
    assert np.abs(from_file - Preprocessor(PreprocessSettings(in_channels=3, hologram="offaxis",
                                                              normalization=(("mode", "none"),)))(image)).max() > 0.1


@pytest.mark.parametrize("problem", ["unreadable", "missing", "wrong size"])
def test_bad_background_is_one_line_and_exit_2(hologram_weights, sequence_dir, tmp_path, problem) -> None:
    path = tmp_path / "bg.png"
    if problem == "unreadable":
        path.write_bytes(b"\x89PNG broken")
    elif problem == "wrong size":
        assert cv2.imwrite(str(path), np.full((50, 70), 128, np.uint8))
    result = run_cli("app.replay", str(sequence_dir / "images"), "--weights", str(hologram_weights),
                     "--background", str(path), "--masks", str(tmp_path / "m"))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert {"unreadable": "cannot read background", "missing": "not found",
            "wrong size": "background hologram is 70×50"}[problem] in lines[0]


def test_live_accepts_background(hologram_weights, sequence_dir, tmp_path) -> None:
    result = run_cli("app.live", "--source", str(sequence_dir / "images"), "--no-display", "--weights",
                     str(hologram_weights), "--background", str(sequence_dir / "background.png"), "--max-frames", "2",
                     "--stats", str(tmp_path / "s.json"))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "s.json").read_text())["preprocessing"]["background_file"]


def test_evaluate_background_and_sweep(hologram_weights, sequence_dir, tmp_path) -> None:
    scores = tmp_path / "scores.json"
    result = run_cli("app.evaluate", "--weights", str(hologram_weights), "--data", str(sequence_dir),
                     "--background", str(sequence_dir / "background.png"), "--json", str(scores))
    assert result.returncode == 0, result.stderr
    assert json.loads(scores.read_text())["labelled_frames"] == 3
    sweep = tmp_path / "sweep.json"
    result = run_cli("app.evaluate", "--weights", str(hologram_weights), "--synthetic", "--with-background",
                     "--size", "96", "--frames", "1", "--sequences", "2", "--sweep", "fringe_period_px=2.2,5",
                     "--json", str(sweep))
    assert result.returncode == 0, result.stderr
    rows = json.loads(sweep.read_text())["rows"]
    assert [row["fringe_period_px"] for row in rows] == [2.2, 5.0] and all(row["frames"] == 2 for row in rows)
    assert "fringe_period_px | miou" in result.stdout
    bad = run_cli("app.evaluate", "--weights", str(hologram_weights), "--synthetic", "--sweep", "nonsense=1")
    assert bad.returncode == 2 and "--sweep needs KEY=V1,V2" in bad.stderr


def test_hologram_stage_on_the_torch_device_gives_the_same_masks(hologram_weights, sequence_dir, tmp_path) -> None:
    """preprocess.hologram_backend=torch (torch.fft in the backend, what a GPU run uses) against NumPy."""
    masks = {}
    for choice in ("numpy", "torch"):
        result = run_cli("app.replay", str(sequence_dir / "images"), "--weights", str(hologram_weights),
                         "--background", str(sequence_dir / "background.png"), "--masks", str(tmp_path / choice),
                         "--set", f"preprocess.hologram_backend={choice}", "--stats", str(tmp_path / f"{choice}.json"))
        assert result.returncode == 0, result.stderr
        masks[choice] = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted((tmp_path / choice).glob("*.png"))]
    assert len(masks["torch"]) == len(masks["numpy"]) == 3
    for a, b in zip(masks["numpy"], masks["torch"], strict=True):
        assert (a == b).mean() > 0.999
    assert json.loads((tmp_path / "torch.json").read_text())["preprocessing"]["hologram_backend"] == "torch"
    assert json.loads((tmp_path / "numpy.json").read_text())["preprocessing"]["hologram_backend"] == "numpy"


def test_replay_takes_the_folder_app_synth_wrote(hologram_weights, sequence_dir, tmp_path) -> None:
    result = run_cli("app.replay", str(sequence_dir), "--weights", str(hologram_weights), "--background",
                     str(sequence_dir / "background.png"), "--masks", str(tmp_path / "m"))
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "m").glob("*.png"))) == 3  # the frames of images/, not background.png


def test_phase_picture_maps_zero_phase_to_mid_grey() -> None:
    from app.pipeline.hologram import phase_picture

    phase = np.array([[0.0, np.pi / 2, -np.pi / 2, 3.1]], np.float32)
    channels = np.stack([np.sin(phase), 1.0 - np.cos(phase), np.zeros_like(phase)])
    picture = phase_picture(channels)
    assert picture.dtype == np.uint8 and picture.shape == (1, 4)
    assert abs(int(picture[0, 0]) - 128) <= 1
    assert abs(int(picture[0, 1]) - 191) <= 2 and abs(int(picture[0, 2]) - 64) <= 2 and picture[0, 3] > 250


class _Capture:
    def __init__(self) -> None:
        self.pictures: list[np.ndarray] = []

    def write(self, item) -> None:
        self.pictures.append(item.overlay)

    def close(self) -> None:
        pass


@pytest.mark.parametrize("base", ["auto", "frame"])
def test_overlay_draws_on_the_phase_of_a_hologram(sequence_dir, base) -> None:
    """overlay.base auto: the overlay shows the demodulated phase (mid-grey background), not the fringes."""
    from app.config import Config, replace
    from app.pipeline.inference import InferenceWorker
    from app.pipeline.overlay import OverlayRenderer
    from app.pipeline.runner import run_sequential
    from app.pipeline.sources import open_source
    from tests.pipeline_helpers import FakeBackend

    config = replace(Config(), source={"uri": str(sequence_dir / "images")})
    settings = PreprocessSettings(in_channels=3, hologram="offaxis", normalization=(("mode", "none"),),
                                  background_file=str(sequence_dir / "background.png"))
    capture = _Capture()
    renderer = OverlayRenderer([(0, 0, 0), (0, 255, 0)], alpha=0.0, contours=False, hud=False, base=base)
    run_sequential(open_source(config.source.uri, config, realtime=False), Preprocessor(settings),
                   InferenceWorker(FakeBackend()), renderer, [capture])
    first = capture.pictures[0][:, :, 0].astype(float)
    raw = cv2.imread(str(sequence_dir / "images" / "000000.png"), cv2.IMREAD_UNCHANGED)
    if base == "auto":
        assert abs(np.median(first) - 128) < 12  # the phase picture: background at zero phase
    else:  # alpha 0, no outlines: the picture is the raw frame as the renderer shows it
        expected = renderer.render(raw, np.zeros(raw.shape[:2], np.uint8), None)
        np.testing.assert_array_equal(capture.pictures[0], expected)
