"""Size, cost and latency of every registered model (default options) and of the shipped model's recipe.

Per model: parameters (millions), GFLOPs of one forward pass at ``benchmark.gflops_size``²
(:mod:`models.flops`, counted on the meta device) and, per backend, the latency of one batch-1
forward pass (with the argmax) at ``benchmark.model_size``²: median of up to ``benchmark.repeats``
timed calls after ``benchmark.warmup`` untimed ones, stopping early once ``benchmark.model_budget_s``
is spent (at least one timed call), so the largest FCNs do not take many minutes on a CPU. Models
above ``benchmark.onnx_max_params_m`` million parameters skip ONNX (exporting and loading a 134 M
parameter FCN takes about 10 s, far longer than timing it); their rows say so.
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from app.errors import first_line
from benchmarks.timing import synchronize
from benchmarks.workload import make_backend

if TYPE_CHECKING:
    from benchmarks.workload import Context


def time_calls(call: Any, repeats: int, warmup: int, budget_s: float, device: Any = None) -> list[float]:
    """Seconds of each timed ``call()`` (GPU synchronised); stops early past ``budget_s``."""
    for _ in range(warmup):
        call()
    synchronize(device)
    times: list[float] = []
    spent = 0.0
    while len(times) < repeats and (not times or spent < budget_s):
        start = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return times


def run_section(ctx: Context) -> dict[str, Any]:
    """Rows of ``model``, ``options``, ``shipped`` (the last row pair: the loaded model's recipe), ``params_m``,
    ``gflops``, ``backend``, ``size``, ``latency_ms``, ``fps``."""
    from models import build_model, list_models
    from models.flops import count_gflops, count_params

    config, bench = ctx.config, ctx.config.benchmark
    meta = ctx.loaded.meta
    names = list(bench.models) or list_models()
    recipes: list[tuple[str, str, dict[str, Any], int]] = [(name, name, {}, 1) for name in names]
    options = {k: v for k, v in meta.options.items() if k not in ("num_classes", "in_channels")}
    described = ", ".join(str(v) if isinstance(v, str) else f"{k} {v}" for k, v in options.items())
    recipes.append((f"{meta.arch} ({'shipped' if ctx.loaded.trained else 'stand-in'}: {described})", meta.arch,
                    options, meta.in_channels))
    size, gsize = bench.model_size, bench.gflops_size
    rng = np.random.default_rng(0)
    rows = []
    for index, (label, arch, options, channels) in enumerate(recipes):
        model = build_model(arch, num_classes=meta.num_classes, in_channels=channels, **options).eval()
        params_m = count_params(model) / 1e6
        gflops = count_gflops(model, (1, channels, gsize, gsize))
        x = rng.standard_normal((1, channels, size, size)).astype(np.float32)
        for name in bench.backends:
            ctx.log(f"models: {label} on {name}, {size}²")
            row = {"model": label, "arch": arch, "options": options, "shipped": index == len(recipes) - 1,
                   "params_m": params_m, "gflops": gflops, "backend": name, "size": size}
            limit = bench.onnx_max_params_m
            if name == "onnx" and limit and params_m > limit:
                row.update(latency_ms=None, fps=None,
                           note=f"skipped: {params_m:.0f} M parameters > onnx_max_params_m {limit:g}")
                rows.append(row)
                continue
            try:
                backend = make_backend(name, model, channels, config, ctx.workdir, tag=f"model-{arch}")
                times = time_calls(lambda backend=backend, x=x: backend.predict(x), bench.repeats, bench.warmup,
                                   bench.model_budget_s, backend.device)
            except Exception as exc:  # one model failing (e.g. export) must not lose the whole table
                row.update(latency_ms=None, fps=None, note=f"failed: {first_line(exc)}")
                rows.append(row)
                continue
            latency = statistics.median(times)
            row.update(latency_ms=latency * 1000.0, fps=1.0 / latency, runs=len(times),
                       backend_name=backend.name)
            if len(times) < bench.repeats:
                row["note"] = f"{len(times)} timed run(s): budget {bench.model_budget_s:g} s"
            rows.append(row)
            del backend
        (ctx.workdir / f"model-{arch}.onnx").unlink(missing_ok=True)
    return {"size": size, "gflops_size": gsize, "results": rows}
