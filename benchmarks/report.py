"""Benchmark results as JSON, a markdown report and a PNG bar chart (drawn with OpenCV).

The result is one dict (see ``benchmarks.fps`` for its keys). Units are part of every key and column
name: ``fps`` = frames per second, ``ms`` = milliseconds, ``mb_s`` = 10⁶ bytes per second.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from app.files import write_text


def write_json(path: str | Path, result: dict[str, Any]) -> None:
    """Write ``result`` as indented JSON (temporary name, then renamed: never a half-written file)."""
    write_text(path, json.dumps(result, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(value)
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            return "–"
        if abs(value) >= 100:
            return f"{value:.0f}"
        return f"{value:.{digits}f}" if abs(value) >= 1 else f"{value:.{max(digits, 2)}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; numbers formatted with sensible precision."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_num(cell) for cell in row) + " |")
    return "\n".join(lines)


def _header(result: dict[str, Any]) -> list[str]:
    machine = result.get("machine", {})
    gpu = machine.get("gpu") or "none"
    lines = [
        "# Frame-rate benchmark",
        "",
        f"- mode: {'quick' if result.get('quick') else 'full'}, sections: {', '.join(result.get('sections', []))}, "
        f"{result.get('repeats')} timed repeats after {result.get('warmup')} warm-up runs, medians reported",
        f"- machine: {machine.get('cpu_model')} ({machine.get('cpu_cores_usable')} usable cores), GPU: {gpu}, "
        f"torch {machine.get('torch')} ({machine.get('torch_threads')} threads), "
        f"ONNX Runtime {machine.get('onnxruntime')}, OpenCV {machine.get('opencv')}",
        f"- commit {machine.get('git_commit')}, measured {result.get('created')}, took "
        f"{_num(result.get('duration_s'))} s (estimated {_num(result.get('estimated_s'))} s), load average at start "
        f"{_num(machine.get('load_average_1min'), 2)} (other work on the machine slows and scatters timings)",
    ]
    weights = result.get("weights")
    if weights:
        lines.append(f"- model: {weights.get('label')}")
    return lines


def _targets(result: dict[str, Any]) -> list[str]:
    rows = [(t["name"], t["measured"], t["required"], "yes" if t["met"] else "NO") for t in result.get("targets", [])]
    if not rows:
        return []
    return ["", "## Targets", "", table(["target", "measured", "required", "met"], rows)]


def _end_to_end(section: dict[str, Any]) -> list[str]:
    lines = ["", "## End to end: threaded pipeline vs naive loop", "",
             f"{section['frames']} frames of {section['size']}², backend {section['backend']}, batch "
             f"{section['batch_size']}, outputs: {', '.join(section['outputs']) or 'none'}.", ""]
    threads = section.get("threads") or {}
    if any(threads.values()):
        lines[-1:-1] = [f"Inference threads: {threads.get('pipeline') or 'default'} in the pipeline (the "
                        f"stages alone use the same), {threads.get('naive') or 'default'} in the naive loop."]
    lines.append(table(
        ["run", "fps (frames/s)", "ms/frame"],
        [("threaded pipeline", section["pipeline_fps"], 1000 / section["pipeline_fps"]),
         ("naive sequential loop", section["naive_fps"], 1000 / section["naive_fps"])]))
    lines += ["", f"- speedup: {_num(section['speedup'], 2)}× (pipeline fps / naive fps)",
              f"- slowest stage alone: {section['slowest_stage']} at {_num(section['slowest_stage_fps'])} fps",
              f"- efficiency: {_num(section['efficiency'], 2)} (pipeline fps / slowest stage fps)", ""]
    stages = section.get("stages", {})
    if stages:
        lines.append(table(["stage alone (same frames and settings)", "fps (frames/s)", "ms/frame"],
                           [(name, s["fps"], s["ms_per_item"]) for name, s in stages.items()]))
    for name, stats in section.get("pipeline_stages", {}).items():
        if not lines[-1].startswith("- in the pipeline"):
            lines.append("")
        lines.append(f"- in the pipeline, {name}: {_num(stats.get('fps'))} fps, "
                     f"{_num(stats.get('mean_ms'))} ms/frame busy")
    return lines


def _storage(section: dict[str, Any], gap: dict[str, Any] | None) -> list[str]:
    lines = ["", "## Storage: reading an image sequence", "",
             f"{section['frames']} frames of {section['frame_size']}², decoded in reader threads. Device model: "
             f"{section['model']}.", ""]
    profiles = section.get("profiles", {})
    if profiles:
        lines.append(table(["emulated device", "latency (ms)", "bandwidth (MB/s)", "queue depth"],
                           [(n, p["latency_ms"], p["bandwidth_mb_s"], p["queue_depth"]) for n, p in profiles.items()]))
        lines.append("")
    rows = [(r["device"], r["format"], r["threads"], r["fps"], r["mb_s"], r["file_mb"], r.get("bound_fps"),
             r.get("ratio"), r["cache"]) for r in section["results"]]
    lines.append(table(["device", "format", "threads", "fps (frames/s)", "MB/s", "file (MB)",
                        "device bound (frames/s)", "fps / bound", "page cache"], rows))
    notes = sorted({f"{r['device']}: {r['cache_note']}" for r in section["results"]
                    if r["cache"] in ("unverified", "not evicted")})
    lines += [f"- page cache: {note}" for note in notes]
    if gap and gap.get("profiles"):
        rates = gap.get("model_fps", {})
        lines += ["", f"### Reader gap between devices ({gap['format']} frames)", "",
                  "A serial loop reads a frame, then runs the model (1 / (1/reader + 1/model)); a prefetching "
                  "pipeline reads ahead in parallel threads (min(best reader, model)). Model rates: "
                  + (", ".join(f"{label} = {_num(rate)} fps" for label, rate in rates.items()) or "none") + ".", ""]
        headers = ["device", "reader fps, 1 thread", "reader fps, best", "best threads"]
        for label in rates:
            headers += [f"serial, {label} (fps)", f"prefetching, {label} (fps)"]
        rows = []
        for name, entry in gap["profiles"].items():
            row = [name, entry["reader_fps_1_thread"], entry["reader_fps_best"], entry["best_threads"]]
            for label in rates:
                row += [entry["serial_fps"][label], entry["prefetch_fps"][label]]
            rows.append(row)
        lines.append(table(headers, rows))
    return lines


def _stages(section: dict[str, Any]) -> list[str]:
    lines = ["", "## Stages alone", "", "Each stage on its own, on the same synthetic frames.", ""]
    rows = [(r["stage"], r["variant"], r["size"], r["fps"], r["ms_per_frame"], r.get("close_ms"))
            for r in section["results"]]
    lines.append(table(["stage", "variant", "frame (px)", "fps (frames/s)", "ms/frame", "close (ms)"], rows))
    lines.append("\n- writers are timed per `write()`, as the pipeline counts a frame done; `close()` (where the GIF "
                 "is encoded and files are renamed into place) is the last column")
    return lines


def _hologram(section: dict[str, Any]) -> list[str]:
    lines = ["", "## Hologram demodulation", "",
             "Off-axis demodulation per frame; contenders interleaved on the same 12-bit synthetic holograms, "
             f"medians (torch path on {section['device']}; qpretrieve {section.get('qpretrieve') or 'not installed'}).",
             ""]
    rows = [(r["method"], r["size"], r["cores"], r["ms_per_frame"], r["fps"], r["frames_timed"])
            for r in section["results"]]
    lines.append(table(["method", "frame (px)", "cores", "ms/frame", "fps (frames/s)", "frames timed"], rows))
    return lines


def _models(section: dict[str, Any]) -> list[str]:
    gsize = section["gflops_size"]
    lines = ["", "## Models", "", f"Latency = median time of one forward pass on a 1×C×{section['size']}² batch "
             f"(batch 1); GFLOPs counted at {gsize}².", ""]
    rows = [(r["model"], r["params_m"], r["gflops"], r["backend"], r["size"], r.get("latency_ms"), r.get("fps"),
             r.get("note", "")) for r in section["results"]]
    lines.append(table(["model", "params (M)", f"GFLOPs @{gsize}²", "backend", "input (px)", "latency (ms)",
                        "fps (frames/s)", "note"], rows))
    return lines


def _soak(section: dict[str, Any]) -> list[str]:
    run, build = section["run"], section["build"]
    lines = ["", "## Soak", "",
             f"{run['frames']} frames of {run['size']}² from a looped synthetic source, unpaced, through the threaded "
             f"pipeline (backend: {run['backend']}; GIF and CSV written) in {run['seconds']:.0f} s "
             f"({run['fps']:.0f} frames/s). RSS = resident set size, MB = 10⁶ bytes.", ""]
    lines.append(table(["point", "frames", "RSS (MB)", "elapsed (s)"],
                       [(f"{r['percent']} %", r["frames"], r["rss_mb"], r["elapsed_s"]) for r in run["rss"]]))
    lines.append(f"\n- growth after warm-up (RSS at 100 % minus at 10 %): {run['growth_mb']:.2f} MB; fitted over the "
                 f"run: {run['slope_bytes_per_frame']:.1f} bytes per frame; peak during the run {run['peak_rss_mb']:.1f} MB")
    lines.append(f"- building a {build['frames']}-frame {build['size']}² synthetic sequence in a fresh process: "
                 f"{build['seconds']:.2f} s, peak RSS {build['peak_rss_mb']:.0f} MB "
                 f"({build['rss_before_mb']:.0f} MB after imports)")
    return lines


def to_markdown(result: dict[str, Any]) -> str:
    """The readable report: header, targets, then one section per benchmark that ran."""
    lines = _header(result) + _targets(result)
    if "end_to_end" in result:
        lines += _end_to_end(result["end_to_end"])
    if "storage" in result:
        lines += _storage(result["storage"], result.get("storage_gap"))
    if "stages" in result:
        lines += _stages(result["stages"])
    if "hologram" in result:
        lines += _hologram(result["hologram"])
    if "models" in result:
        lines += _models(result["models"])
    if "soak" in result:
        lines += _soak(result["soak"])
    for message in result.get("notes", []):
        lines.append(f"\n> {message}")
    return "\n".join(lines) + "\n"


def write_markdown(path: str | Path, result: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_markdown(result))


def chart_panels(result: dict[str, Any]) -> list[tuple[str, list[tuple[str, float]]]]:
    """Bar-chart panels: (title with unit, [(label, value)]) for each section that ran."""
    panels = []
    e2e = result.get("end_to_end")
    if e2e:
        panels.append((f"End to end, {e2e['size']}² frames (frames/s)", [
            ("threaded pipeline", e2e["pipeline_fps"]), ("naive loop", e2e["naive_fps"]),
            (f"slowest stage alone: {e2e['slowest_stage']}", e2e["slowest_stage_fps"])]))
    storage = result.get("storage")
    if storage:
        bars = []
        fmt = "png" if any(r["format"] == "png" for r in storage["results"]) else storage["results"][0]["format"]
        for device in dict.fromkeys(r["device"] for r in storage["results"]):
            rows = sorted((r for r in storage["results"] if r["device"] == device and r["format"] == fmt),
                          key=lambda r: r["threads"])
            if not rows:
                continue
            best = max(rows, key=lambda r: r["fps"])
            bars.append((f"{device}, {rows[0]['threads']} thread(s)", rows[0]["fps"]))
            if best is not rows[0]:
                bars.append((f"{device}, {best['threads']} threads (best)", best["fps"]))
            if rows[0].get("bound_fps"):
                bars.append((f"{device}, device bound", rows[0]["bound_fps"]))
        panels.append((f"Reading {storage['frame_size']}² {fmt} frames (frames/s)", bars))
    stages = result.get("stages")
    if stages and stages["results"]:
        sized = [r for r in stages["results"] if isinstance(r["size"], int)]
        size = max([r["size"] for r in sized if "1 core" not in r["variant"]] or [r["size"] for r in sized])
        panels.append((f"Stages alone at {size}² (frames/s)",
                       [(f"{r['stage']}: {r['variant']}", r["fps"]) for r in stages["results"] if r["size"] == size]))
    models = result.get("models")
    if models:
        panels.append((f"Models at {models['size']}², batch 1 (frames/s)",
                       [(f"{r['model']} ({r['backend']})", r["fps"]) for r in models["results"] if r.get("fps")]))
    soak = result.get("soak")
    if soak:
        panels.append((f"Soak, {soak['run']['frames']} frames of {soak['run']['size']}²: RSS (MB)",
                       [(f"after {r['percent']} % ({r['frames']} frames)", r["rss_mb"]) for r in soak["run"]["rss"]]))
    return [(title, bars) for title, bars in panels if bars]


_FONT = cv2.FONT_HERSHEY_SIMPLEX
_INK = (40, 40, 40)
_BAR_COLOURS = [(180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214), (189, 103, 148)]


def _scale(values: list[float], span: int) -> tuple[Callable[[float], int], list[float], bool]:
    """Value -> bar length in pixels; decade ticks for a log scale (values spanning > 20×), else none."""
    positive = [v for v in values if v > 0]
    top = max(positive, default=1.0)
    low = min(positive, default=1.0)
    if top / low <= 20:
        return (lambda v: max(1, int(span * v / top))), [], False
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(top))
    last = max(last, first + 1)

    def length(value: float) -> int:
        if value <= 0:
            return 1
        return max(1, int(span * (math.log10(value) - first) / (last - first)))

    return length, [10.0 ** k for k in range(first, last + 1)], True


def write_plot(path: str | Path, result: dict[str, Any]) -> None:
    """Horizontal bar chart, one panel per section, each with its own scale (PNG; frames/s, soak: MB).

    A panel whose values span more than 20× uses a logarithmic axis with labelled decades (the title
    says so), so a 10 000 fps writer does not flatten a 10 fps model into an invisible bar.
    """
    panels = chart_panels(result)
    if not panels:
        raise ValueError("nothing to plot: no section produced figures")
    width, label_w, bar_h, gap, title_h, axis_h = 1280, 470, 20, 6, 44, 22
    height = 60 + sum(title_h + len(bars) * (bar_h + gap) + axis_h + 30 for _, bars in panels)
    canvas = np.full((height, width, 3), 255, np.uint8)
    machine = result.get("machine", {})
    cv2.putText(canvas, f"Frame-rate benchmark - {machine.get('cpu_model', '?')} "
                        f"({machine.get('cpu_cores_usable', '?')} cores), GPU: {machine.get('gpu') or 'none'}",
                (16, 32), _FONT, 0.65, _INK, 1, cv2.LINE_AA)
    y = 60
    span = width - label_w - 110
    for index, (title, bars) in enumerate(panels):
        colour = _BAR_COLOURS[index % len(_BAR_COLOURS)]
        length, ticks, logarithmic = _scale([value for _, value in bars], span)
        cv2.putText(canvas, title + (", log scale" if logarithmic else ""), (16, y + 26), _FONT, 0.6, _INK, 1,
                    cv2.LINE_AA)
        y += title_h
        bottom = y + len(bars) * (bar_h + gap) - gap
        for tick in ticks:  # grid first, so bars and numbers stay on top
            x = label_w + length(tick) if tick > min(ticks) else label_w
            cv2.line(canvas, (x, y - 4), (x, bottom), (215, 215, 215), 1)
            cv2.putText(canvas, f"{tick:g}", (x - 8, bottom + 14), _FONT, 0.4, (110, 110, 110), 1, cv2.LINE_AA)
        for label, value in bars:
            cv2.putText(canvas, label[:60], (16, y + bar_h - 5), _FONT, 0.45, _INK, 1, cv2.LINE_AA)
            end = label_w + length(value)
            cv2.rectangle(canvas, (label_w, y), (end, y + bar_h), colour, -1)
            cv2.putText(canvas, _num(value), (end + 6, y + bar_h - 5), _FONT, 0.45, _INK, 1, cv2.LINE_AA)
            y += bar_h + gap
        cv2.line(canvas, (label_w, bottom), (label_w + span, bottom), (160, 160, 160), 1)
        y += axis_h + 30
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), canvas):
        raise OSError(f"cannot write {path}")
