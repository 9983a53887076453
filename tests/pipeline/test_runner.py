"""The runner's structure: one set of stage objects, two drivers with the same outputs, edge policies."""

from __future__ import annotations

import numpy as np
import pytest

from app.config import replace
from app.pipeline.frames import EndOfStream
from app.pipeline.queues import EdgePolicy
from app.pipeline.runner import STAGES, Pipeline, make_edges
from app.pipeline.sources import open_source
from tests.pipeline_helpers import (
    FakeBackend,
    make_stages,
    pipeline_settings,
    small_config,
    write_indexed_images,
)

pytestmark = pytest.mark.timeout(30)


class RecordingSink:
    """Keeps every frame's index, label map and overlay."""

    def __init__(self, tmp_path) -> None:
        self.path = tmp_path / "recording"
        self.items: list[tuple[int, np.ndarray, np.ndarray]] = []

    def write(self, item) -> None:
        self.items.append((item.frame.index, item.labels.copy(), item.overlay.copy()))

    def close(self) -> None:
        pass


def file_pipeline(tmp_path, count: int = 6, batch_size: int = 1, **settings):
    folder = tmp_path / "frames"
    if not folder.exists():
        write_indexed_images(folder, count, size=32)
    source = open_source(str(folder), small_config())
    preprocessor, worker, renderer = make_stages(FakeBackend(), batch_size=batch_size)
    sink = RecordingSink(tmp_path)
    return Pipeline(source, preprocessor, worker, renderer, [sink],
                    pipeline_settings(batch_size=batch_size, **settings)), sink


def live_source():
    config = replace(small_config(), source={"fps": 50.0}, synth={"size": 32, "frames": 4, "num_cells": 1,
                                                                  "num_particles": 0, "num_dust_rings": 0})
    return open_source("synthetic", config)


def test_a_pipeline_is_five_stage_objects_of_the_same_shape(tmp_path):
    pipeline, _ = file_pipeline(tmp_path, batch_size=3)
    assert tuple(stage.name for stage in pipeline.stages) == STAGES
    for stage in pipeline.stages:
        assert callable(stage.process) and callable(stage.close) and callable(stage.prepare)
    assert [stage.batch_size for stage in pipeline.stages] == [1, 1, 3, 1, 1]
    pipeline.source.close()


def test_the_stage_objects_can_be_driven_by_hand(tmp_path):
    pipeline, sink = file_pipeline(tmp_path, count=2)
    source, *rest = pipeline.stages
    for _ in range(2):
        items = source.process([])
        for stage in rest:
            stage.prepare(items)
            items = stage.process(items)
        assert len(items) == 1
    assert isinstance(source.process([])[0], EndOfStream)
    for stage in pipeline.stages:
        stage.close()
    assert [index for index, _, _ in sink.items] == [0, 1]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_threaded_and_sequential_drivers_give_identical_outputs(tmp_path, batch_size):
    threaded, threaded_sink = file_pipeline(tmp_path, batch_size=batch_size)
    sequential, sequential_sink = file_pipeline(tmp_path, batch_size=batch_size)
    results = threaded.run(), sequential.run_sequential()
    assert [result.mode for result in results] == ["threaded", "sequential"]
    assert [index for index, _, _ in threaded_sink.items] == list(range(6))
    assert len(sequential_sink.items) == 6
    for (index, labels, overlay), (seq_index, seq_labels, seq_overlay) in zip(
            threaded_sink.items, sequential_sink.items, strict=True):
        assert index == seq_index
        np.testing.assert_array_equal(labels, seq_labels)
        np.testing.assert_array_equal(overlay, seq_overlay)
    for result in results:
        assert result.frames == 6 and result.stopped == "end of stream" and result.frames_dropped == 0
        assert {name: row["frames"] for name, row in result.stats.items()} == dict.fromkeys(STAGES, 6)


def test_a_live_source_drops_the_oldest_before_the_model_and_a_file_source_blocks(tmp_path):
    preprocessor, worker, renderer = make_stages(FakeBackend(), batch_size=2)
    settings = pipeline_settings(queue_size=5, batch_size=2)
    source = live_source()
    live = Pipeline(source, preprocessor, worker, renderer, [], settings)
    source.close()
    assert {name: edge.policy for name, edge in live.edges.items()} == {
        "source": EdgePolicy.DROP_OLDEST, "preprocess": EdgePolicy.DROP_OLDEST,
        "inference": EdgePolicy.BLOCK, "overlay": EdgePolicy.BLOCK}
    assert {name: edge.maxsize for name, edge in live.edges.items()} == {
        "source": 5, "preprocess": 2, "inference": 5, "overlay": 5}  # one batch waits for the model
    files, _ = file_pipeline(tmp_path, queue_size=5, batch_size=2)
    files.source.close()
    assert {name: (edge.policy, edge.maxsize) for name, edge in files.edges.items()} == dict.fromkeys(
        STAGES[:-1], (EdgePolicy.BLOCK, 5))
    assert make_edges(True, settings).keys() == make_edges(False, settings).keys() == set(STAGES[:-1])


def test_unfinished_names_the_stages_and_files_still_open(tmp_path):
    """What a third Ctrl-C reports as left unfinished: every stage not closed yet (with its frame) and
    the sinks' files, one by one as they are closed."""
    write_indexed_images(tmp_path / "frames", 2, size=32)
    first, second = RecordingSink(tmp_path / "a"), RecordingSink(tmp_path / "b")
    preprocessor, worker, renderer = make_stages(FakeBackend())
    pipeline = Pipeline(open_source(str(tmp_path / "frames"), small_config()), preprocessor, worker, renderer,
                        [first, second], pipeline_settings())
    assert pipeline.unfinished() == ["source", "preprocess", "inference", "overlay",
                                     f"sinks ({first.path}, {second.path})"]
    seen = []
    second.close = lambda: seen.append(pipeline.unfinished())
    pipeline.run_sequential()  # closes the sinks first, then the other stages
    assert seen == [["source", "preprocess (frame 1)", "inference (frame 1)", "overlay (frame 1)",
                     f"sinks ({second.path})"]]
    assert pipeline.unfinished() == []


@pytest.mark.parametrize("sequential", [False, True])
def test_stop_ends_an_endless_live_run_from_another_thread(sequential):
    import threading

    config = replace(small_config(), source={"fps": 50.0, "loop": True},
                     synth={"size": 32, "frames": 4, "num_cells": 1, "num_particles": 0, "num_dust_rings": 0})
    source = open_source("synthetic", config)
    preprocessor, worker, renderer = make_stages(FakeBackend())

    class Counting:
        path = "<count>"

        def __init__(self) -> None:
            self.frames = 0
            self.three = threading.Event()

        def write(self, item) -> None:
            self.frames += 1
            if self.frames >= 3:
                self.three.set()

        def close(self) -> None:
            pass

    sink = Counting()
    pipeline = Pipeline(source, preprocessor, worker, renderer, [sink], pipeline_settings())
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(
        result=pipeline.run_sequential() if sequential else pipeline.run()))
    before = set(threading.enumerate())
    runner.start()
    assert sink.three.wait(20), "the live run never delivered three frames"
    pipeline.stop()
    runner.join(20)
    assert not runner.is_alive()
    assert outcome["result"].stopped == "stopped" and outcome["result"].frames >= 3
    assert set(threading.enumerate()) <= before
