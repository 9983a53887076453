"""Per-object ground truth of both generators: persistent ids, area, integrated phase, focus, divisions,
and objects.csv beside the written frames."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json

import numpy as np
import pytest

from app.config import SynthConfig
from app.synthesis import make_sequence
from app.synthesis.generator import _SPLIT_FRAMES, InterferogramSequence, SynthError
from app.synthesis.writer import OBJECT_COLUMNS, write_sequence

# sha256 of every frame's image, mask and cell_phase bytes, recorded from the generators before they
# knew about objects: the ground truth is added without changing what is rendered.
RENDERED_BEFORE = {
    "classic": (dict(size=64, frames=5, num_cells=3, num_particles=2, num_dust_rings=1, drift_px_per_frame=2.0,
                     seed=3), "d44b81cd73670498cc59ad75b4123eb74a9dba011c2b2a305396c446d6ae90f2"),
    "classic_band16": (dict(size=96, frames=4, num_cells=4, num_particles=2, ignore_border_px=2, bit_depth=16,
                            seed=7), "8d05de4f47e10a23a5d8e53b82632c279ee6730b102663776599cc611bfb23aa"),
    "propagated": (dict(size=64, frames=4, generator="propagated", num_cells=4, object_radius_px=(6.0, 12.0),
                        seed=5, cluster_fraction=0.5, defocus_px=8.0),
                   "b6ccb21c55d618323c759ab0fb00969690910500a35db6b675a1c37c4660442d"),
    "randomize": (dict(size=64, frames=3, randomize=True, seed=11),
                  "de058f5451d36680a90bbcdb02575ce30c05297fdd60c93399aff7c9421e29fd"),
}

MIXED = dict(size=96, frames=3, generator="propagated", num_cells=8, object_radius_px=(8.0, 14.0),
             bead_fraction=0.3, organism_fraction=0.2, cluster_fraction=0.6, seed=4)
MAPS = {
    "classic": (dict(size=96, frames=4, num_cells=5, num_particles=3, seed=2), True),
    "classic_ignore_band": (dict(size=96, frames=4, num_cells=5, num_particles=3, ignore_border_px=2, seed=2), True),
    "propagated_defocused": ({**MIXED, "defocus_px": 8.0}, False),
    "propagated_in_focus": ({**MIXED, "defocus_px": 1.0}, True),
}
# Two divisions each, well inside the field and early enough to see the daughters part (found by trying seeds).
DIVIDING = {
    "classic": dict(size=96, frames=18, num_cells=3, num_particles=1, num_dust_rings=0, drift_px_per_frame=1.0,
                    num_divisions=2, seed=4),
    "propagated": dict(size=96, frames=18, num_cells=3, num_dust_rings=0, drift_px_per_frame=1.0, num_divisions=2,
                       generator="propagated", object_radius_px=(8.0, 12.0), seed=6),
}


def by_id(frame) -> dict:
    return {o.object_id: o for o in frame.objects}


@pytest.mark.parametrize("name", RENDERED_BEFORE)
def test_existing_sequences_render_bit_identical(name):
    settings, expected = RENDERED_BEFORE[name]
    digest = hashlib.sha256()
    for frame in make_sequence(SynthConfig(**settings)):
        for array in (frame.image, frame.mask, frame.cell_phase):
            digest.update(array.tobytes())
    assert digest.hexdigest() == expected


@pytest.mark.parametrize("name", MAPS)
def test_objects_are_measured_on_the_instance_map(name):
    """area_px, centroid and integrated phase are those of the object's pixels in ``instances``, which
    cover every pixel the mask calls a cell and nothing the mask calls background."""
    settings, in_focus = MAPS[name]
    seq = make_sequence(SynthConfig(**settings))
    kinds = set()
    for frame in seq:
        instances, mask = frame.instances, frame.mask
        assert instances.dtype == np.int32 and instances.shape == mask.shape
        assert np.all(instances[mask == 1] > 0) and np.all(mask[instances > 0] != 0)
        if not settings.get("ignore_border_px") and settings.get("generator") != "propagated":
            np.testing.assert_array_equal(instances > 0, mask == 1)
        assert [o.object_id for o in frame.objects] == sorted(set(np.unique(instances).tolist()) - {0})
        for obj in frame.objects:
            own = instances == obj.object_id
            ys, xs = np.nonzero(own)
            assert obj.area_px == np.count_nonzero(own & (mask == 1))
            np.testing.assert_allclose(obj.integrated_phase_rad_px, frame.cell_phase[own].sum(dtype=np.float64),
                                       rtol=1e-12)
            np.testing.assert_allclose((obj.x_px, obj.y_px), (xs.mean(), ys.mean()), atol=1e-9)
            assert obj.in_focus is in_focus and obj.parent_id == 0
            kinds.add(obj.kind)
    assert "cell" in kinds and kinds <= {"cell", "bead", "organism"}
    if settings.get("generator") == "propagated":
        assert len(kinds) > 1


def test_ids_persist_while_a_cell_drifts():
    """One cell, wholly in the field: the same id every frame, its centroid moving at about the drift."""
    drift = 2.0
    seq = InterferogramSequence(SynthConfig(size=128, frames=10, num_cells=1, num_particles=0, num_dust_rings=1,
                                            drift_px_per_frame=drift, seed=2))
    frames = list(seq)
    assert {tuple(o.object_id for o in f.objects) for f in frames} == {(1,)}
    centroids = np.array([(f.objects[0].x_px, f.objects[0].y_px) for f in frames])
    steps = np.hypot(*np.diff(centroids, axis=0).T)
    assert 0.5 * drift <= steps.mean() <= 1.5 * drift and steps.max() < 2.0 * drift


def test_ids_are_those_of_the_nearest_object_in_the_next_frame_and_survive_a_longer_sequence():
    cfg = SynthConfig(size=128, frames=6, num_cells=6, num_particles=2, drift_px_per_frame=1.5, seed=9)
    frames = list(InterferogramSequence(cfg))
    for before, after in zip(frames, frames[1:], strict=False):
        here = np.array([(o.x_px, o.y_px) for o in after.objects])
        for obj in before.objects:
            if obj.area_px > 50 and obj.object_id in by_id(after):
                nearest = np.argmin(np.hypot(*(here - (obj.x_px, obj.y_px)).T))
                assert after.objects[nearest].object_id == obj.object_id
    longer = InterferogramSequence(dataclasses.replace(cfg, frames=20))
    for index in (0, 5):
        assert longer.frame(index).objects == frames[index].objects


@pytest.mark.parametrize("name", DIVIDING)
def test_a_division_gives_two_new_daughters_that_record_their_parent(name):
    seq = make_sequence(SynthConfig(**DIVIDING[name]))
    frames = [by_id(f) for f in seq]
    assert len(seq.divisions) == 2 and [d.frame for d in seq.divisions] == sorted(d.frame for d in seq.divisions)
    assert json.loads(json.dumps(seq.meta()))["divisions"] == [
        {"frame": d.frame, "parent_id": d.parent_id, "daughter_ids": list(d.daughter_ids)} for d in seq.divisions]
    daughters = {}
    for division in seq.divisions:
        first, second = division.daughter_ids
        seen_before = set().union(*frames[:division.frame])
        assert division.parent_id in frames[division.frame - 1]
        assert not any(division.parent_id in objects for objects in frames[division.frame:])
        assert first != second and not {first, second} & seen_before  # new ids, none reused
        at_split = frames[division.frame]
        assert {at_split[i].parent_id for i in (first, second)} == {division.parent_id}
        assert {at_split[i].kind for i in (first, second)} == {"cell"}
        # Together they carry about the parent's phase, and they move apart.
        parent_phase = frames[division.frame - 1][division.parent_id].integrated_phase_rad_px
        together = sum(at_split[i].integrated_phase_rad_px for i in (first, second))
        assert together == pytest.approx(parent_phase, rel=0.15)
        later = frames[division.frame + _SPLIT_FRAMES]

        def gap(objects, a=first, b=second):
            return np.hypot(objects[a].x_px - objects[b].x_px, objects[a].y_px - objects[b].y_px)

        assert gap(later) > gap(at_split)
        daughters.update({first: division.parent_id, second: division.parent_id})
    for objects in frames:
        assert {i: o.parent_id for i, o in objects.items() if o.parent_id} == {
            i: parent for i, parent in daughters.items() if i in objects}


def test_divisions_are_opt_in_and_at_most_one_per_cell():
    cfg = SynthConfig(**DIVIDING["classic"])
    assert InterferogramSequence(dataclasses.replace(cfg, num_divisions=0)).divisions == ()
    many = InterferogramSequence(dataclasses.replace(cfg, num_divisions=50))
    parents = [d.parent_id for d in many.divisions]
    assert 2 <= len(parents) == len(set(parents)) < 50
    with pytest.raises(SynthError, match="num_divisions"):
        InterferogramSequence(dataclasses.replace(cfg, num_divisions=-1))


def test_write_sequence_writes_objects_csv_and_the_divisions(tmp_path):
    seq = InterferogramSequence(SynthConfig(**{**DIVIDING["classic"], "frames": 6}))
    write_sequence(seq, tmp_path)
    with (tmp_path / "objects.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert tuple(rows[0]) == OBJECT_COLUMNS == (
        "frame", "object_id", "parent_id", "class", "x_px", "y_px", "area_px", "integrated_phase_rad_px", "in_focus")
    expected = [[str(f.index), str(o.object_id), str(o.parent_id), o.kind, repr(o.x_px), repr(o.y_px), str(o.area_px),
                 repr(o.integrated_phase_rad_px), "1"] for f in seq for o in f.objects]
    assert rows[1:] == expected and any(row[2] != "0" for row in expected)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["divisions"] == [dataclasses.asdict(d) | {"daughter_ids": list(d.daughter_ids)} for d in seq.divisions]
    assert not list(tmp_path.glob("*.partial*")) and len(list((tmp_path / "masks").glob("*.png"))) == 6
