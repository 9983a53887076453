"""The object read-out and its outputs: objects, tracks, events and plots from moving discs of known phase."""

from __future__ import annotations

import csv
import json
import math

import cv2
import numpy as np
import pytest

from app.config import ObjectsConfig, OpticsConfig
from app.pipeline.frames import Frame, SourceInfo
from app.pipeline.readout import ReadOut
from app.pipeline.sinks import SINKS, Rendered, open_sinks
from app.pipeline.sinks.objects import COLUMNS as OBJECT_COLUMNS
from app.pipeline.sinks.plots import PLOTS
from app.pipeline.sinks.tracks import COLUMNS as TRACK_COLUMNS

INFO = SourceInfo("test", "images", live=False, fps=10.0)
OPTICS = OpticsConfig(pixel_size_um=0.5, wavelength_nm=633.0, refractive_index_difference=0.03,
                      refraction_increment_ml_per_g=0.19)
PEAK_RAD = 1.5


def disc_frame(index: int, centres: list[tuple[float, float]], sign: float = 1.0, size: int = 128) -> tuple[Frame, np.ndarray]:
    """A frame whose phase holds flat discs of PEAK_RAD (times ``sign``) and their label map."""
    labels = np.zeros((size, size), np.uint8)
    for x, y in centres:
        cv2.circle(labels, (round(x), round(y)), 9, 1, cv2.FILLED)
    phase = np.where(labels > 0, sign * PEAK_RAD, 0.0).astype(np.float32)
    frame = Frame(index, float(index), np.zeros((size, size), np.uint8), INFO, phase=phase)
    return frame, labels


def run_discs(readout: ReadOut, frames: int = 12, sign: float = 1.0) -> list[Rendered]:
    items = []
    for index in range(frames):
        centres = [(20 + 2 * index, 30), (90, 40 + 3 * index)]
        frame, labels = disc_frame(index, centres, sign)
        items.append(Rendered(frame, labels, np.zeros((*labels.shape, 3), np.uint8), 1.0, readout(frame, labels)))
    return items


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_dry_mass_is_positive_whatever_the_phase_sign(sign):
    readout = ReadOut(OPTICS, ObjectsConfig(), classes=[1], fps=10.0)
    last = run_discs(readout, sign=sign)[-1].readout
    area = last.objects.area_px[0]
    expected = PEAK_RAD * area * OPTICS.opd_um_per_rad * OPTICS.pixel_area_um2 / OPTICS.refraction_increment_ml_per_g
    np.testing.assert_allclose(last.objects.dry_mass_pg[0], expected, rtol=1e-5)
    assert readout.phase_sign == sign
    assert last.total_dry_mass_pg == pytest.approx(float(np.sum(last.objects.dry_mass_pg)))


def test_tracks_keep_their_ids_and_frame_times_follow_the_source_rate():
    readout = ReadOut(OPTICS, ObjectsConfig(), classes=[1], fps=10.0)
    items = run_discs(readout)
    assert [item.readout.tracks.track_ids.tolist() for item in items] == [[1, 2]] * len(items)
    assert items[5].readout.time_s == pytest.approx(0.5)
    summaries = {s.track_id: s for s in readout.summaries()}
    # track 1 moves 2 px a frame: 2 px × 0.5 µm × 10 frames/s = 10 µm/s
    assert summaries[1].mean_speed_um_per_s == pytest.approx(10.0, rel=0.05)
    assert summaries[2].mean_speed_um_per_s == pytest.approx(15.0, rel=0.05)


def test_object_track_event_and_plot_outputs(tmp_path):
    from app.config import OutputConfig

    output = OutputConfig(objects=str(tmp_path / "objects.csv"), tracks=str(tmp_path / "tracks.csv"),
                          events=str(tmp_path / "events.jsonl"), plots_dir=str(tmp_path / "plots"))
    sinks = open_sinks(output, ["background", "cell"])
    readout = ReadOut(OPTICS, ObjectsConfig(), classes=[1], fps=10.0)
    for item in run_discs(readout):
        for sink in sinks:
            sink.write(item)
    for sink in sinks:
        sink.close()
    with (tmp_path / "objects.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == OBJECT_COLUMNS
    assert {"area_um2", "dry_mass_pg", "time_s", "mean_opd_um"} <= set(rows[0])
    assert len(rows) == 24 and rows[0]["class"] == "cell" and float(rows[-1]["time_s"]) == pytest.approx(1.1)
    assert all(float(row["dry_mass_pg"]) > 0 for row in rows)
    with (tmp_path / "tracks.csv").open() as handle:
        tracks = list(csv.DictReader(handle))
    assert tuple(tracks[0]) == TRACK_COLUMNS and [row["track_id"] for row in tracks] == ["1", "2"]
    assert float(tracks[0]["mean_speed_um_per_s"]) == pytest.approx(10.0, rel=0.05)
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(e["event"], e["started"]) for e in events] == [("enter", [1]), ("enter", [2])]
    for name in PLOTS:
        image = cv2.imread(str(tmp_path / "plots" / name))
        assert image is not None and image.shape[0] > 200 and image.std() > 5, name


def test_read_out_sinks_refuse_a_run_that_does_not_measure(tmp_path):
    from app.pipeline.sinks import SinkError

    readout_sinks = [name for name, spec in SINKS.items() if spec.readout]
    assert set(readout_sinks) == {"objects", "tracks", "events", "plots"}
    from app.config import OutputConfig

    sink = open_sinks(OutputConfig(objects=str(tmp_path / "o.csv")), ["background", "cell"])[0]
    frame, labels = disc_frame(0, [(30, 30)])
    with pytest.raises(SinkError, match="needs the object read-out"):
        sink.write(Rendered(frame, labels, np.zeros((*labels.shape, 3), np.uint8), 1.0))
    sink.close()
    assert not (tmp_path / "o.csv").exists()


def test_speeds_of_a_live_source_come_from_the_capture_clock():
    readout = ReadOut(OPTICS, ObjectsConfig(), classes=[1], fps=None)
    for index in range(6):
        frame, labels = disc_frame(index, [(20 + 2 * index, 30)])
        readout(Frame(index, 100.0 + index * 0.05, frame.image, INFO, phase=frame.phase), labels)
    assert readout.frame_rate == pytest.approx(20.0)
    assert readout.summaries()[0].mean_speed_um_per_s == pytest.approx(2 * 0.5 * 20.0, rel=0.05)
    assert math.isfinite(readout.summaries()[0].dry_mass_change_pg)


def test_a_division_is_one_event_with_its_parent_at_the_frame_it_happened(tmp_path):
    from app.config import OutputConfig

    output = OutputConfig(events=str(tmp_path / "events.jsonl"), tracks=str(tmp_path / "tracks.csv"))
    sinks = open_sinks(output, ["background", "cell"])
    readout = ReadOut(OPTICS, ObjectsConfig(), classes=[1], fps=10.0)
    for index in range(14):
        if index < 6:
            frame, labels = disc_frame(index, [(64, 64)])
            cv2.circle(labels, (64, 64), 12, 1, cv2.FILLED)  # the mother, larger than a daughter
        else:
            spread = 9 + 2 * (index - 6)
            frame, labels = disc_frame(index, [(64 - spread, 64), (64 + spread, 64)])
        item = Rendered(frame, labels, np.zeros((*labels.shape, 3), np.uint8), 1.0, readout(frame, labels))
        for sink in sinks:
            sink.write(item)
    for sink in sinks:
        sink.close()
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    divides = [e for e in events if e["event"] == "divide"]
    assert len(divides) == 1 and divides[0]["ended"] == [1] and divides[0]["started"][0] == 1
    assert (divides[0]["frame"], divides[0]["time_s"]) == (6, pytest.approx(0.6))
    daughter = divides[0]["started"][1]
    with (tmp_path / "tracks.csv").open() as handle:
        tracks = {row["track_id"]: row for row in csv.DictReader(handle)}
    assert tracks[str(daughter)]["parent_track"] == "1" and tracks[str(daughter)]["first_frame"] == "6"


def test_ids_survive_frames_missing_from_a_replayed_sequence(tmp_path):
    """Through the real pipeline (shipped weights, the project's own generator): two frames of a
    sequence are unreadable, and every cell keeps its track id across the gap."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    sequence, objects = tmp_path / "seq", tmp_path / "objects.csv"
    synth = [sys.executable, "-m", "app.synth", "--out", str(sequence), "--frames", "24", "--size", "192",
             "--seed", "4321", "--set", "synth.num_cells=4", "--set", "synth.drift_px_per_frame=0.5",
             "--set", "synth.num_particles=0", "--set", "synth.cell_radius_px=[0.07,0.08]"]
    subprocess.run(synth, cwd=root, check=True, capture_output=True)
    for index in (10, 11):
        (sequence / "images" / f"{index:06d}.png").write_bytes(b"not a png")
    replay = [sys.executable, "-m", "app.replay", str(sequence / "images"), "--objects", str(objects), "-q",
              "--set", "objects.max_gap_frames=3"]
    done = subprocess.run(replay, cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with (sequence / "objects.csv").open() as handle:
        truth = [row for row in csv.DictReader(handle) if int(row["area_px"]) >= 200]
    with objects.open() as handle:
        measured = list(csv.DictReader(handle))
    assert {int(row["frame"]) for row in measured} == set(range(24)) - {10, 11}
    ids_of: dict[str, set[str]] = {}
    for row in truth:
        here = [m for m in measured if m["frame"] == row["frame"]]
        nearest = min(here, key=lambda m: math.hypot(float(m["centroid_x_px"]) - float(row["x_px"]),
                                                   float(m["centroid_y_px"]) - float(row["y_px"])), default=None)
        if nearest is not None and math.hypot(float(nearest["centroid_x_px"]) - float(row["x_px"]),
                                              float(nearest["centroid_y_px"]) - float(row["y_px"])) < 6:
            ids_of.setdefault(row["object_id"], set()).add(nearest["track_id"])
    spanning = [oid for oid in ids_of if {int(r["frame"]) for r in truth if r["object_id"] == oid} >= {9, 12}]
    assert spanning, "no cell was seen on both sides of the gap"
    assert all(len(ids_of[oid]) == 1 for oid in spanning), ids_of


@pytest.mark.parametrize("stated_um, used_um", [(0.25, 0.25), (352.8, 0.5)])
def test_a_stacks_own_pixel_size_is_used_and_recorded_in_the_stats(tmp_path, stated_um, used_um):
    """An OME-TIFF that states its pixel size sets the read-out's (areas in µm², dry mass) unless it is
    no microscope's (a 72 dpi default); the stats JSON records the optics used and where they came from."""
    import subprocess
    import sys
    from pathlib import Path

    tifffile = pytest.importorskip("tifffile")
    from app.config import SynthConfig
    from app.synthesis import make_sequence

    sequence = make_sequence(SynthConfig(size=128, frames=4, seed=5, num_cells=3))
    stack = tmp_path / "stack.ome.tif"
    tifffile.imwrite(stack, np.stack([frame.image for frame in sequence]), ome=True,
                     metadata={"axes": "TYX", "PhysicalSizeX": stated_um, "PhysicalSizeY": stated_um,
                               "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"})
    root = Path(__file__).resolve().parents[2]
    objects, stats = tmp_path / "objects.csv", tmp_path / "stats.json"
    done = subprocess.run([sys.executable, "-m", "app.replay", str(stack), "--objects", str(objects),
                           "--stats", str(stats), "-q"], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    recorded = json.loads(stats.read_text())["readout"]
    assert recorded["optics"]["pixel_size_um"] == pytest.approx(used_um)
    assert recorded["pixel_size_from"] == ("file" if used_um == stated_um else "config")
    assert recorded["optics"]["wavelength_nm"] == 633.0 and recorded["objects"]["min_area_px"] == 20
    with objects.open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows and all(float(r["area_um2"]) == pytest.approx(int(r["area_px"]) * used_um**2, rel=1e-5) for r in rows)


@pytest.mark.parametrize("configured", [1, -1])
def test_a_configured_phase_sign_is_used_whatever_the_first_objects_say(configured):
    optics = OpticsConfig(phase_sign=configured)
    readout = ReadOut(optics, ObjectsConfig(), classes=[1], fps=10.0)
    last = run_discs(readout, sign=-1.0)[-1].readout  # discs of negative phase
    assert readout.phase_sign == configured
    assert np.sign(last.objects.mean_phase_rad[0]) == -configured
    assert readout.settings_summary()["phase_sign"] == configured


def test_phase_sign_must_be_one_minus_one_or_zero():
    from app.config import ConfigError

    with pytest.raises(ConfigError, match="optics.phase_sign must be 1, -1 or 0"):
        OpticsConfig(phase_sign=2)


def test_a_run_whose_objects_come_out_negative_says_the_sign_is_likely_wrong():
    readout = ReadOut(OPTICS, ObjectsConfig(), classes=[1], fps=10.0)
    # The first frame's objects (a strong bead-like disc) set the sign; every later cell is negative.
    frame, labels = disc_frame(0, [(30, 30)], sign=1.0)
    readout(frame, labels)
    for index in range(1, 8):
        frame, labels = disc_frame(index, [(30 + index, 30), (90, 90)], sign=-1.0)
        readout(frame, labels)
    assert readout.negative_fraction == pytest.approx(14 / 15)
    assert "optics.phase_sign=-1" in readout.sign_warning()
    assert readout.settings_summary()["negative_dry_mass_fraction"] == pytest.approx(14 / 15)
    fixed = ReadOut(OpticsConfig(phase_sign=-1), ObjectsConfig(), classes=[1], fps=10.0)
    for index in range(1, 4):
        frame, labels = disc_frame(index, [(30 + index, 30)], sign=-1.0)
        fixed(frame, labels)
    assert fixed.negative_fraction == 0.0 and fixed.sign_warning() is None


class _SeamBackend:
    """Two flat discs that overlap, with a model's seam (class 2) between them."""

    name, device = "fake", "cpu"

    def predict(self, batch: np.ndarray) -> np.ndarray:
        labels = np.zeros((64, 96), np.uint8)
        cv2.circle(labels, (36, 32), 14, 1, -1)
        cv2.circle(labels, (56, 32), 14, 1, -1)
        labels[18:47, 44:49][labels[18:47, 44:49] == 1] = 2
        return labels[None].repeat(len(batch), 0)

    def warmup(self, shape: tuple[int, ...], iters: int = 2) -> None:
        pass


def test_seams_of_a_contact_model_reach_the_readout_through_the_stages():
    """The inference stage gives contact pixels to the cells and attaches the seams to the frame; the
    read-out then measures two objects where the label map holds one component."""
    from app.pipeline.inference import InferenceWorker
    from app.pipeline.runner import InferenceStage, Preprocessed

    frame = Frame(0, 0.0, np.zeros((64, 96), np.uint8), INFO, phase=np.zeros((64, 96), np.float32))
    stage = InferenceStage(InferenceWorker(_SeamBackend(), contact_class=2))
    (segmented,) = stage.process([Preprocessed(frame, np.zeros((3, 64, 96), np.float32))])
    assert set(np.unique(segmented.labels)) == {0, 1}
    assert segmented.frame.contacts is not None and segmented.frame.contacts.sum() > 0
    readout = ReadOut(OPTICS, ObjectsConfig(), classes=[1], fps=10.0)
    assert len(readout(segmented.frame, segmented.labels).objects) == 2
    plain = ReadOut(OPTICS, ObjectsConfig(), classes=[1], fps=10.0)
    assert len(plain(frame, segmented.labels).objects) == 1
