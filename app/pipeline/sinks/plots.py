"""Plots of the read-outs at the end of a run (``--plots DIR``, ``output.plots_dir``): count and
confluence over time, dry mass per track over time, and a histogram of track speeds (matplotlib PNGs)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.files import atomic_path
from app.pipeline.sinks.base import Rendered, SinkError, SinkSpec, sink_errors

if TYPE_CHECKING:
    from app.config import OutputConfig

PLOTS = ("count_confluence.png", "dry_mass_per_track.png", "speed_histogram.png")
_MAX_TRACKS_DRAWN = 40  # the longest tracks; more lines than this is a tangle, not a plot


class PlotsSink:
    """Collects the per-frame totals and per-track dry mass (a few numbers per object per frame) and
    draws :data:`PLOTS` into the folder when closed; each PNG is written atomically. No frame, no plot.
    The dry-mass plot needs the hologram phase; without it that panel says so."""

    def __init__(self, folder: str | Path, class_names: Sequence[str]) -> None:
        self.output = SPEC.check(folder)
        self.path = Path(folder)
        self.frames = 0
        self._times: list[float] = []
        self._counts: list[int] = []
        self._confluence: list[float] = []
        self._total_mass: list[float | None] = []
        self._mass: dict[int, tuple[list[float], list[float]]] = {}
        self._run: Any = None

    def write(self, item: Rendered) -> None:
        readout = item.readout
        if readout is None:
            raise SinkError("--plots needs the object read-out, which this run does not make")
        self._run = readout.run
        self._times.append(readout.time_s)
        self._counts.append(len(readout.objects))
        self._confluence.append(100.0 * readout.confluence)
        self._total_mass.append(readout.total_dry_mass_pg)
        if readout.objects.dry_mass_pg is not None:
            for track_id, mass in zip(readout.tracks.track_ids.tolist(), readout.objects.dry_mass_pg.tolist(),
                                      strict=True):
                times, masses = self._mass.setdefault(track_id, ([], []))
                times.append(readout.time_s)
                masses.append(mass)
        self.frames += 1

    def close(self) -> None:
        if not self.frames:
            return
        import matplotlib

        matplotlib.use("Agg", force=True)
        from matplotlib import pyplot

        speeds = [s.mean_speed_um_per_s for s in self._run.summaries() if s.mean_speed_um_per_s is not None] \
            if self._run is not None else []
        self.path.mkdir(parents=True, exist_ok=True)
        for name, draw in zip(PLOTS, (self._draw_counts, self._draw_mass, self._draw_speeds), strict=True):
            figure = pyplot.figure(figsize=(7.0, 4.2), dpi=110)
            try:
                draw(figure, speeds)
                figure.tight_layout()
                with sink_errors(), atomic_path(self.path / name, suffixes=(".png",)) as partial:
                    figure.savefig(partial, format="png")
            finally:
                pyplot.close(figure)
        self.frames = 0

    def _draw_counts(self, figure: Any, speeds: list[float]) -> None:
        axes = figure.add_subplot()
        axes.plot(self._times, self._counts, color="tab:blue", label="objects")
        axes.set_xlabel("time (s)")
        axes.set_ylabel("objects per frame")
        twin = axes.twinx()
        twin.plot(self._times, self._confluence, color="tab:orange", label="confluence")
        twin.set_ylabel("confluence (% of the frame)")
        lines = axes.get_lines() + twin.get_lines()
        axes.legend(lines, [line.get_label() for line in lines], loc="upper left")
        axes.set_title("Object count and confluence")

    def _draw_mass(self, figure: Any, speeds: list[float]) -> None:
        axes = figure.add_subplot()
        axes.set_xlabel("time (s)")
        axes.set_ylabel("dry mass (pg)")
        axes.set_title("Dry mass per track")
        if not self._mass:
            axes.text(0.5, 0.5, "no phase: dry mass needs the hologram stage", ha="center", va="center",
                      transform=axes.transAxes)
            return
        longest = sorted(self._mass.items(), key=lambda item: -len(item[1][0]))[:_MAX_TRACKS_DRAWN]
        for track_id, (times, masses) in sorted(longest):
            axes.plot(times, masses, linewidth=1.2, label=f"track {track_id}")
        totals = [(t, m) for t, m in zip(self._times, self._total_mass, strict=True) if m is not None]
        if totals:
            axes.plot(*zip(*totals, strict=True), color="black", linewidth=2.0, linestyle="--", label="total")
        axes.legend(fontsize="x-small", ncol=2 if len(longest) > 8 else 1, loc="upper right")

    def _draw_speeds(self, figure: Any, speeds: list[float]) -> None:
        axes = figure.add_subplot()
        axes.hist(speeds, bins=max(5, min(30, len(speeds) // 2 or 1)), color="tab:green", label="tracks")
        axes.set_xlabel("mean speed (µm/s)")
        axes.set_ylabel("tracks")
        axes.set_title(f"Track speeds ({len(speeds)} tracks seen more than once)")
        axes.legend()


def _open(path: str | Path, output: OutputConfig, class_names: Sequence[str]) -> PlotsSink:
    return PlotsSink(path, class_names)


SPEC = SinkSpec("plots_dir", "--plots", "DIR",
                "at the end, PNG plots: count and confluence over time, dry mass per track, speed histogram",
                _open, "plots", folder=True, readout=True)
