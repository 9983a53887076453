"""The batch run: sequences -> a Ray Data dataset (read stage, then the model actor pool) -> outputs.

Ray Data schedules everything; this module only builds the dataset and writes what comes out::

    from_items(one row per sequence) -> map_batches(read_stage)        tasks, batch.cpus_per_reader each
                                     -> map_batches(SegmentActor)      actor pool: batch.actors actors,
                                                                       one model, cpus_per_actor CPUs
                                                                       (and one GPU each on a GPU cluster)
                                     -> iter_batches on the driver     SequenceWriter per sequence

The read stage runs one task more than there are actors, which also keeps Ray Data from fusing it into
the actors: reading and preprocessing overlap inference, on any node. Ray retries a task or restarts an
actor whose worker or node died; the writers drop the frames a retried read task delivers twice.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.batching.outputs import Manifest, SequenceWriter, remove_partials
from app.batching.sequences import SequenceSpec, fingerprint
from app.batching.stages import SegmentActor, read_stage
from app.config import Config
from app.errors import EXIT_FAILURE, AppError, UsageError
from app.files import check_folder, write_text

log = logging.getLogger("app")

Progress = Callable[[int, "int | None", float], None]


class BatchError(AppError):
    """Some sequences failed (exit 1); the others were written, and the summary names each failure."""

    exit_code = EXIT_FAILURE


@dataclass(frozen=True)
class PoolPlan:
    """The actor pool for a cluster: ``actors`` actors of ``num_cpus`` (+ ``num_gpus``) with ``threads``
    inference threads each."""

    actors: int
    num_cpus: float
    num_gpus: float
    threads: int

    @classmethod
    def for_cluster(cls, config: Config, resources: dict[str, float]) -> PoolPlan:
        """One actor per GPU on a GPU cluster (unless ``model.device`` is cpu); else as many CPU actors as
        fit beside one reader (``batch.actors`` overrides the count)."""
        settings = config.batch
        threads = max(1, int(settings.cpus_per_actor))
        gpus = int(resources.get("GPU", 0)) if config.model.device != "cpu" else 0
        if gpus:
            return cls(settings.actors or gpus, settings.cpus_per_actor, 1.0, threads)
        cpus = resources.get("CPU", 1.0)
        fit = int((cpus - settings.cpus_per_reader) // settings.cpus_per_actor)
        return cls(settings.actors or max(1, fit), settings.cpus_per_actor, 0.0, threads)


def import_ray() -> Any:
    """The ``ray`` module with Ray Data, or a one-line UsageError naming the optional extra."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data is what the run needs, not Ray core alone)
    except ImportError as exc:
        raise UsageError("app.batch needs Ray Data, an optional extra: pip install '.[batch]' "
                         f"(or pip install 'ray[data]'); {exc}") from exc
    return ray


def quiet_ray_data_logs() -> None:
    """Keep Ray Data's start/finish lines and its note on disabled progress bars off the console (its log
    file keeps them): the command draws one progress line of its own. Ray Data reconfigures its
    ``ray.data`` logger for every dataset, so the levels go on the two loggers that write those lines."""
    for name in ("ray.data._internal.execution.streaming_executor", "ray.data._internal.progress"):
        logging.getLogger(name).setLevel(logging.ERROR)


def connect(address: str, *, verbose: bool = False) -> tuple[Any, bool]:
    """``(ray, started_here)``: an existing connection, the cluster at ``address`` ("auto",
    "ray://host:10001", "host:port"), or an embedded local Ray when ``address`` is empty."""
    ray = import_ray()
    if ray.is_initialized():
        return ray, False
    ray.init(address=address or None, include_dashboard=False, log_to_driver=verbose,
             logging_level=logging.INFO if verbose else logging.WARNING)
    return ray, True


def node_names(ray: Any) -> dict[str, dict[str, Any]]:
    """Node id -> ``{"address", "alive"}`` for every node the cluster has known."""
    return {node["NodeID"]: {"address": node["NodeManagerAddress"], "alive": bool(node["Alive"])}
            for node in ray.nodes()}


def build_dataset(ray: Any, config: Config, specs: list[tuple[int, SequenceSpec]], settings: Any,
                  plan: PoolPlan) -> Any:
    """The Ray Data dataset of a run (see the module docstring); nothing runs until it is iterated."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver draws one overall progress line
    context.enable_operator_progress_bars = False
    rows = [{"sequence": number, "uri": spec.uri, "background": spec.background} for number, spec in specs]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
    # One reader more than actors: the next sequence is decoded while one ends. The sizes differing also
    # keeps Ray Data from fusing the read stage into the actors (which would serialise reading and inference).
    dataset = dataset.map_batches(read_stage, batch_size=1, num_cpus=config.batch.cpus_per_reader,
                                  compute=ray.data.TaskPoolStrategy(size=plan.actors + 1),
                                  fn_kwargs={"config": config, "settings": settings,
                                             "frames_per_block": config.batch.frames_per_block})
    return dataset.map_batches(SegmentActor, batch_size=None, compute=ray.data.ActorPoolStrategy(size=plan.actors),
                               num_cpus=plan.num_cpus, num_gpus=plan.num_gpus or None,
                               fn_constructor_kwargs={"config": config, "threads": plan.threads})


def run_batch(config: Config, specs: list[SequenceSpec], out: str | Path, *, progress: Progress | None = None,
              verbose: bool = False) -> dict[str, Any]:
    """Segment every sequence of ``specs`` into ``out`` (see :mod:`app.batching.outputs`), skipping the
    finished ones; returns the run summary (also ``out/summary.json``). Raises :class:`BatchError` when a
    sequence failed, after every other one is written."""
    from app.pipeline.factory import build_preprocessor, load_model

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    check_folder(folder)
    _, meta = load_model(config)
    settings = build_preprocessor(config, meta).settings  # the checkpoint's recipe; a bad one fails here
    manifest = Manifest(folder)
    removed = remove_partials(folder)
    if removed:
        log.info("removed %d unfinished sequence folder(s) of an earlier run", len(removed))
    prints = {spec.name: fingerprint(spec, config) for spec in specs}
    todo = [(number, spec) for number, spec in enumerate(specs) if not manifest.finished(spec.name, prints[spec.name])]
    skipped = [spec.name for spec in specs if manifest.finished(spec.name, prints[spec.name])]
    ray, started_here = connect(config.batch.address, verbose=verbose) if todo else (None, False)
    started = time.time()
    collector = Collector(folder, specs, prints, manifest, list(meta.label_names), started)
    collector.results.update({name: {**json.loads((folder / name / "summary.json").read_text()), "status": "skipped"}
                              for name in skipped})
    plan = PoolPlan.for_cluster(config, ray.cluster_resources()) if todo else None
    frames, expected = 0, sum(spec.frames or 0 for _, spec in todo) or None
    interrupted = False
    try:
        if todo:
            log.info("app.batch: %d sequence(s) (%d finished before) on %d actor(s) of %g CPU%s", len(todo),
                     len(skipped), plan.actors, plan.num_cpus, " + 1 GPU" if plan.num_gpus else "")
            dataset = build_dataset(ray, config, todo, settings, plan)
            with warnings.catch_warnings():  # Ray Data's note that fewer sequences than readers came
                warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks")
                for block in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                    frames += collector.take(block)
                    if progress is not None:
                        elapsed = time.time() - started
                        progress(frames, expected, frames / elapsed if elapsed > 0 else 0.0)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        collector.discard("interrupted" if interrupted else "incomplete")
        summary = _summary(ray, config, specs, collector.results, plan, time.time() - started, interrupted)
        summary["steady_fps"] = round(steady_fps(collector.done_times), 3)
        _write_summary(folder, summary)
        if started_here:
            ray.shutdown()
    failures = summary["failures"]
    if failures:
        first = failures[0]
        raise BatchError(f"{len(failures)} of {len(specs)} sequences failed ({folder / 'summary.json'}); "
                         f"{first['name']}: {first['error']}")
    return summary


class Collector:
    """The driver's end of the dataset: result rows to each sequence's :class:`SequenceWriter`, finished
    sequences committed (or, failed, discarded) and entered in the manifest as they complete."""

    def __init__(self, folder: Path, specs: list[SequenceSpec], prints: dict[str, str], manifest: Manifest,
                 class_names: list[str], started: float) -> None:
        self.folder, self.specs, self.prints, self.manifest = folder, specs, prints, manifest
        self.class_names, self.started = class_names, started
        self.writers: dict[int, SequenceWriter] = {}
        self.results: dict[str, dict[str, Any]] = {}
        self.done_times: list[tuple[str, float]] = []  # (actor, when a frame came out of it: wall clock s)

    def take(self, block: dict[str, Any]) -> int:
        """Hand one result block to the writers; returns how many new frames were written."""
        written = 0
        for row in range(len(block["end"])):
            number = int(block["sequence"][row])
            spec = self.specs[number]
            writer = self.writers.get(number)
            if writer is None:
                writer = self.writers[number] = SequenceWriter(self.folder, spec.name, spec.uri, self.class_names,
                                                               self.started)
            if block["end"][row]:
                writer.end(int(block["previous"][row]), int(block["frames_read"][row]),
                           int(block["frames_skipped"][row]), str(block["error"][row]))
            else:
                before = writer.frames
                writer.add(int(block["index"][row]), int(block["previous"][row]), str(block["name"][row]),
                           block["labels"][row], float(block["read_at"][row]), float(block["done_at"][row]),
                           str(block["node"][row]))
                written += writer.frames - before
                self.done_times.append((str(block["actor"][row]), float(block["done_at"][row])))
            if writer.complete():
                self.results[spec.name] = _finish(writer, spec, self.prints[spec.name], self.manifest)
                del self.writers[number]
        return written

    def discard(self, status: str) -> None:
        """Remove the folders of the sequences still in flight, recording ``status`` for them."""
        for number, writer in self.writers.items():
            writer.discard()
            self.results[self.specs[number].name] = {"status": status}
        self.writers.clear()


def steady_fps(done_times: list[tuple[str, float]]) -> float:
    """Frames per second once the whole pool is running: frames finished after every actor's first block,
    over the time from the last of those to the end (actor start-up and model loading left out)."""
    firsts: dict[str, float] = {}
    for actor, moment in done_times:
        firsts[actor] = min(moment, firsts.get(actor, moment))
    if not firsts:
        return 0.0
    start, last = max(firsts.values()), max(moment for _, moment in done_times)
    later = sum(1 for _, moment in done_times if moment > start)
    return later / (last - start) if last > start else 0.0


def _finish(writer: SequenceWriter, spec: SequenceSpec, print_: str, manifest: Manifest) -> dict[str, Any]:
    if writer.failed:
        writer.discard()
        log.warning("%s failed: %s", spec.name, writer.failed)
        return {"status": "failed", "error": writer.failed, **writer.summary()}
    summary = writer.commit()
    manifest.add(spec.name, {"uri": spec.uri, "fingerprint": print_, "frames": summary["frames"]})
    return {"status": "done", **summary}


def _summary(ray: Any, config: Config, specs: list[SequenceSpec], results: dict[str, dict[str, Any]],
             plan: PoolPlan | None, wall_s: float, interrupted: bool) -> dict[str, Any]:
    known = node_names(ray) if ray is not None and ray.is_initialized() else {}
    per_node: dict[str, dict[str, Any]] = {}
    for name, result in results.items():
        for node, count in (result.get("nodes", {}) if result["status"] == "done" else {}).items():
            entry = per_node.setdefault(node, {**known.get(node, {}), "frames": 0, "sequences": []})
            entry["frames"] += count
            entry["sequences"].append(name)
    done = Counter(result["status"] for result in results.values())
    frames = sum(result.get("frames", 0) for result in results.values() if result["status"] == "done")
    return {"address": config.batch.address or "local", "wall_s": round(wall_s, 3), "frames": frames,
            "fps": round(frames / wall_s, 3) if wall_s > 0 else 0.0, "interrupted": interrupted,
            "pool": plan and {"actors": plan.actors, "cpus_per_actor": plan.num_cpus,
                              "gpus_per_actor": plan.num_gpus, "threads_per_actor": plan.threads},
            "counts": dict(done), "nodes": per_node,
            "failures": [{"name": name, "uri": result.get("uri", ""), "error": result["error"]}
                         for name, result in results.items() if result["status"] == "failed"],
            "sequences": {spec.name: results.get(spec.name, {"status": "not started"}) for spec in specs}}


def _write_summary(folder: Path, summary: dict[str, Any]) -> None:
    write_text(folder / "summary.json", json.dumps(summary, indent=2) + "\n")
