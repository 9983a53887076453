"""Each pipeline stage on its own: reader, preprocessing, inference per backend and batch, overlay, writers.

Every stage gets the same synthetic interferograms (``benchmark.frames`` of them per size) and is
timed as throughput over the frames it finishes, ``(N - 1) / (t_last - t_first)``, median over
repeats. Overlay and a metrics update are also timed on one core at ``benchmark.one_core_size``². Writers are stamped as each frame's ``write`` returns, as the pipeline counts them; what
``close()`` then costs (the GIF is encoded there) is reported separately as ``close_ms``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.timing import repeat_rate, stamp_each, synchronize
from benchmarks.workload import preprocessor

if TYPE_CHECKING:
    from app.config import Config
    from app.pipeline.overlay import OverlayRenderer
    from app.pipeline.sinks import Rendered, Sink
    from benchmarks.workload import Context


Runner = Callable[[], list[float]]
"""One timed run of a stage over its frames; returns each frame's completion stamp."""


def source_runner(folder: Path, config: Config) -> Runner:
    """The app's image-sequence source (prefetching reader threads) over ``folder``, warm page cache."""
    from app.pipeline.sources import open_source

    def run() -> list[float]:
        with open_source(str(folder), config, realtime=False) as source:
            return [time.perf_counter() for _ in source]

    return run


def preprocess_runner(make: Callable[[], Callable[[np.ndarray], np.ndarray]],
                      images: Sequence[np.ndarray]) -> Runner:
    """A fresh preprocessor per run (background models are stateful) over ``images``."""
    return lambda: stamp_each(images, make())


def predict_runner(predict: Callable[..., Any], batches: Sequence[Any], device: Any = None) -> Runner:
    """``predict(batch)`` for each batch in order (one stamp per batch; GPU synchronised)."""
    return lambda: stamp_each(batches, predict, device)


def overlay_runner(renderer: OverlayRenderer, images: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                   phases: Sequence[np.ndarray | None] | None = None, make_readout: Callable[[], Any] | None = None) -> Runner:
    """Overlay drawing (fill, outlines, HUD) of each frame's label map; with ``make_readout`` (a fresh
    :class:`app.pipeline.readout.ReadOut` per run) the objects are measured, with ``phases``, and
    tracked first, and their ids and counts drawn, as the overlay stage does."""
    from app.pipeline.overlay import HudInfo

    hud = HudInfo(25.0, 40.0, 0)
    frames = _frames(images, phases)
    if make_readout is None:
        pairs = list(zip(images, labels, strict=True))
        return lambda: stamp_each(pairs, lambda pair: renderer.render(pair[0], pair[1], hud))

    def run() -> list[float]:
        measure = make_readout()
        return stamp_each(list(zip(frames, labels, strict=True)),
                          lambda pair: renderer.render(pair[0].image, pair[1], hud, measure(*pair)))

    return run


def _frames(images: Sequence[np.ndarray], phases: Sequence[np.ndarray | None] | None) -> list[Any]:
    from app.pipeline.frames import Frame, SourceInfo

    info = SourceInfo("benchmark", "images", live=False)
    phases = phases if phases is not None else [None] * len(images)
    return [Frame(i, time.perf_counter(), image, info, phase=phase)
            for i, (image, phase) in enumerate(zip(images, phases, strict=True))]


def sinks_runner(make: Callable[[], Sequence[Sink]], items: Sequence[Rendered], closing_ms: list[float]) -> Runner:
    """Fresh sinks per run, every item written to all of them; each run's ``close()`` time (ms) is
    appended to ``closing_ms`` (not stamped: the pipeline counts a frame as done when written)."""
    from app.pipeline.sinks import close_all

    def run() -> list[float]:
        sinks = make()
        try:
            stamps = []
            for item in items:
                for sink in sinks:
                    sink.write(item)
                stamps.append(time.perf_counter())
        finally:
            start = time.perf_counter()
            failure = close_all(sinks)
            closing_ms.append((time.perf_counter() - start) * 1000.0)
        if failure is not None:
            raise failure
        return stamps

    return run


def tensor_batches(tensors: Sequence[np.ndarray], batch_size: int) -> list[np.ndarray]:
    """Consecutive N×C×H×W batches of ``batch_size`` tensors (a short tail is dropped)."""
    if len(tensors) < 2 * batch_size:
        raise ValueError(f"need at least {2 * batch_size} frames for batch size {batch_size}")
    return [np.stack(tensors[i:i + batch_size]) for i in range(0, len(tensors) - batch_size + 1, batch_size)]


def measure_sinks(make: Callable[[], Sequence[Sink]], items: Sequence[Rendered], repeats: int,
                  warmup: int) -> dict[str, Any]:
    """Writer throughput plus ``close_ms``, the median time ``close()`` took."""
    closing: list[float] = []
    rate = repeat_rate(sinks_runner(make, items, closing), repeats, warmup)
    rate["close_ms"] = float(np.median(closing[warmup:]))
    return rate


def rendered_items(images: Sequence[np.ndarray], labels: Sequence[np.ndarray], renderer: OverlayRenderer,
                   phases: Sequence[np.ndarray | None] | None = None,
                   make_readout: Callable[[], Any] | None = None) -> list[Rendered]:
    """Finished frames as the sink stage receives them (with their read-out when ``make_readout``
    gives one: the per-object sinks need it)."""
    from app.pipeline.sinks import Rendered

    measure = make_readout() if make_readout is not None else None
    items = []
    for frame, label in zip(_frames(images, phases), labels, strict=True):
        result = measure(frame, label) if measure is not None else None
        items.append(Rendered(frame, label, renderer.render(frame.image, label, None, result), 40.0, result))
    return items


def writer_factories(config: Config, class_names: Sequence[str], folder: Path) -> dict[str, Callable[[], list]]:
    """One factory per registered sink (:data:`app.pipeline.sinks.SINKS`), each writing into ``folder``."""
    from app.pipeline.sinks import SINKS

    def factory(spec: Any) -> Callable[[], list]:
        return lambda: [spec.open(folder / spec.bench_name, config.output, class_names)]

    return {name: factory(spec) for name, spec in SINKS.items() if not spec.readout}


def _row(stage: str, variant: str, size: int | str, rate: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"stage": stage, "variant": variant, "size": size, "fps": rate["fps"],
            "ms_per_frame": rate["ms_per_item"], "fps_runs": rate["fps_runs"], **extra}


def _inference_rows(ctx: Context, tensors: list[np.ndarray], size: int) -> list[dict[str, Any]]:
    bench = ctx.config.benchmark
    rows = []
    for name in bench.backends:
        backend = ctx.backend(name)
        for batch in bench.batch_sizes:
            if len(tensors) < 2 * batch:
                continue
            ctx.log(f"stages: inference {backend.name}, batch {batch}, {size}²")
            rate = repeat_rate(predict_runner(backend.predict, tensor_batches(tensors, batch), backend.device),
                               bench.repeats, bench.warmup, items_per_stamp=batch)
            rows.append(_row("inference", f"{backend.name}, batch {batch}", size, rate, backend=name,
                             batch=batch))
    return rows


def run_section(ctx: Context) -> dict[str, Any]:
    """Reader, preprocessing variants, inference (backend × batch), overlay and each writer per size.

    With ``benchmark.large_input_size`` > 0, frames that large are also read and preprocessed down
    to the largest size (the interferogram seeds' 3072 → 1024).
    """
    from app.pipeline.factory import build_renderer

    config, bench, meta = ctx.config, ctx.config.benchmark, ctx.loaded.meta
    renderer = build_renderer(config, meta.palette)
    plain = {"hologram": "none", "in_channels": 1, "normalization": (("mode", "standardize"),)}
    variants = {
        "standardize": plain,
        "CLAHE": {**plain, "clahe": True},
        "background first_n_mean": {**plain, "background": "first_n_mean"},
        "background mog2": {**plain, "background": "mog2"},
        # The shipped model's own recipe: off-axis demodulation, reference fitted to the first frame.
        "hologram offaxis (NumPy)": {"hologram": "offaxis", "in_channels": 3, "normalization": (("mode", "none"),)},
    }
    rows: list[dict[str, Any]] = []
    for size in bench.sizes:
        frames = ctx.cache.frames(size, bench.frames)
        folder = ctx.cache.png_folder(size, bench.frames)
        threads = config.source.prefetch_threads
        ctx.log(f"stages: reader {size}²")
        rows.append(_row("reader", f"png, {threads} prefetch threads", size,
                         repeat_rate(source_runner(folder, config), bench.repeats, bench.warmup)))
        for variant, changes in variants.items():
            ctx.log(f"stages: preprocess {variant} {size}²")
            make = partial(preprocessor, ctx.loaded, config, **changes)
            rate = repeat_rate(preprocess_runner(make, frames.images), bench.repeats, bench.warmup)
            rows.append(_row("preprocess", variant, size, rate))
        base = preprocessor(ctx.loaded, config)
        tensors = [base(image) for image in frames.images[:bench.inference_frames]]
        rows += _inference_rows(ctx, tensors, size)
        ctx.log(f"stages: overlay {size}²")
        rows.append(_row("overlay", "fill + outlines + HUD", size,
                         repeat_rate(overlay_runner(renderer, frames.images, frames.labels), bench.repeats,
                                     bench.warmup)))
        items = rendered_items(frames.images, frames.labels, renderer)
        out = ctx.workdir / f"writers-{size}"
        for kind, make in writer_factories(config, meta.label_names, out).items():
            ctx.log(f"stages: writer {kind} {size}²")
            rate = measure_sinks(make, items, bench.repeats, bench.warmup)
            rows.append(_row("writer", kind, size, rate, close_ms=rate["close_ms"]))
        shutil.rmtree(out, ignore_errors=True)
    if bench.large_input_size > 0 and bench.sizes:
        rows += _large_input_rows(ctx, max(bench.sizes))
    if bench.one_core_size > 0:
        rows += _one_core_rows(ctx, renderer, bench.one_core_size)
    synchronize()
    return {"frames": bench.frames, "inference_frames": bench.inference_frames, "results": rows}


def _large_input_rows(ctx: Context, target: int) -> list[dict[str, Any]]:
    """Reading and preprocessing ``large_input_size``² frames down to ``target``² (fewer frames: slow to render)."""
    config, bench = ctx.config, ctx.config.benchmark
    large, count = bench.large_input_size, max(2, min(bench.frames, 16))
    ctx.log(f"stages: rendering {count} frames of {large}²")
    frames = ctx.cache.frames(large, count)
    folder = ctx.cache.png_folder(large, count)
    label = f"{large}² → {target}²"
    ctx.log(f"stages: reader {label}")
    rows = [_row("reader", f"png {large}², {config.source.prefetch_threads} prefetch threads", label,
                 repeat_rate(source_runner(folder, config), bench.repeats, bench.warmup))]
    ctx.log(f"stages: preprocess {label}")
    make = partial(preprocessor, ctx.loaded, config, input_size=target)
    rate = repeat_rate(preprocess_runner(make, frames.images), bench.repeats, bench.warmup)
    rows.append(_row("preprocess", "standardize + resize (INTER_AREA)", label, rate))
    return rows


@contextlib.contextmanager
def one_core() -> Iterator[None]:
    """OpenCV and PyTorch limited to one thread (and, on Linux, this thread to one core) inside."""
    import cv2
    import torch

    cv_threads, torch_threads = cv2.getNumThreads(), torch.get_num_threads()
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_setaffinity") else None
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    if affinity:
        os.sched_setaffinity(0, {min(affinity)})
    try:
        yield
    finally:
        cv2.setNumThreads(cv_threads)
        torch.set_num_threads(torch_threads)
        if affinity:
            os.sched_setaffinity(0, affinity)


def _one_core_rows(ctx: Context, renderer: OverlayRenderer, size: int) -> list[dict[str, Any]]:
    """Overlay drawing and a metrics update (``ConfusionMatrix``, one prediction/target pair) of
    ``size``² frames on one CPU core: the budgets the pipeline and evaluation issues set."""
    from app.training.metrics import ConfusionMatrix

    bench = ctx.config.benchmark
    count = max(4, min(bench.frames, 16))
    frames = ctx.cache.frames(size, count)
    predictions = [np.roll(label, 3, axis=1) for label in frames.labels]  # realistic disagreement
    matrix = ConfusionMatrix(ctx.loaded.meta.num_labels)
    pairs = list(zip(predictions, frames.labels, strict=True))
    rows = []
    with one_core():
        ctx.log(f"stages: overlay {size}², one core")
        rows.append(_row("overlay", "fill + outlines + HUD, 1 core", size,
                         repeat_rate(overlay_runner(renderer, frames.images, frames.labels), bench.repeats,
                                     bench.warmup)))
        ctx.log(f"stages: metrics {size}², one core")
        # uint8 labels as the pipeline's masks, int64 as torch's argmax gives them
        for dtype, label_pairs in (("uint8", pairs), ("int64", [(p.astype(np.int64), t.astype(np.int64))
                                                               for p, t in pairs])):
            rate = repeat_rate(lambda label_pairs=label_pairs: stamp_each(label_pairs, lambda pair: matrix.update(*pair)),
                               bench.repeats, bench.warmup)
            rows.append(_row("metrics", f"ConfusionMatrix.update, {dtype} labels, 1 core", size, rate))
    return rows
