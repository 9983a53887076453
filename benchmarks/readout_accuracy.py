"""How well the object read-out matches the generator's ground truth: tracking (MOTA, ID switches per
100 object-frames), dry mass (median relative error, in focus and defocused) and divisions.

    python -m benchmarks.readout_accuracy [--frames 200] [--size 256] [--seed 4100] [--json FILE]

Writes held-out randomised sequences with :mod:`app.synth` (seeds never used for training), replays
them with ``app.replay --objects --events`` and the shipped weights, and compares
``objects.csv``/``meta.json`` (truth) with what the run wrote. Ground-truth objects are matched to
measured ones by centroid (within ``--match-px``), frame by frame. Dry mass is scored on cells; beads,
debris and organisms (whose refraction increment is not a protein's) are reported apart. A divide
event matches a true division when it comes within 5 frames of it and its parent track was matched
to the dividing cell just before. ``tracking_on_true_masks`` runs the tracker alone on each sequence's
true instance maps: what tracking and its events score when segmentation is perfect.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from app.cli import Parser, main_of
from app.config import load_config
from app.errors import EXIT_OK
from app.files import write_text
from app.synthesis import make_sequence
from app.training.tracking_metrics import mot_from_centroids

_DEFAULT_SETTINGS = ("synth.num_cells=8", "synth.drift_px_per_frame=1.0", "synth.object_radius_px=[10,16]",
                     "synth.keep=[num_cells,object_radius_px]")
"""Enough separate cells to track (randomisation keeps these two; every optical setting is still drawn)."""


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _run(args: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed: {result.stderr.strip().splitlines()[-1:]}")


def evaluate_sequence(folder: Path, out: Path, weights: str, match_px: float, optics: dict[str, float],
                      min_area_px: int = 20, replay_settings: tuple[str, ...] = ()) -> dict[str, Any]:
    """Replay one written sequence and compare its read-out with the truth beside it. Ground-truth
    objects smaller than ``min_area_px`` (the read-out's ``objects.min_area_px``: cells entering or
    leaving through the border) count neither as misses nor, when found, as false positives."""
    settings = [arg for key, value in optics.items() for arg in ("--set", f"optics.{key}={value}")]
    settings += [arg for item in replay_settings for arg in ("--set", item)]
    background = ["--background", str(folder / "background.png")] if (folder / "background.png").is_file() else []
    _run(["app.replay", str(folder), "--weights", weights, *background, "--objects", str(out / "objects.csv"),
          "--events", str(out / "events.jsonl"), "-q", *settings])
    truth = _read_csv(folder / "objects.csv")
    measured = _read_csv(out / "objects.csv")
    frames = sorted({int(row["frame"]) for row in truth})
    gt_by_frame: dict[int, dict[int, tuple[float, float]]] = defaultdict(dict)
    ignored: dict[int, list[tuple[float, float]]] = defaultdict(list)
    truth_rows: dict[tuple[int, int], dict[str, str]] = {}
    for row in truth:
        if int(row["area_px"]) < min_area_px:  # below the detection size (entering, leaving): don't care
            if int(row["area_px"]):
                ignored[int(row["frame"])].append((float(row["x_px"]), float(row["y_px"])))
            continue
        gt_by_frame[int(row["frame"])][int(row["object_id"])] = (float(row["x_px"]), float(row["y_px"]))
        truth_rows[(int(row["frame"]), int(row["object_id"]))] = row
    tr_by_frame: dict[int, dict[int, tuple[float, float]]] = defaultdict(dict)
    measured_rows: dict[tuple[int, int], dict[str, str]] = {}
    for row in measured:
        x, y = float(row["centroid_x_px"]), float(row["centroid_y_px"])
        if any(np.hypot(x - gx, y - gy) <= match_px for gx, gy in ignored[int(row["frame"])]):
            continue  # found a don't-care object: neither a hit nor a false positive
        tr_by_frame[int(row["frame"])][int(row["track_id"])] = (float(row["centroid_x_px"]), float(row["centroid_y_px"]))
        measured_rows[(int(row["frame"]), int(row["track_id"]))] = row
    mot = mot_from_centroids([gt_by_frame[f] for f in frames], [tr_by_frame[f] for f in frames], match_px)
    errors: dict[str, list[float]] = {"in_focus": [], "defocused": []}
    pixel_area = optics["pixel_size_um"] ** 2
    scale = optics["wavelength_nm"] * 1e-3 / (2 * np.pi) * pixel_area / optics["refraction_increment_ml_per_g"]
    matched: dict[tuple[int, int], int] = {}  # (frame, true object id) -> track id
    for frame in frames:
        gt, tr = gt_by_frame[frame], tr_by_frame[frame]
        if not gt or not tr:
            continue
        gt_ids, tr_ids = list(gt), list(tr)
        cost = np.array([[np.hypot(gt[g][0] - tr[t][0], gt[g][1] - tr[t][1]) for t in tr_ids] for g in gt_ids])
        for i, j in zip(*linear_sum_assignment(cost), strict=True):
            if cost[i, j] > match_px:
                continue
            matched[(frame, gt_ids[i])] = tr_ids[j]
            truth_row = truth_rows[(frame, gt_ids[i])]
            mass = measured_rows[(frame, tr_ids[j])]["dry_mass_pg"]
            if not mass:
                continue
            true_mass = float(truth_row["integrated_phase_rad_px"]) * scale
            if true_mass > 0:
                key = "in_focus" if truth_row["in_focus"] == "1" else "defocused"
                if truth_row["class"] != "cell":  # beads, debris, organisms: dry mass means protein, α of cells
                    key = f"{key}_{truth_row['class']}"
                errors.setdefault(key, []).append(abs(float(mass) - true_mass) / true_mass)
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()] \
        if (out / "events.jsonl").is_file() else []
    meta = json.loads((folder / "meta.json").read_text())
    divides = [e for e in events if e["event"] == "divide"]
    matching = 0
    for division in meta.get("divisions", []):
        before = {matched.get((f, division["parent_id"])) for f in range(division["frame"] - 5, division["frame"])} - {None}
        matching += any(abs(e["frame"] - division["frame"]) <= 5 and e["ended"][0] in before for e in divides)
    return {"mota": mot.mota, "id_switches": mot.id_switches, "object_frames": mot.ground_truth_objects,
            "false_negatives": mot.false_negatives, "false_positives": mot.false_positives,
            "dry_mass_errors": errors, "divisions_true": len(meta.get("divisions", [])),
            "divide_events": len(divides), "divide_events_matching": matching}


def tracking_on_true_masks(synth: Any, objects: Any, match_px: float) -> dict[str, Any]:
    """The tracker alone: every frame's true instance map (each object a label value of its own, so
    touching objects stay apart) measured and tracked as the read-out does, against the true ids.
    What tracking and its events score when segmentation is perfect."""
    from app.pipeline.objects import ObjectMeasurer
    from app.pipeline.tracking import DIVIDE, Tracker

    sequence = make_sequence(synth)
    measurer = ObjectMeasurer(min_area_px=objects.min_area_px)
    tracker = Tracker(objects.max_link_distance_px, objects.max_gap_frames, confirm_frames=objects.division_confirm_frames,
                      max_daughter_area_ratio=objects.max_daughter_area_ratio,
                      max_hidden_frames=objects.max_hidden_frames)
    truth, found, divides = [], [], []
    for index in range(len(sequence)):
        frame = sequence.frame(index)
        ids = frame.instances.astype(np.int64)
        labels = np.where(ids > 0, (ids - 1) % 254 + 1, 0).astype(np.uint8)  # 254 values: ids in view at once are fewer
        measured = measurer(labels)
        tracks = tracker.update(measured, index)
        divides += [event for event in tracks.events if event.kind == DIVIDE]
        found.append({int(t): tuple(xy) for t, xy in zip(tracks.track_ids, measured.centroid_xy, strict=True)})
        sizes = np.bincount(ids.ravel())
        truth.append({o.object_id: (o.x_px, o.y_px) for o in frame.objects
                      if o.object_id < len(sizes) and sizes[o.object_id] >= objects.min_area_px})
    mot = mot_from_centroids(truth, found, match_px)
    return {"mota": mot.mota, "id_switches": mot.id_switches, "object_frames": mot.ground_truth_objects,
            "divide_events": len(divides), "divisions_true": len(getattr(sequence, "divisions", ()))}


def run(args: argparse.Namespace) -> int:
    optics = {"pixel_size_um": 0.5, "wavelength_nm": 633.0, "refraction_increment_ml_per_g": 0.19}
    results = []
    with tempfile.TemporaryDirectory(prefix="cellseg-readout-") as scratch:
        for k in range(args.sequences):
            folder, out = Path(scratch) / f"seq{k}", Path(scratch) / f"out{k}"
            out.mkdir()
            settings = [arg for item in (*_DEFAULT_SETTINGS, f"synth.num_divisions={args.divisions}", *args.set)
                        for arg in ("--set", item)]
            _run(["app.synth", "--out", str(folder), "--frames", str(args.frames), "--size", str(args.size),
                  "--seed", str(args.seed + k), *(["--randomize"] if args.randomize else []), *settings])
            min_area = next((int(item.split("=", 1)[1]) for item in args.replay_set
                             if item.startswith("objects.min_area_px=")), 20)
            result = evaluate_sequence(folder, out, args.weights, args.match_px, optics, min_area,
                                       tuple(args.replay_set))
            # The same sequence again (same seed and settings), its true masks tracked without the model.
            same = load_config(None, [f"synth.size={args.size}", f"synth.frames={args.frames}",
                                      f"synth.seed={args.seed + k}", f"synth.randomize={str(args.randomize).lower()}",
                                      *(item for item in settings if item != "--set"), *args.replay_set])
            truth_frames = _read_csv(folder / "objects.csv")
            if sum(row["frame"] == "0" for row in truth_frames) != len(make_sequence(same.synth).frame(0).objects):
                raise RuntimeError("could not rebuild the written sequence for the true-mask tracking")
            result["tracking_on_true_masks"] = tracking_on_true_masks(same.synth, same.objects, args.match_px)
            results.append(result)
            print(f"sequence {k}: MOTA {result['mota']:.3f}, {result['id_switches']} ID switches in "
                  f"{result['object_frames']} object-frames", file=sys.stderr)
    object_frames = sum(r["object_frames"] for r in results)
    switches = sum(r["id_switches"] for r in results)
    in_focus = [e for r in results for e in r["dry_mass_errors"]["in_focus"]]
    defocused = [e for r in results for e in r["dry_mass_errors"]["defocused"]]
    other_kinds = sorted({key for r in results for key in r["dry_mass_errors"]} - {"in_focus", "defocused"})
    others = {key: statistics.median([e for r in results for e in r["dry_mass_errors"].get(key, [])])
              for key in other_kinds}
    summary = {
        "command": "python -m benchmarks.readout_accuracy " + " ".join(sys.argv[1:]),
        "mota_mean": statistics.fmean(r["mota"] for r in results),
        "id_switches_per_100_object_frames": 100.0 * switches / object_frames if object_frames else None,
        "dry_mass_median_relative_error_in_focus": statistics.median(in_focus) if in_focus else None,
        "dry_mass_median_relative_error_defocused": statistics.median(defocused) if defocused else None,
        "dry_mass_matches": {"in_focus": len(in_focus), "defocused": len(defocused)},
        "dry_mass_median_relative_error_other_kinds": others,
        "divide_events_matching": sum(r["divide_events_matching"] for r in results),
        "tracking_on_true_masks": {
            "mota_mean": statistics.fmean(r["tracking_on_true_masks"]["mota"] for r in results),
            "id_switches": sum(r["tracking_on_true_masks"]["id_switches"] for r in results),
            "divide_events": sum(r["tracking_on_true_masks"]["divide_events"] for r in results)},
        "divisions_true": sum(r["divisions_true"] for r in results),
        "divide_events": sum(r["divide_events"] for r in results),
        "sequences": results,
    }
    text = json.dumps(summary, indent=2)
    if args.json:
        write_text(args.json, text + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "sequences"}, indent=2))
    return EXIT_OK


def _parser() -> Parser:
    parser = Parser(prog="python -m benchmarks.readout_accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=4100, help="first seed (held out: training used others)")
    parser.add_argument("--sequences", type=int, default=1)
    parser.add_argument("--divisions", type=int, default=1, help="synth.num_divisions per sequence")
    parser.add_argument("--randomize", action="store_true", help="randomised optics (propagated generator)")
    parser.add_argument("--weights", default="weights/icnet_interferogram.pt")
    parser.add_argument("--match-px", type=float, default=8.0, help="centroid distance that counts as a match")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more synth settings")
    parser.add_argument("--replay-set", action="append", default=[], metavar="KEY=VALUE",
                        help="settings for the replay that measures (e.g. objects.min_area_px=60)")
    parser.add_argument("--json", type=Path, help="write the full result here")
    return parser


def main(argv: list[str] | None = None) -> int:
    return main_of("benchmarks.readout_accuracy", _parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
