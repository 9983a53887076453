"""The threaded pipeline against the naive one-frame-at-a-time loop, on the same frames and outputs.

Both read the same PNG sequence (``benchmark.frames`` frames of ``benchmark.end_to_end_size``²)
through the app's image-sequence source and write the same outputs (MP4, GIF, mask PNGs, CSV) with
the configured backend and batch size; inference threads follow ``model.threads`` (auto: all cores but
one in the pipeline, where other stages run beside inference, all cores in the naive loop). Each stage is also measured alone with the same settings,
grouped as the pipeline's threads are (source, preprocess, inference, overlay, sinks = all writers).
Every round runs the pipeline, the naive loop and each stage alone once, so a noisy neighbour (or a
CPU that changes its clock) affects all of them alike; medians over the timed rounds are reported, and

    efficiency = pipeline fps / fps of the slowest stage alone

with each run's fps = frames / (last frame written - first frame captured), fill and drain included,
says how close the threads come to the ideal of running at the speed of their bottleneck.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

from app.pipeline.sinks import SINKS
from benchmarks.stages import (
    overlay_runner,
    predict_runner,
    preprocess_runner,
    rendered_items,
    sinks_runner,
    source_runner,
)
from benchmarks.timing import fps_from_timestamps
from benchmarks.workload import preprocessor

if TYPE_CHECKING:
    from benchmarks.workload import Context

OUTPUTS = tuple(name for name, spec in SINKS.items() if not spec.readout)
READOUT_OUTPUTS = ("objects", "tracks", "events")
"""With ``readout=True`` (section ``end_to_end_readout``): the per-object tables as well, so the overlay
stage measures and tracks every frame's objects (plots, drawn once at the end, are left out)."""


def run_section(ctx: Context, readout: bool = False) -> dict[str, Any]:
    """Returns ``pipeline_fps``, ``naive_fps``, ``speedup``, ``slowest_stage``, ``slowest_stage_fps``,
    ``efficiency``, the standalone ``stages`` and the pipeline's own per-stage statistics. With
    ``readout``, every run (and the overlay stage alone) also measures and tracks the objects, with
    phase, and writes :data:`READOUT_OUTPUTS`."""
    from app.config import replace
    from app.pipeline.factory import build_inference, build_readout, build_renderer, place_hologram_stage
    from app.pipeline.runner import Pipeline, run_sequential
    from app.pipeline.sinks import open_sinks
    from app.pipeline.sources import open_source

    config, bench, meta = ctx.config, ctx.config.benchmark, ctx.loaded.meta
    size, count = bench.end_to_end_size, bench.frames
    folder = ctx.cache.png_folder(size, count)
    out = ctx.workdir / "end-to-end"

    names = (*OUTPUTS, *READOUT_OUTPUTS) if readout else OUTPUTS

    def outputs(mode: str) -> dict[str, Any]:
        return {"display": False, **{SINKS[name].config_key: str(out / mode / SINKS[name].bench_name) for name in names}}

    run_config = replace(config, source={"uri": str(folder), "loop": False}, pipeline={"max_frames": 0},
                         output=outputs("pipeline"))
    # The pipeline's inference shares the CPU with the other stages, the naive loop's runs alone: each
    # gets the thread count model.threads gives it (auto: all cores but one vs all cores).
    backends = {"pipeline": ctx.backend(config.model.backend, concurrent=True),
                "naive": ctx.backend(config.model.backend, concurrent=False)}
    workers = {mode: build_inference(config, backend, meta) for mode, backend in backends.items()}
    backend, worker = backends["pipeline"], workers["pipeline"]
    renderer = build_renderer(config, meta.palette)

    def run(mode: str) -> Any:
        mode_config = replace(run_config, output=outputs(mode))
        source = open_source(str(folder), mode_config, realtime=False)
        try:
            sinks = open_sinks(mode_config.output, meta.label_names)
        except BaseException:
            source.close()
            raise
        stages = (source, placed(backends[mode]), workers[mode], renderer, sinks, mode_config.pipeline)
        measure = build_readout(mode_config, meta, source) if readout else None
        result = (Pipeline(*stages, readout=measure).run() if mode == "pipeline"
                  else run_sequential(*stages, readout=measure))
        if result.interrupted:  # the runner absorbed the Ctrl-C to finish its files: stop the section too
            raise KeyboardInterrupt
        return result

    def placed(target: Any) -> Any:
        """The shipped model's preprocessing; on CUDA its hologram stage runs in ``target`` (torch.fft),
        as build_stages arranges it."""
        preprocess = preprocessor(ctx.loaded, config)
        place_hologram_stage(preprocess, target)
        return preprocess

    frames = ctx.cache.frames(size, count)
    standalone = placed(backend)
    tensors = [standalone(image) for image in frames.images]
    sizes = [image.shape[:2] for image in frames.images]
    batch = config.pipeline.batch_size
    batches = [(tensors[i:i + batch], sizes[i:i + batch]) for i in range(0, count - batch + 1, batch)]
    closing_ms: list[float] = []
    phases = [standalone.phase_image(tensor) for tensor in tensors] if readout else None

    def make_readout() -> Any:  # a fresh one per run, as each run of the app has
        from app.pipeline.readout import ReadOut

        return ReadOut(config.optics, config.objects, classes=range(1, meta.num_labels), fps=config.source.fps)

    measured = make_readout if readout else None
    sinks_alone = replace(run_config, output=outputs("sinks-alone")).output
    runners = {
        "source": (source_runner(folder, run_config), 1),
        "preprocess": (preprocess_runner(lambda: placed(backend), frames.images), 1),
        "inference": (predict_runner(lambda b: worker.predict(*b), batches, backend.device), batch),
        "overlay": (overlay_runner(renderer, frames.images, frames.labels, phases, measured), 1),
        "sinks": (sinks_runner(lambda: open_sinks(sinks_alone, meta.class_names),
                               rendered_items(frames.images, frames.labels, renderer, phases, measured),
                               closing_ms), 1),
    }
    runs: dict[str, list[Any]] = {"pipeline": [], "naive": []}
    alone: dict[str, list[float]] = {name: [] for name in runners}
    rounds = bench.warmup + bench.repeats
    for index in range(rounds):
        timed = index >= bench.warmup
        ctx.log(f"end to end: round {index + 1}/{rounds}{'' if timed else ' (warm-up)'}: pipeline, naive loop, "
                "each stage alone")
        for mode in runs:
            result = run(mode)
            if result.frames != count:
                raise RuntimeError(f"{mode} run delivered {result.frames} of {count} frames ({result.stopped})")
            if timed:
                runs[mode].append(result)
        for name, (runner, items_per_stamp) in runners.items():
            rate = fps_from_timestamps(runner(), items_per_stamp)
            if timed:
                alone[name].append(rate)
    pipeline_fps = statistics.median(r.throughput_fps for r in runs["pipeline"])
    naive_fps = statistics.median(r.throughput_fps for r in runs["naive"])
    stages = {name: {"fps": statistics.median(rates), "fps_runs": rates,
                     "ms_per_item": 1000.0 / statistics.median(rates)} for name, rates in alone.items()}
    stages["sinks"]["close_ms"] = statistics.median(closing_ms[bench.warmup:])
    slowest = min(stages, key=lambda name: stages[name]["fps"])
    last = runs["pipeline"][-1]
    name = backend.name
    for used in backends.values():  # the backends are shared with other sections, which feed field channels
        if hasattr(used, "set_input_transform"):
            used.set_input_transform(None)
    return {
        "size": size, "frames": count, "backend": name, "batch_size": batch, "outputs": list(names),
        "readout": readout,
        "threads": {mode: getattr(b, "threads", None) or None for mode, b in backends.items()},
        "pipeline_fps": pipeline_fps, "pipeline_fps_runs": [r.throughput_fps for r in runs["pipeline"]],
        "naive_fps": naive_fps, "naive_fps_runs": [r.throughput_fps for r in runs["naive"]],
        "speedup": pipeline_fps / naive_fps,
        "slowest_stage": slowest, "slowest_stage_fps": stages[slowest]["fps"],
        "efficiency": pipeline_fps / stages[slowest]["fps"],
        "stages": stages,
        "pipeline_stages": {name: {"fps": s.get("fps"), "mean_ms": s.get("mean_ms"), "p95_ms": s.get("p95_ms"),
                                   "queue_mean": s.get("queue_mean")} for name, s in last.stats.items()},
        "pipeline_latency_ms": last.latency,
    }
