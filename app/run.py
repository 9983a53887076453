"""What the live and replay CLIs share: their flags, display detection, the window, progress, the summary.

This is the only layer of the pipeline that touches the outside world: it parses arguments, sets up
logging and OpenCV's log level, opens the window (``cv2.imshow``/``waitKey``, main thread only), writes
the progress line and the summary table on stderr, and turns typed errors into one line plus an exit
code (:data:`EXIT_OK` 0, :data:`EXIT_FAILURE` 1 = a stage failed, :data:`EXIT_USAGE` 2 = bad input,
:data:`EXIT_INTERRUPTED` 130 = Ctrl-C, outputs finalised).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from app.cli import add_config_arguments, add_device_arguments, add_verbosity_arguments, config_from_args
from app.config import Config, replace
from app.errors import EXIT_INTERRUPTED, EXIT_OK, UsageError, deferred_interrupts
from app.files import check_output
from app.pipeline.backends import BACKENDS
from app.pipeline.factory import build_stages
from app.pipeline.runner import PipelineError, PipelineResult
from app.pipeline.sinks import SINKS, check_outputs
from app.pipeline.stats import format_table, write_json
from app.preview import PreviewServer

log = logging.getLogger("app")


def display_available() -> tuple[bool, str]:
    """Whether a window can be opened: on Linux an X11/Wayland display must be set (OpenCV's Qt
    backend aborts the process otherwise), and OpenCV must have been built with a GUI backend."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False, "no display (DISPLAY and WAYLAND_DISPLAY are unset)"
    gui = [line for line in cv2.getBuildInformation().splitlines() if line.strip().startswith("GUI:")]
    if gui and gui[0].split(":", 1)[1].strip().upper() == "NONE":
        return False, "OpenCV was built without a GUI backend"
    return True, ""


class WindowDisplay:
    """An OpenCV window showing the newest overlay; ``show`` returns False once q/Esc is pressed or the
    window is closed. Call from the main thread only."""

    QUIT_KEYS = (ord("q"), ord("Q"), 27)

    def __init__(self, title: str) -> None:
        self.title = title
        self._opened = False
        self._broken = False

    def show(self, image: np.ndarray) -> bool:
        if self._broken:
            return True
        try:
            if not self._opened:
                cv2.namedWindow(self.title, cv2.WINDOW_NORMAL)
                self._opened = True
            elif cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE) < 1:
                return False
            cv2.imshow(self.title, image)
            key = cv2.waitKey(1) & 0xFF
        except cv2.error as exc:  # OpenCV built without highgui, or the window system went away
            self._broken = True
            text = str(exc).strip().splitlines()
            log.warning("window off: %s", text[-1] if text else "cannot open a window")
            return True
        return key not in self.QUIT_KEYS

    def close(self) -> None:
        if self._opened:
            try:
                cv2.destroyWindow(self.title)
                cv2.waitKey(1)
            except cv2.error:
                pass


class ProgressLine:
    """``\\r``-updated progress on stderr when it is a terminal; otherwise one line every 10 s."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_line = time.perf_counter()
        self._drawn = False

    def __call__(self, done: int, total: int | None, fps: float) -> None:
        if total:
            filled = min(30, int(30 * done / total))
            text = f"[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} frames  {fps:6.1f} fps"
        else:
            text = f"{done} frames  {fps:6.1f} fps"
        if self.tty:
            self.stream.write(f"\r{text}\x1b[K")
            self.stream.flush()
            self._drawn = True
        elif time.perf_counter() - self._last_line >= 10.0:
            self._last_line = time.perf_counter()
            self.stream.write(text + "\n")

    def finish(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self._drawn = False


class ProgressBar:
    """tqdm progress on a terminal: frames done of the expected total with the rate and an ETA; without
    a total (a live or endless source) the count and the rate only."""

    def __init__(self, stream: Any) -> None:
        from tqdm import tqdm

        self._bar = tqdm(file=stream, unit=" frames", dynamic_ncols=True, mininterval=0.2)

    def __call__(self, done: int, total: int | None, fps: float) -> None:
        if total != self._bar.total:
            self._bar.total = total
        self._bar.update(done - self._bar.n)

    def finish(self) -> None:
        self._bar.close()


def make_progress(info: Any, stream: Any = None) -> ProgressBar | ProgressLine | None:
    """The progress display for a source (``info``: its SourceInfo): a :class:`ProgressBar` when
    ``stream`` (stderr by default) is a terminal, else the plain :class:`ProgressLine` for a finite source
    and nothing for a live or endless one."""
    stream = stream or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        return ProgressBar(stream)
    return ProgressLine(stream) if info.frame_count else None


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, output and run flags shared by live and replay (each overrides one config value)."""
    model = parser.add_argument_group("model")
    model.add_argument("--weights", metavar="FILE",
                       help="checkpoint carrying its own recipe (config model.weights, "
                            "default weights/icnet_interferogram.pt)")
    model.add_argument("--backend", choices=tuple(BACKENDS), help="inference backend (model.backend)")
    model.add_argument("--num-classes", type=int, metavar="N",
                       help="fail unless the checkpoint predicts exactly N classes")
    model.add_argument("--background", metavar="FILE",
                       help="background hologram (the same field recorded without sample): the hologram stage "
                            "divides by its field, so tilt, aberrations and dust cancel (preprocess.background_file)")
    add_device_arguments(model)
    outputs = parser.add_argument_group("outputs (any combination)")
    for spec in SINKS.values():
        outputs.add_argument(spec.flag, dest=f"sink_{spec.config_key}", metavar=spec.metavar,
                             help=f"{spec.help} (output.{spec.config_key})")
    outputs.add_argument("--stats", metavar="FILE.json",
                         help="write the per-stage timing summary as JSON (output.stats_json)")
    run = parser.add_argument_group("run")
    run.add_argument("--max-frames", type=int, metavar="N", help="stop after N frames (pipeline.max_frames)")
    run.add_argument("--sequential", action="store_true",
                     help="run the naive one-frame-at-a-time loop instead of the threaded pipeline")
    add_verbosity_arguments(parser)
    add_config_arguments(parser)


def config_with_flags(args: argparse.Namespace, **extra: dict[str, Any]) -> Config:
    """The config file + ``--set`` overrides, then the dedicated flags on top."""
    config = config_from_args(args)
    changes: dict[str, dict[str, Any]] = {"model": {}, "output": {}, "pipeline": {}, "preprocess": {}}
    for flag, section, key in (("weights", "model", "weights"), ("backend", "model", "backend"),
                               ("background", "preprocess", "background_file"),
                               *((f"sink_{spec.config_key}", "output", spec.config_key) for spec in SINKS.values()),
                               ("stats", "output", "stats_json"), ("max_frames", "pipeline", "max_frames")):
        value = getattr(args, flag, None)
        if value is not None:
            changes[section][key] = value
    for section, values in extra.items():
        changes.setdefault(section, {}).update(values)
    return replace(config, **{section: values for section, values in changes.items() if values})


def outputs_of(config: Config) -> list[str]:
    output = config.output
    return [path for path in (getattr(output, spec.config_key) for spec in SINKS.values()) if path]


def run_app(prog: str, config: Config, *, realtime: bool, num_classes: int | None, sequential: bool) -> int:
    """Build the stages from ``config``, run them, print the summary; returns the exit code."""
    weights = Path(config.model.weights)
    if not weights.exists():
        raise UsageError(f"weights file not found: {weights}; pass --weights FILE (a checkpoint saved by "
                       f"python -m app.train)")
    check_outputs(config.output)  # every output path, before the model loads and the first frame
    if config.output.stats_json:
        check_output(config.output.stats_json, suffixes=(".json",), streams=True)
    display = None
    if config.output.display:
        available, reason = display_available()
        if available:
            display = WindowDisplay(f"{prog}: {config.source.uri}")
        else:
            log.info("window off: %s", reason)
    preview = PreviewServer(config.preview) if config.preview.address else None  # a busy port fails now
    try:
        stages = build_stages(config, realtime=realtime, num_classes=num_classes)
    except BaseException:
        if preview is not None:
            preview.close()
        raise
    if preview is not None:  # a sink like the others: the runner closes it, which stops the server
        stages.sinks.append(preview.open_sink(config.output, stages.meta.label_names, stages.meta.palette))
    progress = make_progress(stages.source.info)
    try:  # from here the runner closes every stage; until it starts, this does
        log.info("%s: %s -> %s with %s (%s); %s", prog, config.source.uri,
                 ", ".join(outputs_of(config)) or "no files", weights, stages.inference.name,
                 "press q/Esc or Ctrl-C to stop" if display else "Ctrl-C to stop")
        pipeline = stages.pipeline(config.pipeline, display=display, progress=progress)
    except BaseException:
        stages.close()
        raise
    try:
        result = pipeline.run_sequential() if sequential else pipeline.run()
    except PipelineError as failure:  # e.g. a stream that gave up: what it measured still goes to --stats
        if failure.result is not None and config.output.stats_json:
            with deferred_interrupts():
                write_json(config.output.stats_json, summary_of(failure.result, config,
                                                                hologram_summary(stages.preprocessor), stages.readout))
        raise
    finally:
        if progress is not None:
            progress.finish()
        if display is not None:
            display.close()
    with deferred_interrupts():  # a Ctrl-C during the summary must not lose the stats file
        report(result, config, hologram_summary(stages.preprocessor), stages.readout)
        warning = stages.readout.sign_warning() if stages.readout is not None else None
        if warning:
            log.warning("%s", warning)
    return EXIT_INTERRUPTED if result.interrupted else EXIT_OK


def hologram_summary(preprocessor: Any) -> dict[str, Any]:
    """What the hologram stage used (mode, carrier, background file), for the stats JSON; {} without one."""
    demodulator = getattr(preprocessor, "demodulator", None)
    if demodulator is None:
        return {}
    settings = preprocessor.settings
    carrier = demodulator.carrier
    return {"hologram": settings.hologram, "hologram_backend": "torch" if preprocessor.on_device else "numpy",
            "hologram_filter": settings.hologram_filter,
            "hologram_filter_size": settings.hologram_filter_size,
            "background_file": settings.background_file or None,
            "carrier": None if carrier is None else {
                "fy_cycles_per_px": carrier.fy, "fx_cycles_per_px": carrier.fx,
                "period_px": carrier.period_px, "angle_deg": carrier.angle_deg}}


def summary_of(result: PipelineResult, config: Config, preprocessing: dict[str, Any] | None = None,
               readout: Any = None) -> dict[str, Any]:
    """The ``--stats`` JSON: the result, the run's main settings, what the hologram stage used and,
    with the object read-out, the optics and settings it measured with."""
    summary = result.to_dict()
    summary["config"] = {"source": config.source.uri, "weights": config.model.weights,
                         "backend": config.model.backend, "batch_size": config.pipeline.batch_size,
                         "queue_size": config.pipeline.queue_size,
                         "background_file": config.preprocess.background_file or None}
    if preprocessing:
        summary["preprocessing"] = preprocessing
    summary["readout"] = readout.settings_summary() if readout is not None else None
    return summary


def report(result: PipelineResult, config: Config, preprocessing: dict[str, Any] | None = None,
           readout: Any = None) -> None:
    """Summary table (and the written files) on stderr; the JSON summary when asked for."""
    print(format_table(result.to_dict()), file=sys.stderr)
    for path in outputs_of(config):
        if Path(path).exists():
            print(f"wrote {path}", file=sys.stderr)
    if config.output.stats_json:
        write_json(config.output.stats_json, summary_of(result, config, preprocessing, readout))
        print(f"wrote {config.output.stats_json}", file=sys.stderr)
