"""Threaded pipeline and sequential loop: ordering, batching, drop policy, errors, interruption, no hangs."""

from __future__ import annotations

import os
import queue
import threading
import time

import cv2
import numpy as np
import pytest

from app.config import replace
from app.pipeline.frames import END_OF_STREAM
from app.pipeline.inference import InferenceWorker
from app.pipeline.preprocess import Preprocessor, PreprocessSettings
from app.pipeline.queues import Stopped, collect_batch
from app.pipeline.runner import STAGES, Pipeline, PipelineError, run_sequential
from app.pipeline.sinks import GifSink, MaskFolderSink, VideoSink
from app.pipeline.sources import open_source
from tests.pipeline_helpers import (
    FakeBackend,
    count_video_frames,
    index_preprocessor,
    make_stages,
    pipeline_settings,
    read_gif,
    small_config,
    write_indexed_images,
)

pytestmark = pytest.mark.timeout(30)


def folder_source(tmp_path, count: int = 16, size: int = 64):
    write_indexed_images(tmp_path / "frames", count, size=size)
    return open_source(str(tmp_path / "frames"), small_config())


def file_sinks(tmp_path, name: str):
    return [VideoSink(tmp_path / f"{name}.mp4"), GifSink(tmp_path / f"{name}.gif", stride=1, scale=1.0),
            MaskFolderSink(tmp_path / f"{name}_masks")]


def mask_indices(folder) -> list[int]:
    """The frame numbers of the masks, named after the source images frame0.png …"""
    return sorted(int(p.stem.removeprefix("frame")) for p in folder.iterdir())


@pytest.mark.parametrize("runner", ["threaded", "sequential"])
def test_file_source_runs_completely_with_valid_outputs_and_stats(tmp_path, runner):
    source = folder_source(tmp_path, count=16)
    preprocessor, worker, renderer = make_stages(FakeBackend(), batch_size=1 if runner == "sequential" else 4)
    args = (source, preprocessor, worker, renderer, file_sinks(tmp_path, runner), pipeline_settings())
    result = Pipeline(*args).run() if runner == "threaded" else run_sequential(*args)
    assert result.frames == 16 and result.stopped == "end of stream" and result.mode == runner
    assert result.frames_dropped == 0 and result.fps > 0
    assert set(result.stats) == set(STAGES)
    for row in result.stats.values():
        assert row["frames"] == 16
        assert {"fps", "mean_ms", "p50_ms", "p95_ms", "queue_max", "queue_mean", "dropped"} <= set(row)
    assert count_video_frames(tmp_path / f"{runner}.mp4") == (16, (64, 64))
    assert len(read_gif(tmp_path / f"{runner}.gif")) == 16
    assert mask_indices(tmp_path / f"{runner}_masks") == list(range(16))


def test_threaded_and_sequential_produce_identical_label_maps(tmp_path):
    for runner in ("threaded", "sequential"):
        source = folder_source(tmp_path / runner, count=6)
        preprocessor, worker, renderer = make_stages(FakeBackend(), batch_size=3)
        sinks = [MaskFolderSink(tmp_path / runner / "masks")]
        args = (source, preprocessor, worker, renderer, sinks, pipeline_settings())
        (Pipeline(*args).run() if runner == "threaded" else run_sequential(*args))
    for index in range(6):
        name = f"frame{index}.png"
        threaded = cv2.imread(str(tmp_path / "threaded" / "masks" / name), cv2.IMREAD_UNCHANGED)
        sequential = cv2.imread(str(tmp_path / "sequential" / "masks" / name), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(threaded, sequential)
        assert threaded.max() == 1


def test_batches_fill_up_and_warmup_happens_once_before_timing(tmp_path):
    backend = FakeBackend(delay_s=0.02)
    source = folder_source(tmp_path, count=12)
    preprocessor, worker, renderer = make_stages(backend, batch_size=4)
    result = Pipeline(source, preprocessor, worker, renderer, [], pipeline_settings(batch_size=4)).run()
    assert result.frames == 12
    assert max(backend.batch_sizes) == 4 and sum(backend.batch_sizes) == 12
    assert backend.warmups == [(4, 1, 64, 64)]
    assert result.stats["inference"]["mean_batch"] > 1


def test_labels_come_back_at_source_resolution_when_preprocessing_resizes(tmp_path):
    source = folder_source(tmp_path, count=3, size=64)
    preprocessor = Preprocessor(PreprocessSettings(in_channels=1, input_size=32,
                                                   normalization=(("mode", "none"),)))
    _, worker, renderer = make_stages(FakeBackend())
    sinks = [MaskFolderSink(tmp_path / "masks")]
    Pipeline(source, preprocessor, worker, renderer, sinks, pipeline_settings()).run()
    mask = cv2.imread(str(tmp_path / "masks" / "frame0.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (64, 64) and mask[32, 32] == 1 and mask[2, 2] == 0


def test_worker_only_stacks_frames_of_equal_shape():
    backend = FakeBackend()
    worker = InferenceWorker(backend, batch_size=4)
    tensors = [np.zeros((1, 32, 32), np.float32)] * 2 + [np.zeros((1, 16, 16), np.float32)] * 2
    labels = worker.predict(tensors, [(32, 32), (32, 32), (16, 16), (48, 48)])
    assert backend.batch_sizes == [2, 2]
    assert [label.shape for label in labels] == [(32, 32), (32, 32), (16, 16), (48, 48)]


def test_collect_batch_waits_at_most_the_batch_timeout():
    items: queue.Queue = queue.Queue(maxsize=8)
    stop = threading.Event()
    items.put("a")
    start = time.perf_counter()
    batch, ended = collect_batch(items, stop, batch_size=4, batch_timeout_ms=50, is_end=lambda i: i is END_OF_STREAM)
    assert batch == ["a"] and not ended
    assert 0.04 <= time.perf_counter() - start < 0.5
    for item in ("b", "c", END_OF_STREAM):
        items.put(item)
    assert collect_batch(items, stop, 4, 50, lambda i: i is END_OF_STREAM) == (["b", "c"], True)
    threading.Timer(0.1, stop.set).start()
    with pytest.raises(Stopped):
        collect_batch(items, stop, 4, 50, lambda i: i is END_OF_STREAM)


# -- drop policy ---------------------------------------------------------------------------------------

def test_slow_stage_behind_a_live_source_drops_frames_and_keeps_queues_bounded(tmp_path):
    config = replace(small_config(), source={"fps": 50.0},
                     synth={"size": 32, "frames": 60, "num_cells": 1, "num_particles": 0, "num_dust_rings": 0})
    source = open_source("synthetic", config)
    assert source.live
    preprocessor, worker, renderer = make_stages(FakeBackend(delay_s=0.05))
    settings = pipeline_settings(queue_size=6)
    start = time.perf_counter()
    result = Pipeline(source, preprocessor, worker, renderer, [], settings).run()
    elapsed = time.perf_counter() - start
    # The source stage never waits for the model, so the camera clock rarely has to skip frames itself;
    # the oldest queued frames are discarded instead, also in front of the slow model.
    queue_drops = result.stats["source"]["dropped"] - result.source["frames_dropped"]
    assert queue_drops + result.stats["preprocess"]["dropped"] > 15 and result.source["frames_dropped"] <= 5
    assert result.frames_dropped == result.stats["source"]["dropped"] + result.stats["preprocess"]["dropped"]
    assert result.frames + result.frames_dropped == 60
    assert all(row["queue_max"] <= 6 for row in result.stats.values())
    assert result.stats["inference"]["queue_max"] <= 1  # only the newest batch waits for the model
    assert elapsed < 1.2 + 0.05 * 12  # the source kept its pace: 60 frames at 50 fps, plus the backlog
    # The 50 ms model plus at most one source interval (20 ms), not 6 queued frames or model calls.
    assert 50 <= result.latency["p50_ms"] < 100 and result.latency["p95_ms"] < 130


def test_the_same_slow_stage_behind_a_file_source_loses_nothing(tmp_path):
    source = folder_source(tmp_path, count=15)
    assert not source.live
    preprocessor, worker, renderer = make_stages(FakeBackend(delay_s=0.02))
    sinks = [MaskFolderSink(tmp_path / "masks")]
    result = Pipeline(source, preprocessor, worker, renderer, sinks, pipeline_settings(queue_size=2)).run()
    assert result.frames == 15 and result.frames_dropped == 0
    assert mask_indices(tmp_path / "masks") == list(range(15))
    assert all(row["queue_max"] <= 2 for row in result.stats.values())


class SlowWarmupBackend(FakeBackend):
    def warmup(self, shape, iters=2):
        super().warmup(shape, iters)
        time.sleep(0.5)


@pytest.mark.parametrize("live", [True, False])
def test_the_source_waits_for_the_warm_up_so_latencies_are_measured(tmp_path, live):
    if live:
        config = replace(small_config(), source={"fps": 50.0},
                         synth={"size": 32, "frames": 200, "num_cells": 1, "num_particles": 0, "num_dust_rings": 0})
        source = open_source("synthetic", config)
    else:
        source = folder_source(tmp_path, count=10)
    preprocessor, worker, renderer = make_stages(SlowWarmupBackend())
    result = Pipeline(source, preprocessor, worker, renderer, [], pipeline_settings(max_frames=10)).run()
    assert result.frames == 10
    # Frames read during the 0.5 s warm-up would all be left out of the latency (reported as 0).
    assert 0 < result.latency["p95_ms"] < 300


def test_max_frames_stops_early(tmp_path):
    source = folder_source(tmp_path, count=16)
    preprocessor, worker, renderer = make_stages(FakeBackend())
    result = Pipeline(source, preprocessor, worker, renderer, [], pipeline_settings(max_frames=5)).run()
    assert result.frames == 5 and result.stopped == "max_frames"


# -- errors, interruption, no hangs --------------------------------------------------------------------

class FailingOn:
    """Wraps a stage callable/object so that it raises on frame ``index`` (after ``delay_s``)."""

    def __init__(self, index: int, delay_s: float = 0.3) -> None:
        self.index, self.delay_s = index, delay_s

    def check(self, frame_index: int) -> None:
        if frame_index == self.index:
            time.sleep(self.delay_s)  # let earlier frames reach the sinks first
            raise RuntimeError(f"broken at {frame_index}")


@pytest.mark.parametrize("stage", ["preprocess", "inference", "overlay", "sinks"])
@pytest.mark.parametrize("runner", ["threaded", "sequential"])
def test_a_failing_stage_stops_everything_names_itself_and_leaves_playable_outputs(tmp_path, stage, runner):
    fail = FailingOn(6)
    source = folder_source(tmp_path, count=40)
    preprocessor, worker, renderer = make_stages(FakeBackend(fail_on=6 if stage == "inference" else None),
                                                 preprocessor=index_preprocessor)
    sinks = file_sinks(tmp_path, "out")
    if stage == "preprocess":
        def preprocessor(image):
            fail.check(int(image[0, 0]))
            return index_preprocessor(image)
    elif stage == "overlay":
        original = renderer.render

        def render(image, labels, hud=None):
            fail.check(int(image[0, 0]))
            return original(image, labels, hud)
        renderer.render = render
    elif stage == "sinks":
        class Exploding:
            path = tmp_path / "exploding"

            def write(self, item):
                fail.check(item.frame.index)

            def close(self):
                pass
        sinks.insert(0, Exploding())
    elif stage == "inference":
        worker.backend.delay_s = 0.0
    args = (source, preprocessor, worker, renderer, sinks, pipeline_settings())
    start = time.perf_counter()
    with pytest.raises(PipelineError, match=rf"^{stage} stage failed on frame 6: RuntimeError: "
                                            rf"(broken at|boom on frame) 6") as caught:
        Pipeline(*args).run() if runner == "threaded" else run_sequential(*args)
    assert time.perf_counter() - start < 5.0
    assert caught.value.stage == stage and caught.value.frame_index == 6
    frames, _ = count_video_frames(tmp_path / "out.mp4")
    assert 1 <= frames <= 6
    assert len(read_gif(tmp_path / "out.gif")) == frames
    assert not list(tmp_path.glob(".*partial*"))


def test_a_failing_source_is_named_with_its_message(tmp_path):
    write_indexed_images(tmp_path / "frames", 5)
    (tmp_path / "frames" / "frame2.png").write_bytes(b"corrupt")
    source = open_source(str(tmp_path / "frames"), replace(small_config(), source={"strict": True}))
    preprocessor, worker, renderer = make_stages(FakeBackend())
    with pytest.raises(PipelineError, match=r"^source stage failed: SourceError: .*frame2.png"):
        Pipeline(source, preprocessor, worker, renderer, [], pipeline_settings()).run()


class ScriptedDisplay:
    """Display double: returns ``answer`` or raises ``KeyboardInterrupt`` on call number ``at``."""

    def __init__(self, at: int, interrupt: bool) -> None:
        self.at, self.interrupt, self.calls = at, interrupt, 0

    def show(self, image: np.ndarray) -> bool:
        self.calls += 1
        assert image.dtype == np.uint8 and image.ndim == 3
        if self.calls >= self.at:
            if self.interrupt:
                raise KeyboardInterrupt
            return False
        return True


@pytest.mark.parametrize("interrupt, reason", [(True, "interrupted"), (False, "user")])
def test_ctrl_c_or_quit_stops_quickly_with_finalised_outputs(tmp_path, interrupt, reason):
    config = replace(small_config(), synth={"size": 32, "frames": 10_000, "num_cells": 1,
                                                    "num_particles": 0, "num_dust_rings": 0})
    source = open_source("synthetic", config)
    preprocessor, worker, renderer = make_stages(FakeBackend(delay_s=0.01))
    sinks = file_sinks(tmp_path, "run")
    display = ScriptedDisplay(at=5, interrupt=interrupt)
    start = time.perf_counter()
    result = Pipeline(source, preprocessor, worker, renderer, sinks, pipeline_settings(), display=display).run()
    assert time.perf_counter() - start < 3.0
    assert result.stopped == reason and result.interrupted == interrupt
    frames, size = count_video_frames(tmp_path / "run.mp4")
    assert frames == result.frames >= 5 and size == (32, 32)
    assert len(read_gif(tmp_path / "run.gif")) == frames


def test_sequential_loop_handles_ctrl_c_too(tmp_path):
    source = folder_source(tmp_path, count=30)
    preprocessor, worker, renderer = make_stages(FakeBackend())
    sinks = file_sinks(tmp_path, "seq")
    result = run_sequential(source, preprocessor, worker, renderer, sinks, pipeline_settings(),
                            display=ScriptedDisplay(at=4, interrupt=True))
    assert result.stopped == "interrupted" and result.frames == 4
    assert count_video_frames(tmp_path / "seq.mp4")[0] == 4


def test_a_stage_stuck_in_a_call_cannot_hang_the_run(tmp_path):
    source = folder_source(tmp_path, count=10)
    preprocessor, worker, renderer = make_stages(FakeBackend(delay_s=5.0))
    settings = pipeline_settings(join_timeout_s=0.3)
    display = ScriptedDisplay(at=1, interrupt=True)

    def interrupt_soon(done, total, fps):
        raise KeyboardInterrupt

    start = time.perf_counter()
    with pytest.raises(PipelineError, match="inference stage failed on frame 0: did not stop within 0.3 s"):
        Pipeline(source, preprocessor, worker, renderer, [], settings, display=display,
                 progress=interrupt_soon).run()
    assert time.perf_counter() - start < 2.0


def test_progress_reports_the_expected_total(tmp_path):
    source = folder_source(tmp_path, count=8)
    preprocessor, worker, renderer = make_stages(FakeBackend())
    calls = []
    Pipeline(source, preprocessor, worker, renderer, [], pipeline_settings(),
             progress=lambda done, total, fps: calls.append((done, total))).run()
    assert calls[-1] == (8, 8)


def test_a_pipeline_runs_once(tmp_path):
    source = folder_source(tmp_path, count=2)
    preprocessor, worker, renderer = make_stages(FakeBackend())
    pipeline = Pipeline(source, preprocessor, worker, renderer, [], pipeline_settings())
    pipeline.run()
    with pytest.raises(RuntimeError, match="runs once"):
        pipeline.run()


class AffinityBackend(FakeBackend):
    """Records the CPU set of the thread that runs inference; ``threads`` as a CPU backend reports it."""

    threads = 1

    def __init__(self) -> None:
        super().__init__()
        self.cpu_sets: list[set[int]] = []

    def predict(self, batch):
        self.cpu_sets.append(os.sched_getaffinity(0))
        return super().predict(batch)


class AffinitySink:
    """Records the CPU set of the sinks thread."""

    def __init__(self) -> None:
        self.cpu_sets: list[set[int]] = []

    def write(self, item) -> None:
        self.cpu_sets.append(os.sched_getaffinity(0))

    def close(self) -> None:
        pass


needs_two_cores = pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                                     reason="thread pinning needs Linux and two usable cores")


@needs_two_cores
@pytest.mark.parametrize("pin", [True, False])
def test_cpu_inference_gets_its_own_cores_and_the_other_stages_the_rest(tmp_path, pin):
    cores = os.sched_getaffinity(0)
    backend, sink = AffinityBackend(), AffinitySink()
    preprocessor, worker, renderer = make_stages(backend)
    result = Pipeline(folder_source(tmp_path, count=4), preprocessor, worker, renderer, [sink],
                      pipeline_settings(pin_threads=pin)).run()
    assert result.frames == 4
    inference, others = set(backend.cpu_sets[-1]), set(sink.cpu_sets[-1])
    if pin:
        assert len(inference) == 1 and inference.isdisjoint(others) and inference | others == cores
    else:
        assert inference == others == cores
    assert os.sched_getaffinity(0) == cores  # the caller's own thread is never pinned


def test_throughput_counts_from_the_first_capture_and_never_exceeds_the_steady_rate(tmp_path):
    backend = FakeBackend(delay_s=0.01)
    preprocessor, worker, renderer = make_stages(backend)
    result = Pipeline(folder_source(tmp_path, count=10), preprocessor, worker, renderer, [],
                      pipeline_settings()).run()
    assert result.frames == 10
    assert 0 < result.throughput_fps <= result.fps * 1.05
    assert result.throughput_fps < 1 / 0.01 * 1.05  # ten frames of a 10 ms model take at least 100 ms
    assert result.to_dict()["throughput_fps"] == result.throughput_fps


# -- latency counts every frame from its capture ------------------------------------------------------

@pytest.mark.parametrize("runner", ["threaded", "sequential"])
def test_a_one_frame_run_reports_its_real_latency(tmp_path, runner):
    preprocessor, worker, renderer = make_stages(SlowWarmupBackend(delay_s=0.05))
    args = (folder_source(tmp_path, count=1), preprocessor, worker, renderer, [], pipeline_settings())
    result = Pipeline(*args).run() if runner == "threaded" else run_sequential(*args)
    assert result.frames == 1
    # The model call (50 ms) counts; the 0.5 s start-up warm-up does not.
    assert 50 <= result.latency["p50_ms"] == result.latency["p95_ms"] < 400


def write_mixed_sizes(folder, sizes) -> None:
    folder.mkdir()
    for index, size in enumerate(sizes):
        image = np.zeros((size, size), np.uint8)
        cv2.circle(image, (size // 2, size // 2), size // 4, 200, -1)
        assert cv2.imwrite(str(folder / f"frame{index}.png"), image)


def test_frames_waiting_for_a_new_input_shape_to_warm_up_count_that_wait(tmp_path):
    write_mixed_sizes(tmp_path / "frames", [32, 48] * 4)
    source = open_source(str(tmp_path / "frames"), small_config())
    preprocessor, worker, renderer = make_stages(SlowWarmupBackend())
    result = Pipeline(source, preprocessor, worker, renderer, [], pipeline_settings()).run()
    assert result.frames == 8 and len(worker.backend.warmups) == 2
    # Frame 1 (48 px) and the frames read behind it wait for the second 0.5 s warm-up: real latency.
    assert result.latency["p95_ms"] >= 300 and result.latency["mean_ms"] >= 100


# -- a stage stuck in one call: the others finish, the run names it --------------------------------------

class StuckOn(FakeBackend):
    """Backend double whose call on frame ``index`` (read from the tensor) takes ``stuck_s``."""

    def __init__(self, index: int, stuck_s: float) -> None:
        super().__init__()
        self.index, self.stuck_s = index, stuck_s

    def predict(self, batch):
        if self.index in {int(round(v)) for v in batch[:, 0, 0, 0]}:
            time.sleep(self.stuck_s)
        return super().predict(batch)


def test_ctrl_c_while_inference_is_stuck_finishes_the_other_outputs_and_names_it(tmp_path):
    from app.pipeline.runner import StageStuck

    source = folder_source(tmp_path, count=12)
    preprocessor, worker, renderer = make_stages(StuckOn(5, stuck_s=1.5), preprocessor=index_preprocessor)
    sinks = file_sinks(tmp_path, "stuck")

    class PressCtrlC:  # the display: Ctrl-C once frame 4 is on screen, while frame 5 is stuck in the model
        def show(self, image):
            if self.frames_shown() >= 5:
                raise KeyboardInterrupt
            return True

        def frames_shown(self):
            return len(list((tmp_path / "stuck_masks").glob("*.png")))

    before = set(threading.enumerate())
    start = time.perf_counter()
    with pytest.raises(StageStuck, match=r"^inference stage failed on frame 5: did not stop within 0.3 s; "
                                         r"left running, the other stages closed$") as caught:
        Pipeline(source, preprocessor, worker, renderer, sinks, pipeline_settings(join_timeout_s=0.3),
                 display=PressCtrlC()).run()
    assert time.perf_counter() - start < 2.5
    assert caught.value.left_running == ("inference",) and caught.value.exit_code == 130
    assert count_video_frames(tmp_path / "stuck.mp4")[0] == len(read_gif(tmp_path / "stuck.gif")) == 5
    assert mask_indices(tmp_path / "stuck_masks") == list(range(5))
    assert not list(tmp_path.glob(".*partial*"))
    alive = [thread for thread in threading.enumerate() if thread not in before and thread.name.startswith("stage ")]
    assert [thread.name for thread in alive] == ["stage inference"]
    alive[0].join(timeout=5)  # let the stuck call end before the next test
