"""Online tracker on synthetic moving discs drawn with cv2.circle into label maps."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from app.pipeline.objects import FrameObjects, ObjectMeasurer
from app.pipeline.tracking import DIVIDE, ENTER, LEAVE, MERGE, Tracker, TrackingError, overlap_areas
from app.training.tracking_metrics import mot_from_centroids

SIZE = 256
MEASURE = ObjectMeasurer(min_area_px=5)


def objects_of(discs: dict[str, tuple[float, float, float]], size: int = SIZE,
               phase_per_disc: dict[str, float] | None = None) -> FrameObjects:
    """Discs ``{name: (x, y, radius)}`` (px) as one frame's objects; optional uniform phase per disc (rad)."""
    labels = np.zeros((size, size), np.uint8)
    phase = np.zeros((size, size), np.float32) if phase_per_disc is not None else None
    for name, (x, y, radius) in discs.items():
        cv2.circle(labels, (round(x), round(y)), round(radius), 1, -1)
        if phase is not None:
            cv2.circle(phase, (round(x), round(y)), round(radius), float(phase_per_disc[name]), -1)
    return MEASURE(labels, phase)


def id_of(objects: FrameObjects, ids: np.ndarray, x: float, y: float) -> int:
    """Track id of the object whose centroid is nearest (x, y)."""
    return int(ids[np.argmin(np.hypot(*(objects.centroid_xy - (x, y)).T))])


def run(tracker: Tracker, frames: list[dict[str, tuple[float, float, float]]]):
    """Track the frames; return, per frame, ``{disc name: track id}`` and all events."""
    names, events = [], []
    for index, discs in enumerate(frames):
        objects = objects_of(discs)
        result = tracker.update(objects, index)
        assert len(result.track_ids) == len(objects) == len(discs)
        names.append({name: id_of(objects, result.track_ids, x, y) for name, (x, y, _) in discs.items()})
        events.extend(result.events)
    return names, events


def moving_discs(frames: int, absent: dict[str, range] | None = None) -> list[dict[str, tuple[float, float, float]]]:
    absent = absent or {}
    starts = {"a": (40.0, 40.0), "b": (40.0, 130.0), "c": (40.0, 210.0)}
    out = []
    for t in range(frames):
        out.append({name: (x + 3.0 * t, y + np.sin(t / 3.0) * 4, 12.0) for name, (x, y) in starts.items()
                    if t not in absent.get(name, ())})
    return out


def test_ids_persist_across_a_gap_of_two_frames():
    names, events = run(Tracker(max_gap_frames=2), moving_discs(20, absent={"b": range(8, 10)}))
    for disc in "abc":
        assert len({frame[disc] for frame in names if disc in frame}) == 1, disc
    assert [e.kind for e in events] == [ENTER] * 3  # the gap leaves no trace in the events


def test_a_longer_gap_ends_the_track_and_starts_a_new_one():
    tracker = Tracker(max_gap_frames=2)
    names, events = run(tracker, moving_discs(20, absent={"b": range(8, 11)}))
    before, after = names[7]["b"], names[11]["b"]
    assert before != after
    assert [(e.kind, e.frame, e.ended, e.started) for e in events[3:]] == [
        (LEAVE, 10, (before,), ()), (ENTER, 11, (), (after,))]  # leave at last seen (7) + gap (2) + 1
    summary = {s.track_id: s for s in tracker.summaries(fps=10.0, pixel_size_um=0.5)}
    assert (summary[before].first_frame, summary[before].last_frame, summary[before].end) == (0, 7, LEAVE)
    assert (summary[after].first_frame, summary[after].last_frame, summary[after].end) == (11, 19, "alive")


def test_objects_entering_and_leaving():
    frames = moving_discs(25)
    for t in range(5, 12):
        frames[t]["new"] = (200.0, 120.0 + 2 * t, 10.0)
    tracker = Tracker(max_gap_frames=2)
    names, events = run(tracker, frames)
    newcomer = names[5]["new"]
    assert {frame["new"] for frame in names[5:12]} == {newcomer}
    assert [(e.kind, e.frame) for e in events if newcomer in e.ended + e.started] == [(ENTER, 5), (LEAVE, 14)]
    summary = next(s for s in tracker.summaries(fps=10.0, pixel_size_um=1.0) if s.track_id == newcomer)
    assert (summary.first_frame, summary.last_frame, summary.lifetime_frames, summary.frames_observed) == (5, 11, 7, 7)


def test_a_division_gives_one_divide_event_with_its_parent():
    frames = []
    for t in range(16):
        discs = {"other": (200.0, 200.0 - t, 12.0)}
        if t < 6:
            discs["mother"] = (80.0 + t, 80.0, 14.0)
        else:
            spread = 11.0 + 2.0 * (t - 6)
            discs["left"], discs["right"] = (85.0 - spread, 80.0, 9.0), (85.0 + spread, 80.0, 9.0)
        frames.append(discs)
    tracker = Tracker()
    names, events = run(tracker, frames)
    divides = [e for e in events if e.kind == DIVIDE]
    assert len(divides) == 1 and not [e for e in events if e.kind in (MERGE, LEAVE)]
    mother, children = names[5]["mother"], {names[6]["left"], names[6]["right"]}
    assert mother in children  # the mother's id goes on with one daughter
    (daughter,) = children - {mother}
    assert (divides[0].frame, divides[0].ended, divides[0].started) == (6, (mother,), (mother, daughter))
    assert [e.kind for e in events if daughter in e.started] == [DIVIDE]  # no enter for a daughter
    assert len({frame["other"] for frame in names}) == 1
    for name in ("left", "right"):
        assert len({frame[name] for frame in names[6:]}) == 1
    summary = {s.track_id: s for s in tracker.summaries(fps=1.0, pixel_size_um=1.0)}
    assert summary[mother].end == "alive" and summary[mother].last_frame == 15
    assert summary[daughter].parent == mother and summary[daughter].first_frame == 6


def test_a_split_that_lasts_less_than_confirm_frames_is_no_division_and_changes_no_id():
    frames = []
    for t in range(14):  # the segmentation splits the cell in two at frames 5 and 6 only
        if t in (5, 6):
            frames.append({"left": (69.0 + t, 80.0, 9.0), "right": (91.0 + t, 80.0, 9.0)})
        else:
            frames.append({"cell": (80.0 + t, 80.0, 14.0)})
    names, events = run(Tracker(confirm_frames=3), frames)
    cell = names[0]["cell"]
    assert {frame["cell"] for frame in names if "cell" in frame} == {cell}
    assert cell in {names[5]["left"], names[5]["right"]}
    assert not [e for e in events if e.kind in (DIVIDE, MERGE)]
    fragment = ({names[5]["left"], names[5]["right"]} - {cell}).pop()
    assert [e.kind for e in events if fragment in e.ended + e.started] == [ENTER, LEAVE]


def test_without_overlap_events_a_division_is_a_link_and_an_entry():
    frames = [{"mother": (80.0, 80.0, 14.0)}] * 3 + [{"left": (69.0, 80.0, 9.0), "right": (91.0, 80.0, 9.0)}] * 3
    names, events = run(Tracker(overlap_events=False), frames)
    assert [e.kind for e in events] == [ENTER, ENTER]
    assert names[0]["mother"] in {names[3]["left"], names[3]["right"]}


def test_two_tracks_into_one_component_give_a_merge_event():
    tracker = Tracker()
    events, counts = [], []
    for t in range(12):
        gap = max(40.0 - 4.0 * t, 14.0)  # radius 10: the discs touch from some frame on
        objects = objects_of({"left": (100.0 - gap / 2, 100.0, 10.0), "right": (100.0 + gap / 2, 100.0, 10.0)})
        counts.append(len(objects))
        events.extend(tracker.update(objects, t).events)
    touching = counts.index(1)
    assert 2 < touching < 11 and set(counts[touching:]) == {1}
    merges = [e for e in events if e.kind == MERGE]
    assert len(merges) == 1 and merges[0].frame == touching and len(merges[0].ended) == 2
    assert not [e for e in events if e.kind in (DIVIDE, LEAVE)]
    (into,) = merges[0].started
    absorbed = merges[0].ended[0]
    assert merges[0].ended == (absorbed, into)
    summary = {s.track_id: s for s in tracker.summaries(fps=1.0, pixel_size_um=1.0)}
    assert summary[into].merged_from == (absorbed,) and summary[into].end == "alive"
    assert summary[absorbed].end == MERGE


def test_cells_that_touch_for_a_few_frames_keep_their_ids():
    frames = []
    for t in range(14):  # two cells pass each other; one component at frames 5 and 6
        if t in (5, 6):
            frames.append({"pair": (100.0, 100.0, 16.0)})
        else:
            frames.append({"left": (90.0, 100.0 - 2 * (t - 6), 9.0), "right": (110.0, 100.0 + 2 * (t - 6), 9.0)})
    names, events = run(Tracker(max_gap_frames=3), frames)
    assert {frame["left"] for frame in names if "left" in frame} == {names[0]["left"]}
    assert {frame["right"] for frame in names if "right" in frame} == {names[0]["right"]}
    assert not [e for e in events if e.kind in (DIVIDE, MERGE)]


def test_random_walk_of_twenty_discs_is_tracked_without_switches():
    rng = np.random.default_rng(2026)
    cells = [(50 + 100 * i, 50 + 100 * j) for i in range(5) for j in range(4)]  # 20 cells of 100×100 px
    radius = rng.uniform(8, 14, len(cells))
    reach = 50 - radius - 3  # a disc stays in its cell: discs never touch
    offset = np.zeros((len(cells), 2))
    tracker = Tracker(max_link_distance_px=20.0)
    truth, tracked = [], []
    for t in range(100):
        offset = np.clip(offset + rng.normal(0.0, 2.5, offset.shape), -reach[:, None], reach[:, None])
        centres = np.array(cells, np.float64) + offset
        labels = np.zeros((512, 512), np.uint8)
        for (x, y), r in zip(centres, radius, strict=True):
            cv2.circle(labels, (round(x), round(y)), round(r), 1, -1)
        objects = MEASURE(labels)
        result = tracker.update(objects, t)
        assert not [e for e in result.events if e.kind != ENTER]
        truth.append({k: tuple(xy) for k, xy in enumerate(centres)})
        tracked.append({int(i): tuple(xy) for i, xy in zip(result.track_ids, objects.centroid_xy, strict=True)})
    score = mot_from_centroids(truth, tracked, max_distance_px=5.0)
    assert score.id_switches == 0
    assert score.mota >= 0.95


def test_summary_speed_and_dry_mass_change():
    tracker = Tracker()
    for t in range(11):
        objects = objects_of({"a": (50.0 + 3 * t, 60.0, 10.0)}, phase_per_disc={"a": 1.0 + 0.1 * t})
        tracker.update(objects, t)
    first = objects_of({"a": (50.0, 60.0, 10.0)}, phase_per_disc={"a": 1.0}).dry_mass_pg[0]
    last = objects_of({"a": (80.0, 60.0, 10.0)}, phase_per_disc={"a": 2.0}).dry_mass_pg[0]
    (summary,) = tracker.summaries(fps=10.0, pixel_size_um=0.5)
    assert summary.mean_speed_um_per_s == pytest.approx(3 * 0.5 * 10.0)  # px/frame · µm/px · frames/s
    assert summary.dry_mass_first_pg == pytest.approx(first)
    assert summary.dry_mass_change_pg == pytest.approx(last - first)
    assert (summary.lifetime_frames, summary.parent, summary.end) == (11, None, "alive")


def test_without_phase_dry_mass_is_none_and_a_single_sighting_has_no_speed():
    tracker = Tracker()
    tracker.update(objects_of({"a": (50.0, 50.0, 8.0)}), 0)
    (summary,) = tracker.summaries(fps=5.0, pixel_size_um=1.0)
    assert summary.dry_mass_change_pg is None and summary.mean_speed_um_per_s is None


def test_overlap_areas_count_shared_pixels():
    rng = np.random.default_rng(5)
    discs = {str(k): (float(x), float(y), float(r)) for k, (x, y, r) in
             enumerate(zip(rng.uniform(0, SIZE, 12), rng.uniform(0, SIZE, 12), rng.uniform(4, 20, 12), strict=True))}
    before = objects_of(discs)
    after = objects_of({k: (x + rng.normal(0, 6), y + rng.normal(0, 6), r) for k, (x, y, r) in discs.items()})
    expected = [[(before.mask(i) & after.mask(j)).sum() for j in range(len(after))] for i in range(len(before))]
    overlaps = overlap_areas(before, after)
    assert overlaps.tolist() == expected and overlaps.sum() > 0


def test_overlaps_asked_object_by_object_agree_with_the_full_matrix():
    """The tracker counts overlaps only for the objects of new and vanished tracks; what it counts is
    the full matrix's, read by column (a current object) or by row (a previous one), split pieces too."""
    from app.pipeline.tracking import _Overlaps

    rng = np.random.default_rng(8)
    discs = {str(k): (float(x), float(y), float(r)) for k, (x, y, r) in
             enumerate(zip(rng.uniform(0, SIZE, 10), rng.uniform(0, 200, 10), rng.uniform(4, 16, 10), strict=True))}
    labels = np.zeros((SIZE, SIZE), np.uint8)
    for x, y, r in [*discs.values(), (60.0, 232.0, 13.0), (84.0, 232.0, 13.0)]:  # the last two touch
        cv2.circle(labels, (round(x), round(y)), round(r), 1, -1)
    before = ObjectMeasurer(min_area_px=5, split=True)(labels)
    after = objects_of({k: (x + rng.normal(0, 6), y + rng.normal(0, 6), r) for k, (x, y, r) in
                        [*discs.items(), ("pair", (72.0, 232.0, 20.0))]})
    shared = overlap_areas(before, after)
    linked = (shared > 0) & (shared >= 0.2 * np.minimum(before.area_px[:, None], after.area_px[None, :]))
    assert linked.any() and len(before) > cv2.connectedComponents(labels)[0] - 1  # the pair was split
    lazy = _Overlaps(before, after, 0.2)
    for i in rng.permutation(len(before)).tolist():
        assert lazy.row(i).tolist() == linked[i].tolist()
    for j in range(len(after)):
        assert lazy.column(j).tolist() == linked[:, j].tolist()


def test_empty_frames_are_fine():
    tracker = Tracker(max_gap_frames=1)
    tracker.update(objects_of({"a": (50.0, 50.0, 8.0)}), 0)
    empty = tracker.update(objects_of({}), 1)
    assert empty.track_ids.shape == (0,) and empty.events == ()
    assert [e.kind for e in tracker.update(objects_of({}), 2).events] == [LEAVE]


def test_bad_settings_and_order_are_refused():
    for bad in ({"max_link_distance_px": 0}, {"max_gap_frames": -1}, {"area_weight": -1},
                {"min_overlap_fraction": 0}, {"min_overlap_fraction": 1.5}):
        with pytest.raises(TrackingError):
            Tracker(**bad)
    tracker = Tracker()
    tracker.update(objects_of({"a": (50.0, 50.0, 8.0)}), 3)
    with pytest.raises(TrackingError, match="increasing order"):
        tracker.update(objects_of({"a": (50.0, 50.0, 8.0)}), 3)
    with pytest.raises(TrackingError, match="frame size changed"):
        tracker.update(objects_of({"a": (50.0, 50.0, 8.0)}, size=128), 4)
    with pytest.raises(TrackingError, match="fps"):
        tracker.summaries(fps=0.0, pixel_size_um=1.0)


@pytest.mark.slow
def test_the_benchmark_compares_the_linkers_on_the_same_tracks():
    from benchmarks.tracking import measure, targets

    section = measure(objects=6, frames=6, size=192)
    methods = {row["method"]: row for row in section["results"]}
    ours = methods["ours (Tracker.update: overlaps + SciPy LAP)"]
    assert ours["frames_timed"] == 6 and ours["ms_per_frame"] > 0 and ours["id_switches"] == 0
    from benchmarks.tracking import READOUT_METHOD

    assert methods[READOUT_METHOD]["frames_timed"] == 6 and methods[READOUT_METHOD]["ms_per_frame"] > 0
    assert [t["name"].split(",")[0] for t in targets(section)] == ["read-out as run (measurements + tracking)",
                                                                   "objects with phase", "tracking"]


def test_a_piece_breaking_off_a_cell_is_no_division():
    frames = []
    for t in range(12):  # a small piece (radius 5) comes off a cell's edge at frame 4, for good
        if t < 4:
            frames.append({"cell": (82.0, 80.0, 20.0)})
        else:
            frames.append({"cell": (78.0, 80.0, 13.0), "piece": (99.0 + 2 * (t - 4), 80.0, 5.0)})
    names, events = run(Tracker(), frames)
    assert not [e for e in events if e.kind == DIVIDE]
    assert {frame["cell"] for frame in names} == {names[0]["cell"]}
    assert [e.kind for e in events if names[5]["piece"] in e.started] == [ENTER]
    with pytest.raises(TrackingError, match="max_daughter_area_ratio"):
        Tracker(max_daughter_area_ratio=0.5)



def test_on_the_generators_true_masks_every_cell_keeps_its_id_and_the_division_is_one_event():
    """Tracking alone, on the project's own generator with exact instance maps: what the read-out
    scores when segmentation is perfect (benchmarks.readout_accuracy reports the same per sequence)."""
    from app.config import SynthConfig
    from app.synthesis import make_sequence
    from app.training.tracking_metrics import mot_from_centroids

    sequence = make_sequence(SynthConfig(size=160, frames=48, seed=21, num_cells=5, num_divisions=1,
                                         drift_px_per_frame=1.0, num_particles=0))
    (division,) = sequence.divisions
    tracker = Tracker(max_link_distance_px=30.0, max_gap_frames=3)
    truth, found, events, parent_track = [], [], [], set()
    for index in range(len(sequence)):
        frame = sequence.frame(index)
        objects = ObjectMeasurer(min_area_px=20)(frame.instances.astype(np.uint8))
        result = tracker.update(objects, index)
        events += result.events
        found.append({int(t): tuple(xy) for t, xy in zip(result.track_ids, objects.centroid_xy, strict=True)})
        truth.append({o.object_id: (o.x_px, o.y_px) for o in frame.objects if o.area_px >= 20})
        if index == division.frame - 1:
            parent = next(o for o in frame.objects if o.object_id == division.parent_id)
            parent_track.add(id_of(objects, result.track_ids, parent.x_px, parent.y_px))
    score = mot_from_centroids(truth, found, 8.0)
    assert score.mota >= 0.99 and score.id_switches == 0
    divides = [e for e in events if e.kind == DIVIDE]
    assert len(divides) == 1 and divides[0].ended[0] in parent_track
    assert abs(divides[0].frame - division.frame) <= 3


def _pair_drawn_as_one_for(frames_together: int) -> list[dict[str, tuple[float, float, float]]]:
    """Two cells drift right side by side, are drawn as one object for a while (longer than a gap),
    then come apart at different heights."""
    frames = []
    for t in range(6 + frames_together + 8):
        x = 60.0 + 2.0 * t
        if 6 <= t < 6 + frames_together:
            frames.append({"pair": (x, 100.0, 16.0)})
        else:
            frames.append({"upper": (x, 88.0, 9.0), "lower": (x, 112.0, 9.0)})
    return frames


def test_a_pair_drawn_as_one_for_longer_than_a_gap_keeps_its_ids_and_makes_no_division():
    frames = _pair_drawn_as_one_for(20)
    names, events = run(Tracker(max_gap_frames=3, max_hidden_frames=60), frames)
    before, after = names[0], names[-1]
    assert {before["upper"], before["lower"]} == {after["upper"], after["lower"]}
    assert not [e for e in events if e.kind in (DIVIDE, MERGE)]
    # Without the memory the hidden cell ends at its gap and the one that comes out is a daughter.
    names, events = run(Tracker(max_gap_frames=3), frames)
    assert {names[-1]["upper"], names[-1]["lower"]} != {names[0]["upper"], names[0]["lower"]}
    assert [e for e in events if e.kind in (DIVIDE, MERGE)]


def test_a_track_hidden_past_max_hidden_frames_ends_with_a_merge():
    names, events = run(Tracker(max_gap_frames=3, max_hidden_frames=10), _pair_drawn_as_one_for(20))
    merges = [e for e in events if e.kind == MERGE]
    assert len(merges) == 1 and merges[0].frame == 6
    with pytest.raises(TrackingError, match="max_hidden_frames"):
        Tracker(max_gap_frames=3, max_hidden_frames=2)
