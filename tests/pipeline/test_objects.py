"""Objects per frame: shape against scikit-image's regionprops, dry mass against a hand computation."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from app.config import ConfigError, load_config
from app.config import OpticsConfig as Optics
from app.errors import AppError
from app.pipeline.objects import (
    IGNORE_VALUE,
    PHASE_FIELDS,
    FrameObjects,
    ObjectMeasurer,
    ObjectsError,
    alone_background_corrected_sum,
    background_corrected_sum,
    prominent_peaks,
)

measure = pytest.importorskip("skimage.measure")


def random_label_map(seed: int, size: int = 256, count: int = 25, classes: int = 2) -> np.ndarray:
    """Ellipses of random size, angle and class, some touching or overlapping, some cut by the border,
    a ring (a component with a hole) holding a dot, and a few single pixels."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((size, size), np.uint8)
    for _ in range(count):
        centre = (int(rng.integers(-5, size + 5)), int(rng.integers(-5, size + 5)))
        axes = (int(rng.integers(2, 20)), int(rng.integers(2, 20)))
        cv2.ellipse(labels, centre, axes, float(rng.uniform(0, 180)), 0, 360, int(rng.integers(1, classes + 1)), -1)
    cv2.circle(labels, (size // 2, size // 2), 20, 1, 4)
    labels[size // 2, size // 2] = 2
    labels[rng.integers(0, size, 5), rng.integers(0, size, 5)] = 1
    return labels


def skimage_objects(labels: np.ndarray, min_area: int) -> np.ndarray:
    """Rows (class, area, x, y, eccentricity, equivalent diameter) from regionprops, sorted by class, y, x."""
    rows = []
    for class_id in range(1, 255):
        for region in measure.regionprops(measure.label(labels == class_id, connectivity=2)):
            if region.area >= min_area:
                rows.append((class_id, region.area, region.centroid[1], region.centroid[0], region.eccentricity,
                             region.equivalent_diameter_area))
    return np.array(sorted(rows, key=lambda r: (r[0], r[3], r[2])))


def our_objects(objects: FrameObjects) -> np.ndarray:
    rows = zip(objects.class_id, objects.area_px, objects.centroid_xy[:, 0], objects.centroid_xy[:, 1],
               objects.eccentricity, objects.equivalent_diameter_px, strict=True)
    return np.array(sorted(rows, key=lambda r: (r[0], r[3], r[2])), np.float64)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("min_area", [1, 30])
def test_shape_matches_regionprops(seed: int, min_area: int):
    labels = random_label_map(seed)
    objects = ObjectMeasurer(min_area_px=min_area)(labels)
    expected = skimage_objects(labels, min_area)
    assert len(objects) == len(expected) > 5
    np.testing.assert_allclose(our_objects(objects), expected, rtol=1e-9, atol=1e-9)


def test_boxes_and_component_image_describe_each_object():
    labels = random_label_map(7)
    objects = ObjectMeasurer(min_area_px=1)(labels)
    for k in range(len(objects)):
        mask = objects.mask(k)
        rows, cols = np.nonzero(mask)
        x, y, w, h = objects.bbox[k]
        assert (x, y, w, h) == (cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1)
        assert mask.sum() == objects.area_px[k]
        assert np.all(labels[mask] == objects.class_id[k])
        box, inside = objects.box_mask(k)
        assert inside.sum() == objects.area_px[k] and mask[box].sum() == objects.area_px[k]
    assert objects.components.dtype == np.int32 and objects.components.max() <= objects.component_count
    assert len(set(objects.component_id.tolist())) == len(objects)


def test_units_follow_the_pixel_size():
    labels = np.zeros((64, 64), np.uint8)
    labels[10:20, 30:50] = 1  # 10 rows × 20 columns
    objects = ObjectMeasurer(Optics(pixel_size_um=0.5))(labels)
    assert objects.area_px.tolist() == [200]
    np.testing.assert_allclose(objects.area_um2, [50.0])
    np.testing.assert_allclose(objects.centroid_xy, [[39.5, 14.5]])
    np.testing.assert_allclose(objects.equivalent_diameter_um, [0.5 * math.sqrt(800 / math.pi)])
    assert objects.bbox.tolist() == [[30, 10, 20, 10]]


def test_dry_mass_of_a_disc_of_known_phase():
    optics = Optics(pixel_size_um=0.25, wavelength_nm=532.0, refractive_index_difference=0.04,
                    refraction_increment_ml_per_g=0.2)
    labels = np.zeros((128, 128), np.uint8)
    cv2.circle(labels, (60, 70), 25, 1, -1)
    phase = np.where(labels == 1, 1.5, 0.0).astype(np.float32)
    objects = ObjectMeasurer(optics)(labels, phase)
    area = int((labels == 1).sum())
    opd_um = 1.5 * 0.532 / (2 * math.pi)
    dry_mass_pg = area * opd_um * 0.25**2 / 0.2  # Σ OPD · pixel area / α: µm · µm² / (µm³/pg)
    np.testing.assert_allclose(objects.mean_phase_rad, [1.5], rtol=1e-6)
    np.testing.assert_allclose(objects.integrated_phase_rad_px, [1.5 * area], rtol=1e-6)
    np.testing.assert_allclose(objects.mean_opd_um, [opd_um], rtol=1e-6)
    np.testing.assert_allclose(objects.mean_thickness_um, [opd_um / 0.04], rtol=1e-6)
    np.testing.assert_allclose(objects.dry_mass_pg, [dry_mass_pg], rtol=1e-6)


def test_phase_sums_stay_inside_each_object():
    rng = np.random.default_rng(3)
    labels = random_label_map(3)
    phase = rng.normal(0.0, 1.0, labels.shape)
    objects = ObjectMeasurer(min_area_px=1)(labels, phase)
    expected = [phase[objects.mask(k)].sum() for k in range(len(objects))]
    np.testing.assert_allclose(objects.integrated_phase_rad_px, expected, rtol=1e-9, atol=1e-9)


def test_background_and_ignore_label_are_not_objects():
    labels = np.zeros((32, 32), np.uint8)
    labels[:, :4] = 255
    assert len(ObjectMeasurer()(labels)) == 0
    labels[10:20, 10:20] = 3
    objects = ObjectMeasurer(min_area_px=1)(labels)
    assert objects.class_id.tolist() == [3]
    assert len(ObjectMeasurer(min_area_px=1, classes=(1, 2))(labels)) == 0


def test_empty_frame_gives_empty_arrays_and_records():
    objects = ObjectMeasurer()(np.zeros((16, 16), np.uint8), np.zeros((16, 16), np.float32))
    assert len(objects) == 0 and objects.records() == []
    assert objects.centroid_xy.shape == (0, 2) and objects.bbox.shape == (0, 4)
    assert objects.dry_mass_pg is not None and objects.dry_mass_pg.shape == (0,)


def test_records_are_plain_values_with_phase_columns_only_when_measured():
    labels = np.zeros((32, 32), np.uint8)
    labels[2:8, 2:8] = 1
    plain = ObjectMeasurer()(labels).records()
    assert "dry_mass_pg" not in plain[0] and plain[0]["area_px"] == 36 and type(plain[0]["area_px"]) is int
    with_phase = ObjectMeasurer()(labels, np.ones((32, 32), np.float32)).records()
    assert with_phase[0]["mean_phase_rad"] == pytest.approx(1.0) and type(with_phase[0]["dry_mass_pg"]) is float


@pytest.mark.parametrize("field", ["pixel_size_um", "wavelength_nm", "refractive_index_difference",
                                   "refraction_increment_ml_per_g"])
@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf")])
def test_optics_rejects_non_positive_values_in_one_line(field: str, value: float):
    with pytest.raises(ConfigError, match=f"optics.{field} must be a number > 0") as caught:
        Optics(**{field: value})
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, AppError)
    assert "\n" not in str(caught.value)


def test_bad_inputs_are_refused():
    measurer = ObjectMeasurer()
    with pytest.raises(ObjectsError, match="uint8 class map"):
        measurer(np.zeros((8, 8), np.int32))
    with pytest.raises(ObjectsError, match="uint8 class map"):
        measurer(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ObjectsError, match="must match the label map"):
        measurer(np.zeros((8, 8), np.uint8), np.zeros((8, 9), np.float32))
    with pytest.raises(ObjectsError, match="min_area_px"):
        ObjectMeasurer(min_area_px=0)
    with pytest.raises(ObjectsError, match="object classes"):
        ObjectMeasurer(classes=(0, 1))


def test_a_phase_dome_above_pi_is_unwrapped_inside_the_object():
    yy, xx = np.mgrid[:128, :128]
    radius = np.hypot(xx - 64, yy - 60)
    true = np.where(radius < 30, 5.0 * np.sqrt(np.clip(1 - (radius / 30) ** 2, 0, 1)), 0).astype(np.float32)
    wrapped = np.angle(np.exp(1j * true)).astype(np.float32)
    labels = (radius < 30).astype(np.uint8)
    assert ObjectMeasurer()(labels, wrapped).integrated_phase_rad_px[0] < 0.2 * true.sum()  # wrapping hides mass
    unwrapped = ObjectMeasurer(unwrap=True)(labels, wrapped).integrated_phase_rad_px[0]
    np.testing.assert_allclose(unwrapped, true[labels > 0].sum(), rtol=1e-4)
    small = np.clip(true, 0, 2.0)  # below the wrap risk the phase is used as it is
    np.testing.assert_allclose(ObjectMeasurer(unwrap=True)(labels, small).integrated_phase_rad_px[0],
                               small[labels > 0].sum(), rtol=1e-6)


def test_touching_discs_are_split_into_two_objects_and_a_convex_one_is_left_whole():
    labels = np.zeros((120, 160), np.uint8)
    cv2.circle(labels, (50, 60), 22, 1, cv2.FILLED)
    cv2.circle(labels, (88, 60), 22, 1, cv2.FILLED)  # overlaps the first: one 8-connected component
    cv2.circle(labels, (140, 20), 12, 1, cv2.FILLED)
    assert len(ObjectMeasurer()(labels)) == 2
    objects = ObjectMeasurer(split=True)(labels)
    assert len(objects) == 3
    order = np.argsort(objects.centroid_xy[:, 0])
    np.testing.assert_allclose(objects.centroid_xy[order][:, 0], [50, 88, 140], atol=1.5)
    assert objects.area_px[order][:2].sum() == int(np.count_nonzero(labels[:, :120]))
    assert len(set(objects.component_id.tolist())) == 3
    for k in range(3):  # the component image agrees with each object's area
        assert np.count_nonzero(objects.mask(k)) == objects.area_px[k]


def dome(shape: tuple[int, int], centre: tuple[float, float], radius: float, peak: float) -> np.ndarray:
    """A hemispherical phase dome (rad), 0 outside the disc."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    r2 = ((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / radius**2
    return peak * np.sqrt(np.clip(1.0 - r2, 0.0, None))


def test_a_tilted_background_and_offset_do_not_change_the_phase_sum():
    labels = np.zeros((96, 96), np.uint8)
    cv2.circle(labels, (48, 48), 15, 1, -1)
    cell = dome(labels.shape, (48, 48), 15.5, 2.0)
    yy, xx = np.mgrid[0:96, 0:96]
    background = 0.4 + 0.01 * xx - 0.015 * yy  # what a reference fit leaves: offset and tilt
    phase = (cell + background).astype(np.float32)
    truth = float(cell.sum())
    plain = ObjectMeasurer(classes=[1])(labels, phase)
    ringed = ObjectMeasurer(classes=[1], margin_px=3, ring_px=6)(labels, phase)
    assert abs(float(plain.integrated_phase_rad_px[0]) - truth) > 0.05 * truth  # the offset costs mass
    assert float(ringed.integrated_phase_rad_px[0]) == pytest.approx(truth, rel=1e-3)
    assert float(ringed.mean_phase_rad[0]) == pytest.approx(truth / float(ringed.area_px[0]), rel=1e-3)


def test_the_margin_collects_phase_blurred_past_the_drawn_edge():
    labels = np.zeros((96, 96), np.uint8)
    cv2.circle(labels, (48, 48), 12, 1, -1)  # the segmentation draws the cell too small
    phase = cv2.GaussianBlur(dome(labels.shape, (48, 48), 15.0, 2.0).astype(np.float32), (0, 0), 1.5)
    truth = float(phase.sum())
    tight = ObjectMeasurer(classes=[1], margin_px=0, ring_px=0)(labels, phase)
    grown = ObjectMeasurer(classes=[1], margin_px=5, ring_px=6)(labels, phase)
    assert float(tight.integrated_phase_rad_px[0]) < 0.9 * truth
    assert float(grown.integrated_phase_rad_px[0]) == pytest.approx(truth, rel=0.02)


def test_a_neighbours_pixels_are_neither_summed_nor_taken_for_background():
    labels = np.zeros((96, 128), np.uint8)
    cv2.circle(labels, (40, 48), 14, 1, -1)
    cv2.circle(labels, (72, 48), 14, 1, -1)  # 4 px apart: each is in the other's margin and ring
    left, right = dome(labels.shape, (40, 48), 14.5, 1.0), dome(labels.shape, (72, 48), 14.5, 3.0)
    objects = ObjectMeasurer(classes=[1], margin_px=3, ring_px=6)(labels, (left + right).astype(np.float32))
    assert len(objects) == 2
    sums = sorted(objects.integrated_phase_rad_px.tolist())
    assert sums == pytest.approx(sorted([float(left.sum()), float(right.sum())]), rel=0.01)


def reference_phase_sums(labels: np.ndarray, phase: np.ndarray, objects: FrameObjects, margin_px: int,
                         ring_px: int) -> np.ndarray:
    """The documented phase sum the slow way, object by object, in its box grown by margin + ring: the
    object grown by a (2·margin+1)² square less other objects' pixels, against the least-squares plane
    of the ring (the box's pixels with no labelled pixel of the box within ``margin_px``)."""
    from scipy import ndimage

    square = np.ones((2 * margin_px + 1,) * 2, bool)
    pad = margin_px + ring_px
    sums = []
    for k in range(len(objects)):
        x, y, w, h = objects.bbox[k].tolist()
        box = (slice(max(y - pad, 0), y + h + pad), slice(max(x - pad, 0), x + w + pad))
        inside, occupied, values = objects.mask(k)[box], labels[box] != 0, phase[box].astype(np.float64)
        region = ndimage.binary_dilation(inside, square) & (inside | ~occupied)
        ring = ~ndimage.binary_dilation(occupied, square) if ring_px else np.zeros_like(inside)
        if ring.sum() < 12:
            sums.append(float(values[region].sum()))
            continue
        ring_y, ring_x = np.nonzero(ring)
        a, b, c = np.linalg.lstsq(np.column_stack([np.ones(len(ring_x)), ring_x, ring_y]), values[ring], rcond=None)[0]
        region_y, region_x = np.nonzero(region)
        sums.append(float((values[region] - (a + b * region_x + c * region_y)).sum()))
    return np.array(sums)


def crowded_scene(shared: bool) -> tuple[np.ndarray, np.ndarray]:
    """Label map and phase (domes on a tilted, offset, noisy background): discs alone in their boxes,
    a touching pair, one cut by the border; ``shared`` adds an object of class 2 and ignored pixels
    beside the discs of class 1."""
    labels = np.zeros((160, 200), np.uint8)
    phase = np.zeros(labels.shape)
    for x, y, r in ((30, 30, 12), (150, 40, 10), (60, 110, 12), (86, 110, 12), (196, 140, 9)):
        cv2.circle(labels, (x, y), r, 1, -1)
        phase += dome(labels.shape, (x, y), r + 0.5, 1.5)
    if shared:
        cv2.circle(labels, (126, 30), 6, 2, -1)
        phase += dome(labels.shape, (126, 30), 6.5, 0.8)
        labels[140:143, 0:70] = IGNORE_VALUE
    yy, xx = np.mgrid[0:160, 0:200]
    phase += 0.3 + 0.004 * xx - 0.006 * yy + np.random.default_rng(1).normal(0.0, 0.05, labels.shape)
    return labels, phase.astype(np.float32)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("margin_px, ring_px", [(4, 6), (3, 0), (0, 5)])
def test_phase_sums_with_margin_and_ring_match_the_slow_reference(shared: bool, margin_px: int, ring_px: int):
    labels, phase = crowded_scene(shared)
    objects = ObjectMeasurer(min_area_px=10, margin_px=margin_px, ring_px=ring_px)(labels, phase)
    assert len(objects) == (6 if shared else 5)
    np.testing.assert_allclose(objects.integrated_phase_rad_px,
                               reference_phase_sums(labels, phase, objects, margin_px, ring_px), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("uncovered", [200, 11])
def test_the_ring_of_an_object_alone_in_its_box_is_the_box_less_its_grown_mask(uncovered: int):
    rng = np.random.default_rng(uncovered)
    grown = np.ones((30, 40), np.uint8)
    grown.ravel()[rng.choice(grown.size, uncovered, replace=False)] = 0  # fewer than 12 left: no plane
    phase = (rng.normal(0.2, 0.1, grown.shape) + 0.01 * np.arange(40)).astype(np.float32)
    np.testing.assert_allclose(alone_background_corrected_sum(phase, grown),
                               background_corrected_sum(phase, grown, 1 - grown), rtol=1e-9)


def test_a_negative_phase_sign_measures_as_the_negated_phase():
    labels = random_label_map(5)
    yy, xx = np.mgrid[0:256, 0:256]
    phase = np.angle(np.exp(-1j * (4.0 * np.sin(xx / 20.0) ** 2 + 0.01 * yy))).astype(np.float32)  # wraps in places
    measurer = ObjectMeasurer(min_area_px=5, unwrap=True, split=True, margin_px=3, ring_px=4)
    flipped, negated = measurer(labels, phase, phase_sign=-1), measurer(labels, np.negative(phase))
    for name in ("component_id", "area_px", "centroid_xy", "bbox", *PHASE_FIELDS):
        np.testing.assert_array_equal(getattr(flipped, name), getattr(negated, name), err_msg=name)
    with pytest.raises(ObjectsError, match="phase_sign must be 1 or -1"):
        measurer(labels, phase, phase_sign=0)


def test_margin_and_ring_must_not_be_negative():
    with pytest.raises(ObjectsError, match="margin_px and ring_px"):
        ObjectMeasurer(margin_px=-1)
    with pytest.raises(ConfigError, match="objects.background_ring_px"):
        load_config(None, ["objects.background_ring_px=-2"])


def test_prominent_peaks_ignore_a_bump_on_one_cell_and_keep_two_cells():
    shape = (64, 96)
    one = dome(shape, (48, 32), 20, 2.0) + dome(shape, (52, 30), 4, 0.2)  # a nucleus-like bump
    two = dome(shape, (30, 32), 16, 2.0) + dome(shape, (64, 32), 16, 1.6)
    for values, expected in ((one, 1), (two, 2)):  # blurred as by the optics (sharp dome edges make ridges)
        peaks = prominent_peaks(cv2.GaussianBlur(values.astype(np.float32), (0, 0), 2.0), 0.3)
        assert cv2.connectedComponents(peaks, connectivity=8)[0] - 1 == expected


def test_overlapping_cells_are_split_along_their_phase_valley():
    shape = (80, 120)
    left, right = dome(shape, (44, 40), 20, 2.5), dome(shape, (78, 40), 18, 2.0)
    labels = ((left + right) > 0).astype(np.uint8)  # one blob with a shallow waist
    phase = (left + right).astype(np.float32)
    assert len(ObjectMeasurer(classes=[1])(labels, phase)) == 1
    objects = ObjectMeasurer(classes=[1], split=True)(labels, phase)
    assert len(objects) == 2
    left_first = np.argsort(objects.centroid_xy[:, 0])
    assert objects.centroid_xy[left_first, 0] == pytest.approx([44, 78], abs=2.5)
    own = [(left > right) & (labels > 0), (right >= left) & (labels > 0)]
    for k, truth in zip(left_first, own, strict=True):
        assert np.count_nonzero(objects.mask(int(k)) & truth) >= 0.85 * np.count_nonzero(truth)


def test_contact_seams_split_touching_objects_that_shape_alone_would_not() -> None:
    """Two overlapping discs make one nearly convex component (no waist to split at); a model's seam
    between them gives two objects, each near its own disc's centre and area, with no pixel lost."""
    labels = np.zeros((64, 96), np.uint8)
    cv2.circle(labels, (36, 32), 14, 1, -1)
    cv2.circle(labels, (56, 32), 14, 1, -1)
    cv2.circle(labels, (85, 8), 4, 1, -1)  # alone: untouched by the seams
    seams = np.zeros(labels.shape, bool)
    seams[18:47, 44:49] = True
    seams &= labels == 1
    measurer = ObjectMeasurer(min_area_px=16, split=True)
    assert len(measurer(labels)) == 2  # shape alone: the pair stays one object
    found = measurer(labels, contacts=seams)
    assert len(found) == 3
    pair = np.flatnonzero(found.area_px > 200)
    xs = sorted(found.centroid_xy[pair, 0])
    assert xs[0] == pytest.approx(36, abs=3) and xs[1] == pytest.approx(56, abs=3)
    assert int(found.area_px.sum()) == int((labels == 1).sum())
    assert len(measurer(labels, contacts=np.zeros(labels.shape, bool))) == 2  # no seam: as before
    blob = np.zeros(labels.shape, bool)  # what a model often draws: a blob in the overlap, not a cut
    blob[27:38, 43:50] = True
    parts = measurer(labels, contacts=blob)
    assert len(parts) == 3 and sorted(parts.centroid_xy[parts.area_px > 200, 0]) == [
        pytest.approx(36, abs=3), pytest.approx(56, abs=3)]
    single = np.zeros(labels.shape, np.uint8)
    cv2.ellipse(single, (48, 32), (30, 8), 0, 0, 360, 1, -1)  # one long object with a seam at its end
    end = np.zeros(labels.shape, bool)
    end[28:37, 74:79] = True
    assert len(measurer(single, contacts=end & (single == 1))) == 1
    with pytest.raises(ObjectsError, match="contact seams"):
        measurer(labels, contacts=seams[:10])
