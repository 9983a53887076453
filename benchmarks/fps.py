"""Frame-rate benchmark CLI: storage, each stage, every model per backend, and the pipeline end to end.

    python -m benchmarks.fps [--quick] [--sections storage,stages,models,end_to_end]
                             (on request: --sections soak,tracking,batch,preview,end_to_end_readout)
                             [--dirs hdd=/mnt/hdd/seq ssd=/mnt/ssd/seq] [--json FILE] [--markdown FILE]
                             [--plot FILE.png] [--workdir DIR] [--config PATH] [--set K=V]
                             [--device auto|cpu|cuda|cuda:N] [--half] [-v|-q]

Settings come from the ``benchmark`` section of config.yaml (``--set benchmark.frames=32``); the model,
backend, batch size and outputs from the usual sections. ``--quick`` applies :data:`QUICK_OVERRIDES`
first (a run of about two minutes on two CPU cores); ``--set`` still wins over it. Inference threads
follow ``model.threads`` (0 = auto: every core when a backend runs alone, all but one inside the
threaded pipeline; ``--set model.threads=N`` fixes them). Warm-up runs come
first, medians over repeats are reported, and every figure carries its unit. The expected duration is
printed before anything is measured; the markdown table is printed at the end.

JSON layout (top level): ``machine`` (CPU model and cores, GPU, torch / ONNX Runtime / OpenCV versions,
git commit), ``weights`` (which model, and whether it is the trained checkpoint), ``config``,
``estimated_s``, ``duration_s``, one key per section that ran — ``storage`` (+ ``storage_gap``),
``stages``, ``hologram`` (demodulation per frame, ours beside qpretrieve), ``models``, ``end_to_end`` (``pipeline_fps``, ``naive_fps``, ``speedup``,
``slowest_stage``, ``slowest_stage_fps``, ``efficiency``), ``soak`` (RSS over a 100,000-frame run and a
long synthetic build; run only when named, a few minutes, :mod:`benchmarks.soak`), and the other
on-request sections ``tracking`` (:mod:`benchmarks.tracking`), ``batch`` (:mod:`benchmarks.batch`),
``preview`` (:mod:`benchmarks.preview`) and ``end_to_end_readout`` (``end_to_end`` with the object
read-out on) — and ``targets`` (name, measured, required, met).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.cli import (
    Parser,
    add_config_arguments,
    add_device_arguments,
    add_verbosity_arguments,
    config_from_args,
    main_of,
)
from app.config import Config, ConfigError
from app.errors import EXIT_INTERRUPTED, EXIT_OK

SECTIONS = ("storage", "stages", "hologram", "models", "end_to_end")
ON_REQUEST_SECTIONS = ("soak", "tracking", "batch", "preview", "end_to_end_readout")  # run only when named in --sections (soak: slow, about memory)
QUICK_OVERRIDES = (
    "benchmark.repeats=3",
    "benchmark.warmup=1",
    "benchmark.frames=48",
    "benchmark.sizes=[512]",
    "benchmark.large_input_size=0",
    "benchmark.inference_frames=8",
    "benchmark.reader_threads=[1,2,4]",
    "benchmark.storage_formats=[png,npy]",
    "benchmark.model_size=128",
    "benchmark.model_budget_s=2",
    "benchmark.onnx_max_params_m=30",
    "benchmark.end_to_end_size=256",
    "benchmark.hologram_sizes=[512,1024]",
)
HDD_RATIO_TARGET = 0.9
EFFICIENCY_TARGET = 0.9
ONE_CORE_MS_TARGET = 5.0
ONNX_NOISE_TOLERANCE = 0.95  # "no slower" allowing 5 % run-to-run noise of a shared CPU


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m benchmarks.fps",
        description="Measure frame rates: reading image sequences from disks and emulated HDD/SSD profiles, "
                    "each pipeline stage alone, every model per backend, and the threaded pipeline against "
                    "the naive loop. Prints a markdown table at the end.")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated parts to run (default: all of {','.join(SECTIONS)}; "
                             f"on request: {','.join(ON_REQUEST_SECTIONS)}, RSS over a 100,000-frame run)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller settings, about two minutes on two CPU cores (--set still overrides)")
    parser.add_argument("--dirs", nargs="+", default=[], metavar="NAME=DIR",
                        help="also read the image sequence in each DIR with a cold page cache, e.g. "
                             "hdd=/mnt/hdd/seq ssd=/mnt/ssd/seq")
    parser.add_argument("--json", metavar="FILE", type=Path, help="write the results as JSON")
    parser.add_argument("--markdown", metavar="FILE", type=Path, help="write the markdown report")
    parser.add_argument("--plot", metavar="FILE.png", type=Path, help="write a bar chart (PNG)")
    parser.add_argument("--workdir", metavar="DIR", type=Path, default=None,
                        help="scratch folder for frames and outputs (its disk is the 'local-disk' row; "
                             "default: the system temporary folder)")
    add_device_arguments(parser)
    add_config_arguments(parser)
    add_verbosity_arguments(parser)
    return parser


def parse_sections(text: str) -> list[str]:
    """``"storage,models"`` -> ["storage", "models"] in the canonical order; unknown names are errors."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    known = (*SECTIONS, *ON_REQUEST_SECTIONS)
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise ConfigError(f"unknown section(s) {', '.join(unknown) or '(none given)'}; valid: {', '.join(known)}")
    return [name for name in known if name in names]


def parse_dirs(values: list[str]) -> dict[str, Path]:
    """``["hdd=/mnt/hdd/seq"]`` -> {"hdd": Path("/mnt/hdd/seq")}."""
    dirs = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--dirs takes NAME=DIR, got '{value}'")
        dirs[name] = Path(path).expanduser()
    return dirs


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Forward-pass time model of this machine: ``overhead_s + gflops * seconds_per_gflop`` (small
    passes are dominated by per-layer overhead, large ones by arithmetic)."""

    overhead_s: float
    seconds_per_gflop: float

    def seconds(self, gflops: float) -> float:
        return self.overhead_s + gflops * self.seconds_per_gflop


def estimate_seconds(config: Config, sections: list[str], dirs: dict[str, Path], shipped: Any,
                     calibration: Calibration) -> float:
    """Rough duration of a run: passes of ``shipped`` and the registered models from their GFLOPs and a
    CPU calibration, the rest from frame counts."""
    import torch

    from benchmarks.storage import profiles_from_config
    from models import build_model, list_models
    from models.flops import count_gflops, count_params

    bench = config.benchmark
    runs = bench.warmup + bench.repeats

    def infer_s(size: int, model: Any = shipped) -> float:
        # The first convolution's input channels: 1 for the registry's grey models, 3 for the hologram model.
        channels = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
        return calibration.seconds(count_gflops(model, (1, channels, size, size)))

    decode_s = 0.008  # a 1024² PNG on one core
    total = 0.0
    if "storage" in sections:
        per_frame = decode_s * (bench.storage_size / 1024) ** 2
        nbytes = 1.0e6 * (bench.storage_size / 1024) ** 2
        profiles = profiles_from_config(bench)
        for threads in bench.reader_threads:
            device_s = sum(1.0 / p.bound_fps(nbytes, threads) for p in profiles.values())
            total += runs * bench.frames * len(bench.storage_formats) * (device_s + 2 * per_frame / min(threads, 2))
        total += runs * bench.frames * len(dirs) * len(bench.reader_threads) * 0.02
    if "stages" in sections:
        for size in bench.sizes:
            scale = (size / 1024) ** 2
            total += runs * bench.frames * 0.08 * scale + 1.5 * bench.frames * 0.04 * scale  # stages + rendering
            total += runs * bench.inference_frames * len(bench.backends) * len(bench.batch_sizes) * infer_s(size)
        if bench.large_input_size:
            total += 8 + 1.2 * min(bench.frames, 16) * (1 + runs * 0.15)
    if "hologram" in sections:
        for size in bench.hologram_sizes:
            scale = (size / 1024) ** 2
            total += scale * (2.0 + bench.repeats * 8 * 0.1 + 4 * 0.6)  # frames, ours + torch, qpretrieve
    if "models" in sections:
        with torch.device("meta"):
            for name in list(bench.models) or list_models():
                model = build_model(name, num_classes=2, in_channels=1)
                per_call = infer_s(bench.model_size, model)
                calls = bench.warmup + max(1, min(bench.repeats, int(bench.model_budget_s / max(per_call, 1e-6))))
                params_m = count_params(model) / 1e6
                for backend in bench.backends:
                    if backend == "onnx":
                        if bench.onnx_max_params_m and params_m > bench.onnx_max_params_m:
                            continue
                        total += 0.075 * params_m  # export, write and load the graph
                    total += calls * per_call + 0.5
            total += len(bench.backends) * runs * infer_s(bench.model_size)
    for name in ("end_to_end", "end_to_end_readout"):
        if name in sections:
            total += runs * bench.frames * (3.2 * infer_s(bench.end_to_end_size) + 0.01)
    if "soak" in sections:
        from benchmarks.soak import estimate_seconds as soak_seconds

        total += soak_seconds()
    if "batch" in sections:
        from benchmarks.batch import estimate_seconds as batch_seconds

        total += batch_seconds()
    if "tracking" in sections:
        total += 30.0  # 100 frames of 50 objects at 1024² through five contenders, plus their imports
    if "preview" in sections:
        from benchmarks.preview import estimate_seconds as preview_seconds

        total += preview_seconds(config, 1.5 * infer_s(bench.end_to_end_size))
    return total


def calibrate(loaded: Any) -> Calibration:
    """Fit :class:`Calibration` to the shipped model's forward pass at 256² and 512² (CPU, as loaded)."""
    import torch

    from benchmarks.timing import synchronize
    from models.flops import count_gflops

    points = []
    with torch.inference_mode():
        for size in (256, 512):
            x = torch.zeros(1, loaded.meta.in_channels, size, size)
            times = []
            for _ in range(5):
                start = time.perf_counter()
                loaded.model(x)
                synchronize()
                times.append(time.perf_counter() - start)
            points.append((count_gflops(loaded.model, tuple(x.shape)), min(times[2:])))
    (small_gflops, small_s), (large_gflops, large_s) = points
    per_gflop = max((large_s - small_s) / (large_gflops - small_gflops), 1e-6)
    return Calibration(overhead_s=max(small_s - small_gflops * per_gflop, 0.0), seconds_per_gflop=per_gflop)


def _inference_fps(result: dict[str, Any], backend: str, size: int) -> float | None:
    rows = [r for r in result.get("stages", {}).get("results", [])
            if r["stage"] == "inference" and r.get("backend") == backend and r.get("batch") == 1 and r["size"] == size]
    return rows[0]["fps"] if rows else None


def evaluate_targets(result: dict[str, Any], config: Config) -> list[dict[str, Any]]:
    """The issue's targets that the sections which ran can decide."""
    targets = []
    for key, what in (("end_to_end", ""), ("end_to_end_readout", ", with the object read-out")):
        e2e = result.get(key)
        if e2e:
            targets.append({"name": f"pipeline efficiency (end-to-end fps / slowest stage alone){what}",
                            "measured": round(e2e["efficiency"], 3), "required": f">= {EFFICIENCY_TARGET}",
                            "met": e2e["efficiency"] >= EFFICIENCY_TARGET})
    storage = result.get("storage")
    if storage:
        rows = [r for r in storage["results"] if r["device"] == "hdd" and r["format"] == "png" and r["threads"] > 1]
        if rows:
            best = max(rows, key=lambda r: r["ratio"])
            targets.append({"name": f"hdd profile, {storage['frame_size']}² PNG, parallel readers: fps / device bound "
                                    f"(best: {best['threads']} threads, {best['fps']:.1f} of {best['bound_fps']:.1f} fps)",
                            "measured": round(best["ratio"], 3), "required": f">= {HDD_RATIO_TARGET}",
                            "met": best["ratio"] >= HDD_RATIO_TARGET})
    if result.get("hologram"):
        from benchmarks.hologram import target

        demodulation = target(result["hologram"])
        if demodulation:
            targets.append(demodulation)
    if result.get("soak"):
        from benchmarks import soak

        targets += soak.targets(result["soak"])
    if result.get("tracking"):
        from benchmarks import tracking

        targets += tracking.targets(result["tracking"])
    if result.get("preview"):
        from benchmarks import preview

        targets += preview.targets(result["preview"])
    one_core = config.benchmark.one_core_size
    for stage, what in (("overlay", "overlay"), ("metrics", "metrics update (ConfusionMatrix)")):
        rows = [r for r in (result.get("stages") or {}).get("results", [])
                if r["stage"] == stage and "1 core" in r["variant"] and r["size"] == one_core]
        if rows:
            ms = max(r["ms_per_frame"] for r in rows)  # the slowest variant (metrics: uint8 and int64 labels)
            targets.append({"name": f"{what}, {one_core}² frame, one CPU core: ms per frame",
                            "measured": round(ms, 3), "required": f"< {ONE_CORE_MS_TARGET}",
                            "met": ms < ONE_CORE_MS_TARGET})
    pairs = []
    for size in config.benchmark.sizes:
        torch_fps, onnx_fps = _inference_fps(result, "torch", size), _inference_fps(result, "onnx", size)
        if torch_fps and onnx_fps:
            pairs.append((f"{size}²", onnx_fps / torch_fps))
    if not pairs and result.get("models"):
        shipped = {r["backend"]: r.get("fps") for r in result["models"]["results"] if r["shipped"]}
        if shipped.get("torch") and shipped.get("onnx"):
            pairs.append((f"{result['models']['size']}² (models table)", shipped["onnx"] / shipped["torch"]))
    machine = result.get("machine", {})
    if pairs and not machine.get("gpu"):
        worst = min(pairs, key=lambda pair: pair[1])
        targets.append({"name": "ONNX Runtime vs PyTorch on CPU, shipped model, batch 1: onnx fps / torch fps "
                                f"(worst of {', '.join(p[0] for p in pairs)}: {worst[0]})",
                        "measured": round(worst[1], 3), "required": f">= 1 (>= {ONNX_NOISE_TOLERANCE} for noise)",
                        "met": worst[1] >= ONNX_NOISE_TOLERANCE})
    return targets


def run(config: Config, sections: list[str], dirs: dict[str, Path], workdir: Path | None,
        log: Callable[[str], None], quick: bool = False, command: str = "") -> dict[str, Any]:
    """Run the chosen sections and return the full result dict (see the module docstring)."""
    from benchmarks import (
        batch,
        end_to_end,
        hologram,
        model_latency,
        preview,
        soak,
        stages,
        storage,
        tracking,
    )
    from benchmarks.machine import machine_info
    from benchmarks.workload import Context, FrameCache, load_model

    started = time.perf_counter()
    bench = config.benchmark
    loaded = load_model(config)
    estimate = estimate_seconds(config, sections, dirs, loaded.model, calibrate(loaded))
    log(f"benchmark: {', '.join(sections)}; expected duration about {estimate / 60:.1f} min "
        f"({'quick' if quick else 'full'} run, estimated on this machine)")
    log(f"benchmark: model {loaded.label}")
    result: dict[str, Any] = {
        "schema_version": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "quick": quick,
        "sections": sections,
        "repeats": bench.repeats,
        "warmup": bench.warmup,
        "machine": machine_info(),
        "weights": loaded.describe(),
        "config": {name: dataclasses.asdict(getattr(config, name))
                   for name in ("benchmark", "model", "pipeline", "source", "preprocess")},
        "estimated_s": estimate,
        "notes": [] if loaded.trained else [loaded.label],
    }
    load, cores = result["machine"]["load_average_1min"], result["machine"]["cpu_cores_usable"] or 1
    if load is not None and load > 0.5 * cores:
        result["notes"].append(
            f"the machine was busy when measuring started (load average {load:.1f} on {cores} cores): "
            "multi-threaded backends slow down out of proportion when their threads are preempted; "
            "compare with --set model.threads=1, or measure on an idle machine")
        log(f"benchmark: warning: {result['notes'][-1]}")
    with tempfile.TemporaryDirectory(prefix="cellseg-bench-", dir=workdir) as scratch:
        ctx = Context(config, loaded, FrameCache(Path(scratch)), Path(scratch), log)
        runners = {"storage": lambda: storage.run_section(bench, dirs, Path(scratch), log),
                   "stages": lambda: stages.run_section(ctx), "hologram": lambda: hologram.run_section(ctx),
                   "models": lambda: model_latency.run_section(ctx),
                   "end_to_end": lambda: end_to_end.run_section(ctx),
                   "end_to_end_readout": lambda: end_to_end.run_section(ctx, readout=True),
                   "soak": lambda: soak.run_section(ctx),
                   "tracking": lambda: tracking.measure(log=log), "batch": lambda: batch.run_section(ctx),
                   "preview": lambda: preview.run_section(ctx)}
        for name in sections:
            try:
                result[name] = runners[name]()
            except KeyboardInterrupt:  # keep what was measured: the finished sections are reported
                result["interrupted"] = name
                result["notes"].append(f"interrupted during '{name}': only the sections before it were measured")
                log(f"benchmark: interrupted during {name}; reporting the finished sections")
                break
    if "storage" in result:
        rates = {}
        measured = _inference_fps(result, config.model.backend, bench.storage_size)
        if measured:
            rates[f"{config.model.backend} here"] = measured
        if bench.gap_reference_fps > 0:
            rates["reference"] = bench.gap_reference_fps
        result["storage_gap"] = storage.reader_gap(result["storage"], rates)
    result["targets"] = evaluate_targets(result, config)
    result["duration_s"] = time.perf_counter() - started
    return result


def main(argv: list[str] | None = None) -> int:
    command = "python -m benchmarks.fps " + shlex.join(sys.argv[1:] if argv is None else argv)
    return main_of("benchmarks.fps", _parser(), lambda args: _run(args, command), argv)


def _run(args: argparse.Namespace, command: str) -> int:
    from benchmarks import report

    started = time.perf_counter()

    def log(message: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    sections = parse_sections(args.sections)
    dirs = parse_dirs(args.dirs)
    config = config_from_args(args, QUICK_OVERRIDES if args.quick else ())
    result = run(config, sections, dirs, args.workdir, log, quick=args.quick, command=command)
    if args.json:
        report.write_json(args.json, result)
    if args.markdown:
        report.write_markdown(args.markdown, result)
    if args.plot:
        if result.get("interrupted") and not report.chart_panels(result):
            log("interrupted before any section finished: no plot written")
        else:
            report.write_plot(args.plot, result)
    print(report.to_markdown(result))
    return EXIT_INTERRUPTED if result.get("interrupted") else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
