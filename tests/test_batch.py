"""``python -m app.batch`` on a local Ray: masks equal app.replay's, faults stay per sequence, reruns resume.

One local Ray for the module (``ray_session``); the tests that use it are marked slow (about 40 s in all).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from app import batch, replay, synth
from app.batching import engine
from app.batching.outputs import SequenceWriter
from app.batching.stages import SegmentActor
from app.config import load_config
from app.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, AppError

FRAMES = 4
SIZE = 96


def _synth(folder: Path, seed: int, *extra: str) -> Path:
    assert synth.main(["--out", str(folder), "--frames", str(FRAMES), "--size", str(SIZE), "--seed", str(seed),
                       *extra]) == EXIT_OK
    return folder


@pytest.fixture(scope="module")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A folder with one corrupt frame, a propagated sequence with its background hologram, a TIFF stack
    and a glob: four kinds of SRC, each a small synthetic hologram sequence."""
    import tifffile

    root = tmp_path_factory.mktemp("recordings")
    dish = _synth(root / "dish", 10)
    (dish / "images" / "000002.png").write_bytes((dish / "images" / "000002.png").read_bytes()[:100])
    prop = _synth(root / "prop", 11, "--set", "synth.generator=propagated")
    stacked = _synth(root / "stacked", 12)
    stack = root / "stack.tif"
    tifffile.imwrite(stack, photometric="minisblack", data=np.stack([cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
                                      for path in sorted((stacked / "images").glob("*.png"))]))
    globbed = _synth(root / "globbed", 13)
    listing = root / "list.txt"
    listing.write_text(f"dish\n# the propagated sequence, with its background hologram\nprop\t{prop}/background.png\n")
    return {"dish": dish, "prop": prop, "stack": stack, "glob": globbed / "images", "listing": listing}


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _masks(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.png"))}


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_a_bad_source_is_one_line_and_exit_2_before_ray_starts(tmp_path, capsys, monkeypatch, restore_signals):
    monkeypatch.setattr(engine, "connect", lambda *a, **k: pytest.fail("Ray was started"))
    assert batch.main([str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"app.batch: error: no such file or folder: {tmp_path / 'missing'}"]
    assert batch.main(["camera0", "--out", str(tmp_path / "out")]) == EXIT_USAGE
    assert "not a recording" in capsys.readouterr().err


def test_without_ray_the_command_says_so_in_one_line(recordings, tmp_path, capsys, monkeypatch, restore_signals):
    monkeypatch.setitem(__import__("sys").modules, "ray", None)
    assert batch.main([str(recordings["dish"]), "--out", str(tmp_path / "out")]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install '.[batch]'" in err[0]


def test_the_writer_puts_frames_in_order_once_whatever_order_and_repeats_they_come_in(tmp_path):
    writer = SequenceWriter(tmp_path, "seq", "seq", ["background", "cell"], started=0.0)
    labels = {index: np.full((8, 8), index % 2, np.uint8) for index in (0, 1, 3)}  # frame 2 was unreadable
    for index, previous in ((3, 1), (0, -1), (3, 1), (1, 0), (0, -1)):
        writer.add(index, previous, f"f{index}.png", labels[index], read_at=1.0, done_at=2.0, node="n1")
        assert not writer.complete()
    writer.end(3, frames_read=3, frames_skipped=1, error="")
    assert writer.complete()
    summary = writer.commit()
    assert (summary["frames"], summary["duplicates_dropped"], summary["frames_skipped"]) == (3, 2, 1)
    assert sorted(_masks(tmp_path / "seq" / "masks")) == ["f0.png", "f1.png", "f3.png"]
    rows = (tmp_path / "seq" / "frames.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["0", "1", "3"]
    assert not (tmp_path / ".seq.partial").exists()


def test_the_pool_takes_one_gpu_per_actor_on_a_gpu_cluster_and_fits_cpu_actors_beside_a_reader():
    config = load_config(None, ["batch.cpus_per_actor=2", "batch.cpus_per_reader=0.5"])
    assert engine.PoolPlan.for_cluster(config, {"CPU": 16.0, "GPU": 2.0}) == engine.PoolPlan(2, 2.0, 1.0, 2)
    assert engine.PoolPlan.for_cluster(config, {"CPU": 8.0}) == engine.PoolPlan(3, 2.0, 0.0, 2)
    on_cpu = load_config(None, ["model.device=cpu"])
    assert engine.PoolPlan.for_cluster(on_cpu, {"CPU": 4.0, "GPU": 1.0}) == engine.PoolPlan(3, 1.0, 0.0, 1)
    assert engine.PoolPlan.for_cluster(load_config(None, ["batch.actors=5"]), {"CPU": 2.0}).actors == 5


def test_steady_fps_leaves_out_the_pools_start_up():
    # actor a is up at t=10, actor b only at t=20: from then on 2 frames a second
    times = [("a", 10.0), ("a", 20.0), ("b", 20.0), *((actor, 20.0 + t) for t in range(1, 11) for actor in "ab")]
    assert engine.steady_fps(times) == pytest.approx(2.0)


def test_a_listing_names_sequences_relative_to_itself_with_optional_backgrounds(recordings):
    from app.batching.sequences import expand_sources

    specs = expand_sources([str(recordings["listing"]), str(recordings["dish"])], load_config())
    assert [(spec.name, spec.background.endswith("background.png"), spec.frames) for spec in specs] == [
        ("dish", False, FRAMES), ("prop", True, FRAMES), ("dish-2", False, FRAMES)]
    bad = recordings["listing"].with_name("bad.lst")
    bad.write_text("dish\tno_such_background.png\n")
    with pytest.raises(AppError, match="background hologram not found"):
        expand_sources([str(bad)], load_config())


def test_the_read_stage_stops_at_max_frames_and_ends_a_strict_sequence_at_its_corrupt_frame(recordings):
    from app.batching.stages import read_sequence
    from app.pipeline.factory import build_preprocessor, load_model

    def rows(*overrides):
        config = load_config(None, overrides)
        settings = build_preprocessor(config, load_model(config)[1]).settings
        blocks = list(read_sequence(7, str(recordings["dish"]), "", config, settings, frames_per_block=2))
        return [row for block in blocks
                for row in zip(block["index"], block["previous"], block["end"], block["error"], strict=True)]

    first_two = rows("pipeline.max_frames=2")
    assert [(int(index), int(previous), bool(end)) for index, previous, end, _ in first_two] == [
        (0, -1, False), (1, 0, False), (-1, 1, True)]
    strict = rows("source.strict=true")
    assert [int(index) for index, *_ in strict] == [0, 1, -1]  # the driver discards a failed sequence
    assert "000002.png" in strict[-1][3]


@pytest.mark.slow
def test_masks_equal_replay_for_every_kind_of_sequence(ray_session, recordings, tmp_path, restore_signals):
    out = tmp_path / "batch"
    sources = [str(recordings["listing"]), str(recordings["stack"]), str(recordings["glob"] / "*.png")]
    assert batch.main([*sources, "--out", str(out), "--set", "batch.frames_per_block=3"]) == EXIT_OK
    summary = _summary(out)
    assert summary["counts"] == {"done": 4}
    assert summary["sequences"]["dish"]["frames_skipped"] == 1  # the corrupt frame, counted
    names = {"dish": [str(recordings["dish"])], "prop": [str(recordings["prop"]), "--background",
                                                         str(recordings["prop"] / "background.png")],
             "stack": [str(recordings["stack"])], "images": [str(recordings["glob"] / "*.png")]}
    for name, args in names.items():
        assert replay.main([*args, "--masks", str(tmp_path / name)]) == EXIT_OK
        expected = _masks(tmp_path / name)
        assert len(expected) == (FRAMES - 1 if name == "dish" else FRAMES)
        assert _masks(out / name / "masks") == expected, name
        assert summary["sequences"][name]["frames"] == len(expected)
    assert sum(node["frames"] for node in summary["nodes"].values()) == summary["frames"] == 4 * FRAMES - 1


@pytest.mark.slow
def test_strict_fails_only_the_sequence_with_the_corrupt_frame(ray_session, recordings, tmp_path, restore_signals,
                                                               capsys):
    out = tmp_path / "batch"
    code = batch.main([str(recordings["dish"]), str(recordings["stack"]), "--out", str(out),
                       "--set", "source.strict=true"])
    assert code == EXIT_FAILURE
    assert "1 of 2 sequences failed" in capsys.readouterr().err
    summary = _summary(out)
    assert [failure["name"] for failure in summary["failures"]] == ["dish"]
    assert "000002.png" in summary["failures"][0]["error"]
    assert sorted(path.name for path in out.iterdir()) == ["manifest.json", "stack", "summary.json"]
    assert len(_masks(out / "stack" / "masks")) == FRAMES


@pytest.mark.slow
def test_an_interrupted_run_resumes_skipping_the_finished_sequences(ray_session, recordings, tmp_path):
    from app.batching.sequences import expand_sources

    config = load_config(None, ["batch.frames_per_block=1"])
    specs = expand_sources([str(recordings["prop"]), str(recordings["stack"]), str(recordings["glob"])], config)
    out = tmp_path / "batch"

    def interrupt_after_the_first_sequence(frames, expected, fps):
        if (out / "manifest.json").exists():
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine.run_batch(config, specs, out, progress=interrupt_after_the_first_sequence)
    first = _summary(out)
    finished = [name for name, result in first["sequences"].items() if result["status"] == "done"]
    assert first["interrupted"] and 1 <= len(finished) < 3
    assert not list(out.glob(".*.partial"))  # the sequences in flight left nothing behind
    stamps = {name: (out / name / "summary.json").stat().st_mtime_ns for name in finished}
    summary = engine.run_batch(config, specs, out)
    assert summary["counts"] == {"skipped": len(finished), "done": 3 - len(finished)}
    assert all(summary["sequences"][name]["frames"] == FRAMES for name in finished)
    assert engine.run_batch(config, specs, out)["counts"] == {"skipped": 3}  # all done: Ray is not even needed
    assert {name: (out / name / "summary.json").stat().st_mtime_ns for name in finished} == stamps
    for spec in specs:
        assert len(_masks(out / spec.name / "masks")) == FRAMES


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_retried_with_no_frame_lost_or_repeated(ray_session, recordings, tmp_path,
                                                                           monkeypatch):
    from app.batching.sequences import expand_sources

    marker = tmp_path / "killed"

    class DiesOnce(SegmentActor):
        def __call__(self, batch):
            if not marker.exists():  # the first block: the actor's process dies mid-run
                marker.touch()
                os._exit(1)
            return super().__call__(batch)

    monkeypatch.setattr(engine, "SegmentActor", DiesOnce)
    config = load_config(None, ["batch.frames_per_block=2"])
    specs = expand_sources([str(recordings["stack"]), str(recordings["glob"])], config)
    summary = engine.run_batch(config, specs, tmp_path / "batch")
    assert marker.exists()
    assert summary["counts"] == {"done": 2} and summary["frames"] == 2 * FRAMES
    for spec in specs:
        assert len(_masks(tmp_path / "batch" / spec.name / "masks")) == FRAMES
    shutil.rmtree(tmp_path / "batch")
