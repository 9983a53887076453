"""The Python API (app.api.Segmenter): README's example as written, predict against stream, early exit
joins every thread, backpressure keeps every frame, overrides and bad input."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile

from app import Segmenter
from app.api import Result
from app.config import ConfigError, load_config
from app.errors import AppError
from app.pipeline.sources import SourceError
from app.synthesis import make_sequence
from tests.conftest import REPO_ROOT

FRAMES = 4
SIZE = 96


def synthetic_frames(count: int = FRAMES) -> list[np.ndarray]:
    synth = dataclasses.replace(load_config().synth, frames=count, size=SIZE, seed=3)
    return [frame.image for frame in make_sequence(synth)]


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return Segmenter("weights/icnet_interferogram.pt", device="cpu")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("api") / "run.tif"
    tifffile.imwrite(path, np.stack(synthetic_frames()), photometric="minisblack")
    return path


def readme_example() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("\n## Python API\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the shipped weights resolve from any directory
    tifffile.imwrite("run.tif", np.stack(synthetic_frames()), photometric="minisblack")
    printed = io.StringIO()
    namespace: dict[str, object] = {}
    with contextlib.redirect_stdout(printed):
        exec(compile(readme_example(), "README.md", "exec"), namespace)
    labels = namespace["labels"]
    assert isinstance(labels, np.ndarray) and labels.shape == (SIZE, SIZE) and labels.dtype == np.uint8
    lines = printed.getvalue().splitlines()
    assert [int(line.split()[0]) for line in lines] == list(range(FRAMES))
    assert all("'cell'" in line for line in lines)


def test_stream_yields_every_frame_of_a_stack_as_the_pipeline_makes_it(segmenter: Segmenter, stack: Path) -> None:
    frames = synthetic_frames()
    results = list(segmenter.stream(stack))
    assert [r.frame_index for r in results] == list(range(FRAMES))
    assert all(isinstance(r, Result) and r.labels.shape == (SIZE, SIZE) for r in results)
    assert all(r.overlay.shape == (SIZE, SIZE, 3) and r.overlay.dtype == np.uint8 for r in results)
    timestamps = [r.timestamp for r in results]
    assert timestamps[0] == 0.0 and timestamps == sorted(timestamps)
    assert all(abs(sum(r.stats["class_fractions"].values()) - 1.0) < 1e-9 for r in results)
    assert all(r.stats["frames_dropped"] == 0 and r.stats["latency_ms"] > 0 for r in results)
    assert segmenter.last_result is not None and segmenter.last_result.frames == FRAMES
    assert segmenter.last_result.mode == "threaded"
    # the first frame sees the same preprocessing (hologram reference from itself) as predict()
    np.testing.assert_array_equal(results[0].labels, segmenter.predict(frames[0]))
    assert results[0].labels.any()


def test_leaving_the_loop_early_stops_the_pipeline_and_joins_its_threads(segmenter: Segmenter,
                                                                        tmp_path: Path) -> None:
    long_stack = tmp_path / "long.tif"
    tifffile.imwrite(long_stack, np.stack(synthetic_frames(2) * 20), photometric="minisblack")
    before = set(threading.enumerate())
    segmenter.last_result = None
    seen = []
    for result in segmenter.stream(long_stack):
        seen.append(result.frame_index)
        if len(seen) == 2:
            break
    assert seen == [0, 1]
    assert set(threading.enumerate()) == before
    assert segmenter.last_result is None  # the run did not finish


def test_leaving_a_live_stream_stops_the_endless_source(segmenter: Segmenter) -> None:
    """The synthetic source under realtime runs like a camera, until stopped: leaving the loop stops
    the pipeline (Pipeline.stop) and no thread is left."""
    before = set(threading.enumerate())
    segmenter.last_result = None
    seen = 0
    for _ in segmenter.stream("synthetic", realtime=True):
        seen += 1
        if seen == 3:
            break
    assert set(threading.enumerate()) == before


def test_a_slow_loop_holds_a_file_source_back_and_loses_no_frame(stack: Path) -> None:
    slow = Segmenter(device="cpu", overrides={"pipeline.queue_size": 1})
    seen = []
    for result in slow.stream(stack):
        threading.Event().wait(0.05)  # a loop body slower than the model
        seen.append(result.frame_index)
    assert seen == list(range(FRAMES))
    assert slow.last_result is not None and slow.last_result.frames_dropped == 0


def test_max_frames_and_outputs_from_overrides(tmp_path: Path, stack: Path) -> None:
    gif = tmp_path / "run.gif"
    seg = Segmenter(device="cpu", overrides={"output.gif": str(gif), "pipeline.batch_size": 2})
    assert seg.config.pipeline.batch_size == 2
    assert len(list(seg.stream(stack, max_frames=3))) == 3
    assert gif.read_bytes()[:3] == b"GIF"


def test_half_and_backend_reach_the_config() -> None:
    seg = Segmenter(device="cpu", half=True, backend="onnx")
    assert (seg.config.model.device, seg.config.model.precision, seg.config.model.backend) == ("cpu", "fp16", "onnx")
    assert Path(seg.config.model.weights).resolve() == REPO_ROOT / "weights" / "icnet_interferogram.pt"


def test_a_misspelled_override_says_what_was_meant() -> None:
    with pytest.raises(ConfigError, match="did you mean 'pipeline.batch_size'"):
        Segmenter(overrides={"pipeline.batchsize": 2})
    with pytest.raises(ConfigError, match="must name a section and a key"):
        Segmenter(overrides={"batch_size": 2})


def test_predict_takes_gray_colour_16_bit_and_float_images(segmenter: Segmenter) -> None:
    frame = synthetic_frames(1)[0]
    reference = segmenter.predict(frame)
    assert reference.shape == frame.shape and reference.dtype == np.uint8
    as_float = frame.astype(np.float64) / 255.0
    colour = np.repeat(frame[:, :, None], 3, axis=2)
    for image in (as_float, colour, frame.astype(np.uint16) * 257, frame[:, :, None]):
        labels = segmenter.predict(image)
        assert labels.shape == frame.shape
        assert (labels == reference).mean() > 0.99


@pytest.mark.parametrize("image", [np.zeros((4, 4, 2), np.uint8), np.zeros(16, np.uint8),
                                   np.zeros((8, 8), np.int64), [[0, 1], [1, 0]]])
def test_predict_refuses_what_is_not_an_image(segmenter: Segmenter, image: object) -> None:
    with pytest.raises(AppError, match="predict takes"):
        segmenter.predict(image)  # type: ignore[arg-type]


def test_a_missing_source_is_a_source_error(segmenter: Segmenter, tmp_path: Path) -> None:
    with pytest.raises(SourceError):
        next(segmenter.stream(tmp_path / "none.tif"))


def test_import_app_stays_light() -> None:
    code = "import sys, app; assert 'torch' not in sys.modules and 'app.api' not in sys.modules; print(app.__all__)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Segmenter" in done.stdout, done.stderr
