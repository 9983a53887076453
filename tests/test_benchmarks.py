"""The benchmark harness: the emulated-device model, page-cache eviction, reports, and a smoke run of the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest

from app.config import ConfigError
from benchmarks import fps, report, storage
from benchmarks.storage import DeviceProfile, EmulatedDevice
from benchmarks.timing import fps_from_timestamps, repeat_rate


def _files(folder: Path, count: int, nbytes: int) -> list[Path]:
    paths = []
    for index in range(count):
        path = folder / f"{index:03d}.bin"
        path.write_bytes(os.urandom(nbytes))
        paths.append(path)
    return paths


def test_fps_counts_intervals_between_first_and_last_completion() -> None:
    assert fps_from_timestamps([1.0, 1.5, 2.0]) == pytest.approx(2.0)
    assert fps_from_timestamps([0.0, 1.0], items_per_stamp=4) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        fps_from_timestamps([1.0])


def test_repeat_rate_reports_the_median_of_timed_runs_only() -> None:
    rates = iter([1.0, 100.0, 2.0, 3.0])  # the first (warm-up) run is ignored
    result = repeat_rate(lambda: [0.0, 1.0 / next(rates)], repeats=3, warmup=1)
    assert result["fps_runs"] == pytest.approx([100.0, 2.0, 3.0])
    assert result["fps"] == pytest.approx(3.0)


def test_profile_bound_follows_the_documented_formula() -> None:
    hdd = DeviceProfile("hdd", latency_s=0.008, bandwidth_bytes_s=150e6, queue_depth=1)
    nbytes = 1.0e6
    assert hdd.bound_fps(nbytes) == pytest.approx(1.0 / (0.008 + nbytes / 150e6))
    ssd = DeviceProfile("ssd", latency_s=0.0001, bandwidth_bytes_s=500e6, queue_depth=32)
    assert ssd.bound_fps(nbytes) == pytest.approx(1.0 / (0.0001 / 32 + nbytes / 500e6))
    # One reader thread cannot overlap anything: one request at a time.
    assert ssd.bound_fps(nbytes, threads=1) == pytest.approx(1.0 / (0.0001 + nbytes / 500e6))


def test_sequential_reads_take_latency_plus_size_over_bandwidth(tmp_path: Path) -> None:
    count, nbytes = 6, 400_000
    profile = DeviceProfile("test", latency_s=0.02, bandwidth_bytes_s=40e6, queue_depth=1)
    paths = _files(tmp_path, count, nbytes)
    device = EmulatedDevice(profile)
    start = time.perf_counter()
    for path in paths:
        assert len(device.read(path)) == nbytes
    elapsed = time.perf_counter() - start
    expected = count * 0.02 + count * nbytes / 40e6  # 0.12 s + 0.06 s
    assert expected * 0.6 <= elapsed <= expected * 1.4


def test_emulated_model_with_a_fake_clock_is_exact(tmp_path: Path) -> None:
    now = [0.0]
    slept = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    profile = DeviceProfile("test", latency_s=0.01, bandwidth_bytes_s=1e6, queue_depth=1)
    device = EmulatedDevice(profile, clock=lambda: now[0], sleep=sleep)
    for path in _files(tmp_path, 3, 5_000):
        device.read(path)
    assert now[0] == pytest.approx(3 * (0.01 + 0.005))


def test_hdd_seeks_do_not_overlap_but_ssd_latencies_do(tmp_path: Path) -> None:
    paths = _files(tmp_path, 8, 1_000)

    def parallel_read_s(queue_depth: int) -> float:
        device = EmulatedDevice(DeviceProfile("test", latency_s=0.03, bandwidth_bytes_s=1e9, queue_depth=queue_depth))
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(device.read, paths))
        return time.perf_counter() - start

    serial = parallel_read_s(queue_depth=1)  # 8 × 30 ms one after the other
    overlapped = parallel_read_s(queue_depth=4)  # 4 at a time: about 2 × 30 ms
    assert serial >= 8 * 0.03 * 0.9
    assert overlapped < serial / 2


def test_parallel_reader_keeps_order_and_decodes(tmp_path: Path) -> None:
    frames = [np.full((32, 32), i, np.uint8) for i in range(6)]
    for fmt in storage.FORMATS:
        paths = storage.write_frames(frames, tmp_path / fmt, fmt)
        seen: list[np.ndarray] = []
        stamps = storage.read_sequence(storage.DirectDevice(), paths, fmt, threads=3, consume=seen.append)
        assert len(stamps) == len(frames)
        assert [int(f[0, 0]) for f in seen] == list(range(6)) or fmt == "jpg"  # JPEG is lossy
        assert stamps == sorted(stamps)


def test_page_cache_eviction_reports_what_happened(tmp_path: Path) -> None:
    paths = storage.write_frames([np.zeros((64, 64), np.uint8)] * 2, tmp_path, "npy")
    state = storage.evict_page_cache(paths)
    assert set(state) == {"cold", "resident_fraction", "note"}
    assert state["cold"] in (True, False, None)
    assert state["note"]


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs a tmpfs at /dev/shm")
def test_eviction_that_cannot_work_is_reported(tmp_path: Path) -> None:
    """tmpfs pages are the files themselves: fadvise cannot drop them, and the result must say so."""
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        paths = storage.write_frames([np.zeros((64, 64), np.uint8)] * 2, Path(shm), "npy")
        state = storage.evict_page_cache(paths)
        row = storage.measure_reader(storage.DirectDevice(), paths, "npy", 1, repeats=1, warmup=0, cold=True)
    if state["cold"] is None:
        pytest.skip("mincore is not available here, so eviction cannot be verified")
    assert state["cold"] is False and "not effective" in state["note"]
    assert row["cache"] == "not evicted" and row["cache_note"]


def test_sequence_files_rejects_a_folder_without_frames(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no frames here")
    with pytest.raises(storage.StorageError, match="holds no"):
        storage.sequence_files(tmp_path)


def test_cli_arguments_are_checked() -> None:
    assert fps.parse_sections("models,storage") == ["storage", "models"]
    with pytest.raises(ConfigError, match="valid: storage"):
        fps.parse_sections("storage,disks")
    assert fps.parse_dirs(["hdd=/mnt/hdd/seq"]) == {"hdd": Path("/mnt/hdd/seq")}
    with pytest.raises(ConfigError, match="NAME=DIR"):
        fps.parse_dirs(["/mnt/hdd/seq"])


def test_cli_bad_section_is_one_plain_line_and_exit_2(capsys) -> None:
    assert fps.main(["--sections", "disks"]) == 2
    err = capsys.readouterr().err
    valid = ", ".join((*fps.SECTIONS, *fps.ON_REQUEST_SECTIONS))
    assert err == f"benchmarks.fps: error: unknown section(s) disks; valid: {valid}\n"
    assert {"storage", "end_to_end", "soak", "tracking", "end_to_end_readout"} <= set(valid.split(", "))


def test_unknown_device_profile_lists_the_valid_ones() -> None:
    from app.config import load_config

    config = load_config(overrides=["benchmark.profiles=[floppy]"]).benchmark
    with pytest.raises(storage.StorageError, match="hdd, sata_ssd, nvme"):
        storage.profiles_from_config(config)


TINY = [
    "benchmark.frames=16", "benchmark.repeats=3", "benchmark.warmup=1",
    "benchmark.storage_size=128", "benchmark.storage_formats=[png]", "benchmark.reader_threads=[1,2]",
    "benchmark.profiles=[hdd,nvme]", "benchmark.sizes=[128]", "benchmark.inference_frames=4",
    "benchmark.batch_sizes=[1,2]", "benchmark.models=[icnet]", "benchmark.model_size=64",
    "benchmark.onnx_max_params_m=0", "benchmark.end_to_end_size=128", "benchmark.large_input_size=0",
    "benchmark.one_core_size=128", "benchmark.hologram_sizes=[128]",
]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory, repo_root: Path) -> tuple[Path, dict, str]:
    """One tiny ``--quick`` run of the CLI with every output requested.

    One intra-op thread per backend: on a CPU shared with other work, spinning OpenMP / ONNX Runtime
    thread teams make timings swing by several times, which a smoke test must not depend on.
    """
    out = tmp_path_factory.mktemp("bench")
    command = [sys.executable, "-m", "benchmarks.fps", "--quick", "--json", str(out / "r.json"),
               "--markdown", str(out / "r.md"), "--plot", str(out / "r.png"), "--workdir", str(out),
               "--set", "model.threads=1"]
    for override in TINY:
        command += ["--set", override]
    done = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=110,
                          env={**os.environ, "OPENCV_LOG_LEVEL": "ERROR"})
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / "r.json").read_text()), done.stdout


@pytest.mark.slow
def test_quick_run_writes_every_promised_key(smoke_run: tuple[Path, dict, str]) -> None:
    _, result, _ = smoke_run
    for key in ("cpu_model", "cpu_cores", "gpu", "torch", "onnxruntime", "opencv", "git_commit"):
        assert key in result["machine"]
    assert result["quick"] is True and result["estimated_s"] > 0 and result["duration_s"] > 0
    assert result["sections"] == list(fps.SECTIONS)

    e2e = result["end_to_end"]
    for key in ("pipeline_fps", "naive_fps", "speedup", "slowest_stage_fps"):
        assert e2e[key] > 0, key
    assert e2e["slowest_stage"] in ("source", "preprocess", "inference", "overlay", "sinks")
    assert 0 < e2e["efficiency"] <= 1.5
    assert e2e["speedup"] == pytest.approx(e2e["pipeline_fps"] / e2e["naive_fps"])

    rows = result["storage"]["results"]
    emulated = [r for r in rows if r["kind"] == "emulated"]
    assert {r["device"] for r in emulated} == {"hdd", "nvme"}
    assert all(r["fps"] > 0 and r["mb_s"] > 0 for r in rows)
    assert all(0 < r["ratio"] <= 1.3 for r in emulated)
    assert any(r["device"] == "local-disk" and r["cache"] in ("cold", "unverified", "not evicted") for r in rows)
    assert "hdd" in result["storage_gap"]["profiles"]

    stages = {(r["stage"], r["variant"]) for r in result["stages"]["results"]}
    assert ("writer", "gif") in stages and ("overlay", "fill + outlines + HUD") in stages
    assert {("overlay", "fill + outlines + HUD, 1 core"), ("metrics", "ConfusionMatrix.update, uint8 labels, 1 core"),
            ("metrics", "ConfusionMatrix.update, int64 labels, 1 core")} <= stages
    inference = [r for r in result["stages"]["results"] if r["stage"] == "inference"]
    assert {(r["backend"], r["batch"]) for r in inference} == {("torch", 1), ("torch", 2), ("onnx", 1), ("onnx", 2)}
    assert all(r["fps"] > 0 for r in result["stages"]["results"])

    hologram = result["hologram"]["results"]
    assert {r["method"].split(" (")[0] for r in hologram} >= {"ours field", "ours channels", "torch channels"}
    assert all(r["size"] == 128 and r["ms_per_frame"] > 0 for r in hologram)
    if result["hologram"]["qpretrieve"]:
        assert any(r["method"] == "qpretrieve defaults" for r in hologram)

    models = result["models"]["results"]
    assert {r["backend"] for r in models} == {"torch", "onnx"}
    assert all(r["params_m"] > 0 and r["gflops"] > 0 and r["latency_ms"] > 0 for r in models)

    assert {t["name"].split(" ")[0] for t in result["targets"]} >= {"pipeline", "hdd", "overlay,", "metrics"}
    assert e2e["threads"]["pipeline"] == e2e["threads"]["naive"] == 1  # --set model.threads=1
    assert all(isinstance(t["met"], bool) for t in result["targets"])


@pytest.mark.slow
def test_quick_run_writes_a_readable_table_and_chart(smoke_run: tuple[Path, dict, str]) -> None:
    out, _, stdout = smoke_run
    markdown = (out / "r.md").read_text()
    assert "| run | fps (frames/s) | ms/frame |" in markdown
    assert "device bound (frames/s)" in markdown and "latency (ms)" in markdown
    assert markdown.strip() in stdout  # the same table is printed at the end
    chart = cv2.imread(str(out / "r.png"))
    assert chart is not None and chart.shape[1] >= 800 and chart.shape[0] >= 300


def test_report_handles_a_result_with_one_section(tmp_path: Path) -> None:
    result = {"quick": True, "sections": ["end_to_end"], "machine": {"cpu_model": "test"},
              "end_to_end": {"size": 64, "frames": 8, "backend": "torch cpu fp32", "batch_size": 1,
                             "outputs": ["csv"], "pipeline_fps": 30.0, "naive_fps": 20.0, "speedup": 1.5,
                             "slowest_stage": "inference", "slowest_stage_fps": 32.0, "efficiency": 0.94}}
    report.write_markdown(tmp_path / "r.md", result)
    report.write_plot(tmp_path / "r.png", result)
    report.write_json(tmp_path / "r.json", result)
    assert "efficiency: 0.94" in (tmp_path / "r.md").read_text()
    assert cv2.imread(str(tmp_path / "r.png")) is not None
    assert json.loads((tmp_path / "r.json").read_text()) == result
    with pytest.raises(ValueError, match="nothing to plot"):
        report.write_plot(tmp_path / "empty.png", {"sections": []})


def test_emulated_device_is_thread_safe(tmp_path: Path) -> None:
    paths = _files(tmp_path, 16, 2_000)
    device = EmulatedDevice(DeviceProfile("test", latency_s=0.001, bandwidth_bytes_s=1e8, queue_depth=2))
    results: list[int] = []
    lock = threading.Lock()

    def read(path: Path) -> None:
        data = device.read(path)
        with lock:
            results.append(len(data))

    threads = [threading.Thread(target=read, args=(p,)) for p in paths]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert results == [2_000] * 16


def test_ctrl_c_keeps_the_finished_sections(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import model_latency

    def interrupted(ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(model_latency, "run_section", interrupted)
    overrides = [arg for override in [*TINY, "model.threads=1", "benchmark.frames=4",
                                      "benchmark.storage_formats=[npy]"] for arg in ("--set", override)]
    status = fps.main(["--quick", "--sections", "storage,models,end_to_end", "--json", str(tmp_path / "r.json"),
                       "--workdir", str(tmp_path), *overrides])
    assert status == 130
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["interrupted"] == "models" and result["storage"]["results"]
    assert "models" not in result and "end_to_end" not in result
    assert any("interrupted during 'models'" in note for note in result["notes"])


def test_ctrl_c_before_the_first_section_with_plot_exits_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import model_latency

    def interrupted(ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(model_latency, "run_section", interrupted)
    overrides = [arg for override in [*TINY, "model.threads=1"] for arg in ("--set", override)]
    status = fps.main(["--quick", "--sections", "models", "--plot", str(tmp_path / "p.png"),
                       "--json", str(tmp_path / "r.json"), "--workdir", str(tmp_path), *overrides])
    assert status == 130
    assert not (tmp_path / "p.png").exists()
    assert "no plot written" in capsys.readouterr().err


def test_soak_runs_only_when_named() -> None:
    assert fps.parse_sections(fps._parser().parse_args([]).sections) == list(fps.SECTIONS)
    assert "soak" not in fps.SECTIONS
    assert fps.parse_sections("soak,storage") == ["storage", "soak"]


def test_soak_section_reports_rss_along_the_run_and_the_long_build(tmp_path: Path) -> None:
    """A short soak through the real pipeline; ``python -m benchmarks.fps --sections soak`` runs 100,000 frames."""
    from app.config import load_config
    from benchmarks import soak
    from benchmarks.workload import Context, FrameCache, load_model

    config = load_config(overrides=["model.threads=1"])
    ctx = Context(config, load_model(config), FrameCache(tmp_path), tmp_path)
    section = soak.run_section(ctx, frames=600, build_frames=2000)
    run, build = section["run"], section["build"]
    assert run["frames"] == 600 and run["frames_dropped"] == 0
    assert [r["percent"] for r in run["rss"]] == [10, 50, 100]
    assert [r["frames"] >= p * 6 for r, p in zip(run["rss"], (10, 50, 100), strict=True)] == [True] * 3
    assert all(r["rss_mb"] > 10 for r in run["rss"]) and run["peak_rss_mb"] >= max(r["rss_mb"] for r in run["rss"])
    assert run["growth_mb"] == pytest.approx(run["rss"][-1]["rss_mb"] - run["rss"][0]["rss_mb"])
    # A header and a row per frame: RSS is read while running, so the run goes on past the last reading.
    assert (tmp_path / "soak" / "soak.csv").read_text().count("\n") == 1 + 600 + soak._tail(600)
    assert isinstance(run["slope_bytes_per_frame"], float)
    assert build["frames"] == 2000 and 0 < build["seconds"] < 30
    assert build["rss_before_mb"] < build["peak_rss_mb"] < soak.BUILD_MB_TARGET  # its own process, not ours
    names = [t["name"] for t in soak.targets(section)]
    assert len(names) == 3 and "RSS growth" in names[0]
    result = {"sections": ["soak"], "machine": {"cpu_model": "test"}, "soak": section}
    assert "## Soak" in report.to_markdown(result) and "growth after warm-up" in report.to_markdown(result)
    report.write_plot(tmp_path / "soak.png", result)
    assert cv2.imread(str(tmp_path / "soak.png")) is not None
