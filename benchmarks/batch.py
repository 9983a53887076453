"""Benchmark section ``batch`` (on request: ``--sections batch``): app.batch with 1, 2 and 4 local CPU
actors against app.replay run on the same sequences one after the other.

:data:`SEQUENCES` synthetic hologram sequences of :data:`FRAMES` frames at :data:`SIZE`² (the shipped
model's hologram preprocessing, per-sequence carrier) are written once. ``replay``: ``app.replay
--masks`` on each in turn, in this process (its threaded pipeline, model threads automatic). ``batch``:
one local Ray (started once, :data:`RAY_CPUS` logical CPUs, so that 4 actors of 1 CPU and their readers
are admitted even where the machine has fewer cores: oversubscription is what the 4-actor row measures),
then :func:`app.batching.engine.run_batch` with ``batch.actors`` = n, one inference thread per actor.

Per run: ``wall_s`` (start-up included: model loads, actor start) and ``fps`` = frames once running
(replay: frames / Σ each sequence's pipeline time after warm-up; batch:
:func:`~app.batching.engine.steady_fps`). ``efficiency`` = fps(n) / (n × fps(1)); medians of :data:`REPEATS` interleaved rounds. On a machine with C
cores, n actors of one thread can at best run min(n, C)× faster; reading, hologram preprocessing, Ray's
own processes and the driver's PNG writing share the same cores.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmarks.workload import Context

SEQUENCES = 4
FRAMES = 160
SIZE = 256
ACTORS = (1, 2, 4)
RAY_CPUS = 8
REPEATS = 3


def make_sequences(root: Path, sequences: int, frames: int, size: int) -> list[Path]:
    from app import synth

    folders = [root / f"seq{number}" for number in range(sequences)]
    for number, folder in enumerate(folders):
        synth.main(["--out", str(folder), "--frames", str(frames), "--size", str(size), "--seed", str(700 + number),
                    "-q"])
    return folders


def replay_sequentially(folders: list[Path], out: Path) -> dict[str, Any]:
    """``app.replay --masks`` on each folder in turn: wall time and the pipelines' own rate."""
    from app import replay

    started = time.perf_counter()
    frames, busy_s = 0, 0.0
    for folder in folders:
        stats = out / f"{folder.name}.json"
        replay.main([str(folder), "--masks", str(out / folder.name), "--stats", str(stats), "-q"])
        result = json.loads(stats.read_text())
        frames += result["frames"]
        busy_s += result["frames"] / result["throughput_fps"]
    wall_s = time.perf_counter() - started
    return {"runner": "replay (sequential)", "actors": 0, "frames": frames, "wall_s": round(wall_s, 3),
            "fps": round(frames / busy_s, 3), "fps_with_startup": round(frames / wall_s, 3)}


def batch_run(config: Any, folders: list[Path], out: Path, actors: int) -> dict[str, Any]:
    from app.batching.engine import run_batch
    from app.batching.sequences import expand_sources
    from app.config import replace

    config = replace(config, batch={"actors": actors, "cpus_per_actor": 1.0})
    summary = run_batch(config, expand_sources([str(folder) for folder in folders], config), out)
    return {"runner": f"batch, {actors} actor{'s' if actors > 1 else ''}", "actors": actors,
            "frames": summary["frames"], "wall_s": summary["wall_s"], "fps": summary["steady_fps"],
            "fps_with_startup": summary["fps"]}


def measure(config: Any, workdir: Path, log: Any = print, sequences: int = SEQUENCES, frames: int = FRAMES,
            size: int = SIZE, actor_counts: tuple[int, ...] = ACTORS, repeats: int = REPEATS) -> dict[str, Any]:
    """The section's result: ``rows`` (replay, then batch per actor count, each with ``efficiency``), the
    median of ``repeats`` interleaved rounds (each round runs every contender once, so load from elsewhere
    affects them alike); ``rounds`` keeps every measurement."""
    import os
    import shutil
    import statistics

    import ray

    from app.batching.engine import quiet_ray_data_logs

    quiet_ray_data_logs()
    folders = make_sequences(workdir / "sequences", sequences, frames, size)
    log(f"batch: {sequences} sequences x {frames} frames at {size}², {repeats} rounds of replay and "
        f"app.batch with {', '.join(map(str, actor_counts))} actors")
    rounds: list[list[dict[str, Any]]] = []
    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False)
    try:
        for round_number in range(repeats):
            runs = [replay_sequentially(folders, workdir / "replay")]
            for actors in actor_counts:
                runs.append(batch_run(config, folders, workdir / f"batch{actors}", actors))
            for folder in (workdir / "replay", *(workdir / f"batch{actors}" for actors in actor_counts)):
                shutil.rmtree(folder, ignore_errors=True)  # the next round starts from nothing (no resume)
            log(f"batch: round {round_number + 1}: " + ", ".join(f"{run['runner']} {run['fps']:.1f} fps" for run in runs))
            rounds.append(runs)
    finally:
        ray.shutdown()
    rows = []
    for position, first in enumerate(rounds[0]):
        runs = [runs[position] for runs in rounds]
        rows.append({"runner": first["runner"], "actors": first["actors"], "frames": first["frames"],
                     **{key: round(statistics.median(run[key] for run in runs), 3)
                        for key in ("fps", "fps_with_startup", "wall_s")}})
    single = next(row["fps"] for row in rows if row["actors"] == 1)
    for row in rows[1:]:
        row["efficiency"] = round(row["fps"] / (row["actors"] * single), 3) if single else None
        row["speedup_vs_replay"] = round(row["fps"] / rows[0]["fps"], 3)
    for row in rows:
        log(f"batch: {row['runner']:<22} {row['fps']:7.1f} fps running, {row['fps_with_startup']:6.1f} fps with "
            f"start-up ({row['wall_s']:.1f} s), efficiency {row.get('efficiency', '-')}")
    return {"sequences": sequences, "frames_per_sequence": frames, "size": size, "ray_logical_cpus": RAY_CPUS,
            "cores": len(os.sched_getaffinity(0)), "repeats": repeats, "rows": rows, "rounds": rounds}


def run_section(ctx: Context) -> dict[str, Any]:
    return measure(ctx.config, ctx.workdir, ctx.log)


def estimate_seconds() -> float:
    """ray.init, then per round replay and three batch runs of the default size, on two cores."""
    return 10.0 + REPEATS * 70.0
