"""Objects per frame from a label map: connected components per class, their shape, and with a phase
image their optical path difference, thickness and dry mass.

An object is an 8-connected component of one non-background class of the label map (H×W uint8 class
ids, 0 = background) with at least ``min_area_px`` pixels. Shape follows scikit-image's
``regionprops`` (tested against it): area is the pixel count, the centroid the mean pixel position,
the equivalent diameter that of the disc of the same area, the eccentricity that of the ellipse with
the same second central moments.

Quantitative phase (Barer 1952; Popescu et al. 2008): a phase image φ (rad, background ≈ 0) gives the
optical path difference OPD = φ·λ/2π (µm), the mean thickness OPD/Δn (µm) for a refractive index
difference Δn between cell and medium, and the dry mass m = Σ OPD · A_px / α (pg), with A_px the
pixel area (µm²) and α the specific refraction increment (mL/g = µm³/pg; 0.19 for most proteins).
The phase sign depends on the microscope (see :mod:`app.pipeline.hologram`): it is used as given,
times the ``phase_sign`` the caller passes.

Background per object (as in DryMass and the QPI literature): the reference fit leaves aberrations,
dust rings and a phase offset of its own that a sum over hundreds of pixels turns into a large mass
error. So each object's phase is measured against a plane fitted to a ring of background around it
(pixels at least ``margin_px`` from every object, up to ``margin_px + ring_px`` from this one), and its
phase is summed over the object grown by ``margin_px`` (the optics' blur carries phase past the edge
that the segmentation draws). Measured against the generator's truth on its own instance masks
(classic generator): phase sum / true 0.89 without the ring, 1.00 with it.

Speed (1024², 50 objects, one core: see ``benchmarks/tracking.py``): OpenCV's ``connectedComponents``
labels the pixels; the bounding boxes come from the components' outer contours (``findContours``,
several times cheaper than ``connectedComponentsWithStats`` there); everything else is computed inside
each object's box (``cv2.moments``, ``cv2.mean``), so no full-image pass is made per object. There the
number of OpenCV calls is what costs (a few µs each, whatever the box), so each is made to count: a
component's mask is made once for its unwrap check, shape and phase sum; an object alone in its
padded box (the common case) takes the box less its grown mask as its ring, from closed-form box sums
(:func:`alone_background_corrected_sum`); and the sign of the phase is applied box by box.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import cv2
import numpy as np

from app.config import OpticsConfig as Optics
from app.errors import AppError

IGNORE_VALUE = 255
"""Label value that is never an object: the ``ignore`` label of training masks."""


class ObjectsError(AppError, ValueError):
    """A bad optics setting, or a label map / phase image objects cannot be measured in."""


@dataclass(frozen=True, eq=False)
class FrameObjects:
    """The objects of one frame, as arrays of length n (one entry per object, in raster order of
    their first pixel within each class, classes ascending).

    ``components``: H×W int32, the value ``component_id[k]`` on the pixels of object k (other values
    are background or components dropped as too small); ``component_count``: the largest value it may
    hold. ``bbox``: n×4 int32 ``x, y, width, height`` (px); ``centroid_xy``: n×2 float64 (x, y) px.
    The phase read-outs are None when no phase image was given.
    """

    components: np.ndarray
    component_count: int
    component_id: np.ndarray
    class_id: np.ndarray
    area_px: np.ndarray
    area_um2: np.ndarray
    centroid_xy: np.ndarray
    bbox: np.ndarray
    equivalent_diameter_px: np.ndarray
    equivalent_diameter_um: np.ndarray
    eccentricity: np.ndarray
    mean_phase_rad: np.ndarray | None = None
    integrated_phase_rad_px: np.ndarray | None = None
    mean_opd_um: np.ndarray | None = None
    mean_thickness_um: np.ndarray | None = None
    dry_mass_pg: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.component_id)

    @property
    def shape(self) -> tuple[int, int]:
        return self.components.shape[:2]

    @property
    def phase_measured(self) -> bool:
        return self.dry_mass_pg is not None

    def box_mask(self, index: int) -> tuple[tuple[slice, slice], np.ndarray]:
        """Object ``index`` inside its bounding box: the (rows, columns) slices and an h×w bool mask."""
        x, y, w, h = self.bbox[index].tolist()
        box = (slice(y, y + h), slice(x, x + w))
        return box, self.components[box] == self.component_id[index]

    def mask(self, index: int) -> np.ndarray:
        """H×W bool mask of object ``index``."""
        return self.components == self.component_id[index]

    def records(self) -> list[dict[str, Any]]:
        """One dict of plain Python values per object (the columns of a table): ``object``, ``class_id``,
        ``area_px``, ``area_um2``, ``centroid_x_px``, ``centroid_y_px``, ``equivalent_diameter_px``,
        ``equivalent_diameter_um``, ``eccentricity``, ``bbox_x``, ``bbox_y``, ``bbox_width``,
        ``bbox_height``, and with phase ``mean_phase_rad``, ``integrated_phase_rad_px``,
        ``mean_opd_um``, ``mean_thickness_um``, ``dry_mass_pg``."""
        columns: dict[str, list[Any]] = {
            "class_id": self.class_id.tolist(),
            "area_px": self.area_px.tolist(),
            "area_um2": self.area_um2.tolist(),
            "centroid_x_px": self.centroid_xy[:, 0].tolist(),
            "centroid_y_px": self.centroid_xy[:, 1].tolist(),
            "equivalent_diameter_px": self.equivalent_diameter_px.tolist(),
            "equivalent_diameter_um": self.equivalent_diameter_um.tolist(),
            "eccentricity": self.eccentricity.tolist(),
            "bbox_x": self.bbox[:, 0].tolist(),
            "bbox_y": self.bbox[:, 1].tolist(),
            "bbox_width": self.bbox[:, 2].tolist(),
            "bbox_height": self.bbox[:, 3].tolist(),
        }
        if self.phase_measured:
            for name in PHASE_FIELDS:
                columns[name] = getattr(self, name).tolist()
        return [{"object": k, **{name: values[k] for name, values in columns.items()}} for k in range(len(self))]


PHASE_FIELDS = ("mean_phase_rad", "integrated_phase_rad_px", "mean_opd_um", "mean_thickness_um", "dry_mass_pg")


def eccentricity_from_moments(mu20: np.ndarray, mu02: np.ndarray, mu11: np.ndarray, area: np.ndarray) -> np.ndarray:
    """Eccentricity of the ellipse with the same second central moments (scikit-image's definition):
    √(1 − λ₂/λ₁) of the covariance eigenvalues λ₁ ≥ λ₂ ≥ 0, and 0 where λ₁ = 0 (a single pixel)."""
    a, c, b = mu20 / area, mu02 / area, mu11 / area
    half_trace = 0.5 * (a + c)
    spread = np.sqrt((0.5 * (a - c)) ** 2 + b**2)
    major = np.maximum(half_trace + spread, 0.0)
    minor = np.clip(half_trace - spread, 0.0, None)
    ratio = np.divide(minor, major, out=np.ones_like(major), where=major > 0)
    return np.sqrt(np.clip(1.0 - ratio, 0.0, 1.0))


WRAP_RISK_RAD = 2.5
"""An object whose wrapped phase reaches this magnitude may be wrapped and is unwrapped (see
:func:`unwrap_in_box`); below it the wrapped phase is the phase."""


def unwrap_in_box(box: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """The wrapped phase (rad) of one object's bounding box (h×w float; ``inside``: h×w 0/1 uint8 or
    bool), unwrapped when it comes near ±π inside the object: the wrapped differences between
    neighbours are summed along rows and along columns from the box's edge (where an object's phase is
    small) and the two integrals averaged. A cell's phase is smooth, so neighbouring pixels differ by
    far less than π and the sum is the true phase."""
    low, high = cv2.minMaxLoc(box, inside.view(np.uint8))[:2]  # one call, no copy of the object's pixels
    if max(-low, high) < WRAP_RISK_RAD:
        return box
    box = box.astype(np.float32, copy=False)
    two_pi = np.float32(2.0 * math.pi)
    along_x, along_y = box.copy(), box.copy()  # first column / row: the edge value itself
    step = box[:, 1:] - box[:, :-1]
    along_x[:, 1:] = step - two_pi * np.rint(step / two_pi)  # the wrapped difference, in (-π, π]
    step = box[1:] - box[:-1]
    along_y[1:] = step - two_pi * np.rint(step / two_pi)
    unwrapped = np.cumsum(along_x, axis=1)
    unwrapped += np.cumsum(along_y, axis=0)
    unwrapped *= np.float32(0.5)
    return unwrapped


SPLIT_SOLIDITY = 0.9
"""Without phase, a component whose area is below this fraction of its convex hull's is checked for
touching objects (two discs that touch make a waist)."""
SPLIT_SOLIDITY_WITH_PHASE = 0.95
"""With phase the check is cheaper to trust, so only components this close to convex are left whole
unchecked: overlapping cells make a shallow waist but keep a phase dome each."""
PEAK_PROMINENCE_RAD = 0.25
PEAK_PROMINENCE_FRACTION = 0.15
"""A phase peak counts as a cell of its own when it rises this far above the saddle to any higher
peak: at least ``PEAK_PROMINENCE_RAD`` and this fraction of the component's highest phase (a nucleus
or the texture inside one cell does not)."""
_SEED_FRACTION = 0.6  # seeds: where the distance to the border exceeds this fraction of its maximum
_PEAK_SMOOTH_SIGMA_PX = 1.5
_CROSS = cv2.getStructuringElement(cv2.MORPH_RECT, (3, 3))


def _nearest_cores(inside: np.ndarray) -> tuple[np.ndarray | None, int]:
    """Owner map (core number 1..n per pixel) of a component's box by its distance-transform cores,
    and n; (None, 1) for a single core."""
    distance = cv2.distanceTransform(cv2.copyMakeBorder(inside, 1, 1, 1, 1, cv2.BORDER_CONSTANT, 0),
                                     cv2.DIST_L2, 3)[1:-1, 1:-1]
    seeds = cv2.compare(distance, _SEED_FRACTION * float(distance.max()), cv2.CMP_GT)
    seed_count, markers = cv2.connectedComponents(seeds, connectivity=8, ltype=cv2.CV_32S)
    if seed_count <= 2:  # background plus one core: one object
        return None, 1
    # Each pixel goes to the nearest core: the cores grown back out to the component's border.
    nearest = np.stack([cv2.distanceTransform(cv2.compare(markers, core, cv2.CMP_NE), cv2.DIST_L2, 3)
                        for core in range(1, seed_count)])
    return np.argmin(nearest, axis=0) + 1, seed_count - 1


def prominent_peaks(values: np.ndarray, prominence: float) -> np.ndarray:
    """The h-maxima of ``values`` (h×w float32, ≥ 0): a uint8 mask of the tops of the peaks that rise
    at least ``prominence`` above the saddle to any higher peak (morphological reconstruction by
    dilation of ``values − prominence`` under ``values``, iterated to convergence)."""
    reconstructed = np.maximum(values - np.float32(prominence), 0.0)
    for _ in range(values.size):
        grown = np.minimum(cv2.dilate(reconstructed, _CROSS), values)
        if np.array_equal(grown, reconstructed):
            break
        reconstructed = grown
    return ((values - reconstructed) >= np.float32(0.999 * prominence)).view(np.uint8)


def _phase_basins(inside: np.ndarray, phase: np.ndarray) -> tuple[np.ndarray | None, int]:
    """Owner map (1..n) of a component's box by the watershed of its phase from its prominent peaks,
    and n; (None, 1) for a single peak. ``phase``: the box's phase (cells positive, unwrapped)."""
    smooth = cv2.GaussianBlur(phase.astype(np.float32, copy=False), (0, 0), _PEAK_SMOOTH_SIGMA_PX)
    smooth[inside == 0] = 0.0
    np.maximum(smooth, 0.0, out=smooth)
    top = float(smooth.max())
    if top <= 0.0:
        return None, 1
    # A cheap first look: one local maximum (within 2 px) cannot be two cells.
    local = cv2.compare(smooth, cv2.dilate(smooth, None, iterations=2), cv2.CMP_GE) & (smooth > 0).view(np.uint8)
    if cv2.connectedComponents(local, connectivity=8)[0] <= 2:
        return None, 1
    peaks = prominent_peaks(smooth, max(PEAK_PROMINENCE_RAD, PEAK_PROMINENCE_FRACTION * top))
    count, markers = cv2.connectedComponents(peaks & inside, connectivity=8, ltype=cv2.CV_32S)
    if count <= 2:
        return None, 1
    markers[inside == 0] = count  # the outside floods as a basin of its own
    relief = cv2.cvtColor(np.clip(255.0 * (1.0 - smooth / top), 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    cv2.watershed(relief, markers)
    ridge = markers < 0
    if ridge.any():  # watershed lines go to a neighbouring basin
        basins = np.where((markers > 0) & (markers < count), markers, 0).astype(np.float32)
        markers[ridge] = cv2.dilate(basins, _CROSS)[ridge].astype(np.int32)
    return markers, count - 1


def _keep_pieces(region: np.ndarray, inside: np.ndarray, owner: np.ndarray, cores: int, component: int,
                 box: tuple[int, int, int, int], count: int, pieces: list[tuple[int, int, int, int, int]],
                 min_area_px: int) -> int:
    """Write a split into ``region`` (the component's box of the label image): the pixels of
    ``inside`` owned by core k (``owner`` == k, 1..``cores``) form piece k; the first piece of
    ``min_area_px`` or more keeps ``component``'s id, the others get ``count``, ``count + 1``, ...
    Appends ``(id, x, y, w, h)`` per piece (the whole component when none is large enough) and
    returns the new count."""
    x, y, w, h = box
    kept = 0
    for core in range(1, cores + 1):
        piece = ((owner == core) & (inside > 0)).view(np.uint8)
        if cv2.countNonZero(piece) < min_area_px:
            continue
        new_id = component if not kept else count
        if kept:
            region[piece > 0] = count
            count += 1
        kept += 1
        px, py, pw, ph = cv2.boundingRect(piece)
        pieces.append((new_id, x + px, y + py, pw, ph))
    if not kept:
        pieces.append((component, x, y, w, h))
    return count


def _split_touching(labels: np.ndarray, component: int, contour: np.ndarray, contour_area: float,
                    box: tuple[int, int, int, int], count: int, pieces: list[tuple[int, int, int, int, int]],
                    min_area_px: int, phase: np.ndarray | None = None) -> int | None:
    """Split a concave component of ``labels`` (in place) into the touching objects it holds. With
    ``phase`` (the box's, cells positive) each prominent phase peak is a cell and the phase's watershed
    draws the borders between them; without, the seeds are the cores far from the border (distance
    transform) and each pixel goes to the nearest core. ``contour_area``: ``cv2.contourArea(contour)``.
    Appends ``(component, x, y, w, h)`` for each piece (the first keeps the id, the others get ``count``,
    ``count + 1``, ...) and returns the new count. A convex component, or one with a single core or
    peak, is left whole: None, nothing appended."""
    x, y, w, h = box
    hull = cv2.contourArea(cv2.convexHull(contour))
    solidity = SPLIT_SOLIDITY if phase is None else SPLIT_SOLIDITY_WITH_PHASE
    if hull <= 0 or contour_area >= solidity * hull:
        return None
    region = labels[y:y + h, x:x + w]
    inside = (region == component).view(np.uint8)
    owner, cores = _nearest_cores(inside) if phase is None else _phase_basins(inside, phase)
    if owner is None:
        return None
    return _keep_pieces(region, inside, owner, cores, component, box, count, pieces, min_area_px)


SEAM_PEAK_PX = 2.0
"""With a model's seams, a core of the distance map counts as an object of its own when it rises
this many pixels above the saddle to any larger one (mask noise makes smaller bumps)."""
SEAM_CORE_PX = 3.0
"""... and when it lies at least this far from the border and the seams (an object's core, not a sliver)."""


def _split_at_contacts(labels: np.ndarray, component: int, box: tuple[int, int, int, int], count: int,
                       pieces: list[tuple[int, int, int, int, int]], min_area_px: int, seams: np.ndarray) -> int | None:
    """Split a component of ``labels`` (in place) at the seams a model with a contact class drew
    (``seams``: the box's h×w bool). The model draws a seam where objects touch, but often as a blob
    in the overlap that does not cut the component through; so the seams count as border, and the
    peaks of the distance to the border (h-maxima, :data:`SEAM_PEAK_PX`) are the objects' cores,
    and every pixel of the component goes to the nearest core. Appends the pieces as
    :func:`_split_touching` does and returns the new count; None (nothing appended) for a component
    without seams or with a single core (it is left whole)."""
    x, y, w, h = box
    region = labels[y:y + h, x:x + w]
    inside = (region == component).view(np.uint8)
    seam = cv2.bitwise_and(inside, seams.view(np.uint8))
    if not cv2.countNonZero(seam):
        return None
    cores = cv2.subtract(inside, seam)
    distance = cv2.distanceTransform(cv2.copyMakeBorder(cores, 1, 1, 1, 1, cv2.BORDER_CONSTANT, 0),
                                     cv2.DIST_L2, 3)[1:-1, 1:-1]
    if float(distance.max()) < SEAM_CORE_PX:
        return None
    peaks = cv2.bitwise_and(prominent_peaks(distance, SEAM_PEAK_PX),
                            cv2.compare(distance, SEAM_CORE_PX, cv2.CMP_GE) // 255)
    marker_count, markers = cv2.connectedComponents(peaks, connectivity=8, ltype=cv2.CV_32S)
    if marker_count <= 2:
        return None
    # Every pixel goes to the nearest core: one distance transform labelled by the cores (its own
    # numbering of its zero pixels' components, mapped back to ours through each core's pixels).
    _, nearest = cv2.distanceTransformWithLabels((peaks == 0).view(np.uint8), cv2.DIST_L2, 5,
                                                 labelType=cv2.DIST_LABEL_CCOMP)
    owner = np.zeros(int(nearest.max()) + 1, np.int32)
    owner[nearest[markers > 0]] = markers[markers > 0]
    markers = owner[nearest]
    return _keep_pieces(region, inside, markers, marker_count - 1, component, box, count, pieces, min_area_px)


def masked_sum(values: np.ndarray, mask: np.ndarray, count: float) -> float:
    """Σ of ``values`` (h×w float) over ``mask`` (h×w uint8, ``count`` nonzero pixels): OpenCV's masked
    mean (accumulated in double) times the count, one call instead of a product image and its sum."""
    return cv2.mean(values, mask)[0] * count


RING_MIN_PX = 12
"""A background ring of fewer pixels gives no plane: the object's phase is summed as it is."""


def _moment_sums(moments: dict[str, float]) -> tuple[float, float, float, float, float, float]:
    """Pixel count and the sums of x, y, x², x·y, y² of a 0/1 mask from its raw moments (OpenCV's
    plain path gives them exactly, and faster than ``binaryImage=True``, which thresholds a copy first)."""
    return moments["m00"], moments["m10"], moments["m01"], moments["m20"], moments["m11"], moments["m02"]


def _plane_corrected_sum(region_sum: float, region: tuple[float, ...], ring: tuple[float, ...],
                         ring_phase: tuple[float, float, float]) -> float:
    """``region_sum`` less the least-squares plane of the ring's phase, summed over the region.
    ``region``: the region's pixel count and sums of x, y; ``ring``: the ring's count and sums of x, y,
    x², x·y, y² (at least :data:`RING_MIN_PX` pixels); ``ring_phase``: Σφ, Σxφ, Σyφ over the ring."""
    count, sx, sy, sxx, sxy, syy = ring
    total, total_x, total_y = ring_phase
    region_count, rx, ry = region[:3]
    # The plane about the ring's centroid: its tilt from the centred second moments, so a thin ring
    # (a line: no tilt across it) is detected by its determinant alone.
    mx, my = sx / count, sy / count
    vxx, vxy, vyy = sxx - sx * mx, sxy - sx * my, syy - sy * my
    determinant = vxx * vyy - vxy * vxy
    offset = total / count
    if determinant <= 1e-9 * max(vxx * vyy, 1e-30):
        return region_sum - region_count * offset
    cx, cy = total_x - mx * total, total_y - my * total
    b = (cx * vyy - cy * vxy) / determinant
    c = (cy * vxx - cx * vxy) / determinant
    a = offset - b * mx - c * my
    return region_sum - (a * region_count + b * rx + c * ry)


def background_corrected_sum(phase: np.ndarray, region: np.ndarray, ring: np.ndarray) -> float:
    """Σ over ``region`` of (phase − the plane fitted to the phase on ``ring``), for one object's box
    (h×w float phase, h×w 0/1 uint8 masks). The least-squares plane comes from the masks' moments, so no
    plane image is built. Fewer than :data:`RING_MIN_PX` ring pixels: the phase is taken as is (no
    background known); a degenerate ring (a line): its mean is the offset."""
    ring_sums, region_sums = _moment_sums(cv2.moments(ring)), _moment_sums(cv2.moments(region))
    region_sum = masked_sum(phase, region, region_sums[0])
    if ring_sums[0] < RING_MIN_PX:
        return region_sum
    weighted = cv2.moments(cv2.multiply(phase, ring, dtype=cv2.CV_32F))
    return _plane_corrected_sum(region_sum, region_sums, ring_sums, (weighted["m00"], weighted["m10"], weighted["m01"]))


def _box_sums(height: int, width: int) -> tuple[int, int, int, int, int, int]:
    """Pixel count and the sums of x, y, x², x·y, y² over a whole height×width box (local coordinates)."""
    sum_x, sum_y = width * (width - 1) // 2, height * (height - 1) // 2
    sum_xx, sum_yy = (width - 1) * width * (2 * width - 1) // 6, (height - 1) * height * (2 * height - 1) // 6
    return height * width, height * sum_x, width * sum_y, height * sum_xx, sum_x * sum_y, width * sum_yy


def alone_background_corrected_sum(phase: np.ndarray, grown: np.ndarray) -> float:
    """:func:`background_corrected_sum` of an object alone in its box (no other object's pixel there):
    its region is the grown object ``grown`` (h×w 0/1 uint8) and its ring the rest of the box, so the
    ring's sums are the box's less the region's, and the region's phase the box's less the ring's:
    no ring is eroded, no masks are combined, one moments call fewer."""
    height, width = grown.shape
    region_sums = _moment_sums(cv2.moments(grown))
    count, sx, sy, sxx, sxy, syy = _box_sums(height, width)
    ring_sums = (count - region_sums[0], sx - region_sums[1], sy - region_sums[2], sxx - region_sums[3],
                 sxy - region_sums[4], syy - region_sums[5])
    if ring_sums[0] < RING_MIN_PX:
        return masked_sum(phase, grown, region_sums[0])
    on_ring = cv2.moments(cv2.multiply(phase, np.subtract(1, grown), dtype=cv2.CV_32F))
    region_sum = cv2.sumElems(phase)[0] - on_ring["m00"]  # the box's phase less the ring's
    return _plane_corrected_sum(region_sum, region_sums, ring_sums, (on_ring["m00"], on_ring["m10"], on_ring["m01"]))


class _PhaseAround(NamedTuple):
    """A component's padded box, whose top-left pixel is (``top``, ``left``): its (unwrapped, sign
    applied) phase ``values`` and the component's 0/1 ``inside`` mask there, as found before any split
    (so the mask of a component left whole is made once, for its unwrap check, shape and phase sum)."""

    top: int
    left: int
    values: np.ndarray
    inside: np.ndarray

    def inner(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """The phase over the box ``x, y, w, h`` (inside the padded one)."""
        return self.values[y - self.top:y - self.top + h, x - self.left:x - self.left + w]


class _Background:
    """Where one class's objects find background for their margin and ring, box by box. ``free``: the
    frame's 0/1 background mask, when other classes or ignored pixels share the frame; None when the
    class's pixels are all the frame's objects: then its component image (``components``, 0 off the
    class) says the same, and is read in a box that the object's own mask has just brought to cache."""

    def __init__(self, components: np.ndarray, free: np.ndarray | None) -> None:
        self.components, self.free = components, free

    def occupied(self, rows: slice, cols: slice) -> int:
        """Pixels of the box that belong to some object (any class's, or ignored)."""
        if self.free is None:
            return cv2.countNonZero(self.components[rows, cols])
        free = self.free[rows, cols]
        return free.size - cv2.countNonZero(free)

    def mask(self, rows: slice, cols: slice) -> np.ndarray:
        """The box's 0/1 background mask."""
        if self.free is None:
            return (self.components[rows, cols] == 0).view(np.uint8)
        return self.free[rows, cols]


class ObjectMeasurer:
    """Label map (H×W uint8) [+ phase (H×W float, rad)] -> :class:`FrameObjects`. Inputs are not modified.

    ``classes``: the class ids to measure (e.g. ``range(1, num_classes)`` of the model, which saves a
    histogram per frame); None measures every value present except 0 and :data:`IGNORE_VALUE`.
    Components smaller than ``min_area_px`` pixels are left out. Stateless: one instance may serve
    any number of frames, from one thread at a time.
    """

    def __init__(self, optics: Optics | None = None, min_area_px: int = 16,
                 classes: Sequence[int] | None = None, unwrap: bool = False, split: bool = False,
                 margin_px: int = 0, ring_px: int = 0) -> None:
        if min_area_px < 1:
            raise ObjectsError(f"min_area_px must be >= 1, got {min_area_px}")
        if margin_px < 0 or ring_px < 0:
            raise ObjectsError(f"margin_px and ring_px must be >= 0, got {margin_px} and {ring_px}")
        self.margin_px = int(margin_px)
        self.ring_px = int(ring_px)
        self._pad = self.margin_px + self.ring_px
        # A square margin: OpenCV dilates by a rectangle in two 1-D passes, 5-10× faster than by a disc.
        self._grow = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * self.margin_px + 1,) * 2)
        if classes is not None and any(not 0 < int(c) < IGNORE_VALUE for c in classes):
            raise ObjectsError(f"object classes must be in 1..{IGNORE_VALUE - 1} (0 is background), got {list(classes)}")
        self.optics = optics or Optics()
        self.min_area_px = int(min_area_px)
        self.classes = tuple(int(c) for c in classes) if classes is not None else None
        self.unwrap = unwrap
        self.split = split

    def _present_classes(self, labels: np.ndarray) -> tuple[int, ...]:
        if self.classes is not None:
            return self.classes
        counts = cv2.calcHist([labels], [0], None, [256], [0, 256]).ravel()
        return tuple(int(c) for c in np.flatnonzero(counts) if 0 < c < IGNORE_VALUE)

    def __call__(self, labels: np.ndarray, phase: np.ndarray | None = None,
                 contacts: np.ndarray | None = None, phase_sign: float = 1.0) -> FrameObjects:
        """Measure one frame. ``phase_sign`` (±1) multiplies the phase; it is applied box by box, so a
        microscope whose cells come out negative costs no pass over the whole phase image."""
        if not (isinstance(labels, np.ndarray) and labels.ndim == 2 and labels.dtype == np.uint8):
            raise ObjectsError("labels must be an H×W uint8 class map, got "
                               f"{getattr(labels, 'shape', type(labels).__name__)} {getattr(labels, 'dtype', '')}".rstrip())
        if phase is not None:
            if getattr(phase, "shape", None) != labels.shape:
                raise ObjectsError(f"phase image must match the label map {labels.shape}, "
                                   f"got {getattr(phase, 'shape', type(phase).__name__)}")
            if phase.dtype not in (np.float32, np.float64):
                phase = phase.astype(np.float32)
        if contacts is not None and getattr(contacts, "shape", None) != labels.shape:
            raise ObjectsError(f"contact seams must match the label map {labels.shape}, "
                               f"got {getattr(contacts, 'shape', type(contacts).__name__)}")
        if phase_sign not in (1, -1):
            raise ObjectsError(f"phase_sign must be 1 or -1, got {phase_sign!r}")
        with_background = phase is not None and self._pad > 0  # each object's margin and ring need it
        occupied = cv2.countNonZero(labels) if with_background else 0
        free: np.ndarray | None = None

        components: np.ndarray | None = None
        offset = 0
        rows: list[tuple[float, ...]] = []  # component, class, x, y, w, h, area, cx, cy, mu20, mu02, mu11, mean phase
        for class_id in self._present_classes(labels):
            mask = cv2.compare(labels, class_id, cv2.CMP_EQ)
            class_pixels = cv2.countNonZero(mask)
            if not class_pixels:
                continue
            count, class_components = cv2.connectedComponents(mask, connectivity=8, ltype=cv2.CV_32S)
            contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
            background = None
            if with_background:
                shared = class_pixels < occupied  # other classes (or ignored pixels) in the frame too
                if shared and free is None:
                    free = (labels == 0).view(np.uint8)
                background = _Background(class_components, free if shared else None)
            for contour, parent in zip(contours, hierarchy[0, :, 3].tolist(), strict=True):
                if parent != -1:  # the border of a hole, not of a component
                    continue
                x, y, w, h = box = cv2.boundingRect(contour)
                if w * h < self.min_area_px:
                    continue
                first_x, first_y = contour[0, 0].tolist()
                component = int(class_components[first_y, first_x])
                around = None if phase is None else self._phase_around(phase, class_components, component, box,
                                                                       phase_sign)
                pieces: list[tuple[int, int, int, int, int]] = []  # component, x, y, w, h
                split = None
                if contacts is not None and class_id == 1:  # the model's seams (contact pixels went to class 1)
                    split = _split_at_contacts(class_components, component, box, count, pieces,
                                               self.min_area_px, contacts[y:y + h, x:x + w])
                if split is None and self.split and (area := cv2.contourArea(contour)) >= 2 * self.min_area_px:
                    box_phase = None if around is None else around.inner(x, y, w, h)
                    split = _split_touching(class_components, component, contour, area, box, count, pieces,
                                            self.min_area_px, box_phase)
                if split is None:  # left whole: the mask found for its phase is its own
                    pieces.append((component, x, y, w, h))
                    inside = None if around is None else around.inside
                else:  # the pieces share their component's phase; each finds its own mask
                    count, inside = split, None
                for piece in pieces:
                    row = self._measure(class_components, piece[0], piece[1:], around, inside, background)
                    if row is not None:
                        rows.append((piece[0] + offset, class_id, *row))
            if components is None:
                components = class_components
            else:  # disjoint classes share one image, each class's ids after the previous class's
                cv2.add(class_components, offset, dst=components, mask=mask)
            offset += count - 1
        if components is None:
            components = np.zeros(labels.shape, np.int32)
        return self._objects(components, offset, rows, phase is not None)

    def _padded(self, box: Sequence[int], shape: tuple[int, ...]) -> tuple[slice, slice]:
        x, y, w, h = box
        pad = self._pad
        return (slice(max(y - pad, 0), min(y + h + pad, shape[0])), slice(max(x - pad, 0), min(x + w + pad, shape[1])))

    def _phase_around(self, phase: np.ndarray, components: np.ndarray, component: int,
                      box: Sequence[int], phase_sign: float) -> _PhaseAround:
        """A component's phase over its box grown by the margin and ring, with the sign applied and
        unwrapped once (when it nears ±π) for its split and for each of its pieces' sums."""
        rows, cols = self._padded(box, phase.shape)
        values = phase[rows, cols]
        if phase_sign < 0:
            values = np.negative(values)
        inside = (components[rows, cols] == component).view(np.uint8)
        if self.unwrap:
            values = unwrap_in_box(values, inside)
        return _PhaseAround(rows.start, cols.start, values, inside)

    def _measure(self, components: np.ndarray, component: int, box: Sequence[int], around: _PhaseAround | None,
                 inside: np.ndarray | None, background: _Background | None) -> tuple[float, ...] | None:
        """One object's ``x, y, w, h, area, cx, cy, mu20, mu02, mu11, mean phase``, None when smaller than
        ``min_area_px``. ``inside``: its 0/1 mask over ``around``'s padded box when known (None: made here)."""
        x, y, w, h = box
        if around is None:
            # NumPy's ==, not cv2.compare: OpenCV reads an array of up to 4 values as a scalar. Plain
            # moments of the 0/1 mask: see _moment_sums.
            moments = cv2.moments((components[y:y + h, x:x + w] == component).view(np.uint8))
        else:
            if inside is None:
                rows, cols = self._padded(box, components.shape)
                top, left = rows.start, cols.start
                inside = (components[rows, cols] == component).view(np.uint8)
                values = around.values[top - around.top:rows.stop - around.top, left - around.left:cols.stop - around.left]
            else:
                top, left, values = around.top, around.left, around.values
            moments = cv2.moments(inside[y - top:y - top + h, x - left:x - left + w])
        area = moments["m00"]
        if area < self.min_area_px:
            return None
        mean_phase = 0.0
        if around is not None:
            height, width = inside.shape
            rows, cols = slice(top, top + height), slice(left, left + width)
            mean_phase = self._phase_sum(values, inside, area, background, rows, cols) / area
        return (x, y, w, h, area, x + moments["m10"] / area, y + moments["m01"] / area, moments["mu20"],
                moments["mu02"], moments["mu11"], mean_phase)

    def _phase_sum(self, values: np.ndarray, inside: np.ndarray, area: float, background: _Background | None,
                   rows: slice, cols: slice) -> float:
        """One object's phase sum (rad·px) over the object grown by ``margin_px``, against the plane
        of the background ring around it (see the module's docstring). ``values``, ``inside``: its
        phase and 0/1 mask over its padded box (``rows``, ``cols`` of the frame); ``area``: its pixel
        count; ``background``: its class's (None without margin and ring)."""
        if background is None:
            return masked_sum(values, inside, area)
        grown = cv2.dilate(inside, self._grow)
        if background.occupied(rows, cols) == area:  # alone in its box: no neighbour to leave out
            if not self.ring_px:
                return masked_sum(values, grown, cv2.countNonZero(grown))
            return alone_background_corrected_sum(values, grown)
        # The grown object less its neighbours' pixels: grown ∩ (background ∪ itself).
        free = background.mask(rows, cols)
        region = cv2.bitwise_or(cv2.bitwise_and(grown, free), inside)
        if not self.ring_px:
            return masked_sum(values, region, cv2.countNonZero(region))
        # Background at least margin_px from every object in the box (the box's edge bounds the window,
        # as OpenCV's default border does for a dilation of the objects).
        ring = cv2.erode(free, self._grow)
        return background_corrected_sum(values, region, ring)

    def _objects(self, components: np.ndarray, component_count: int, rows: list[tuple[float, ...]],
                 with_phase: bool) -> FrameObjects:
        table = np.array(sorted(rows), np.float64).reshape(len(rows), 13)
        area = table[:, 6].astype(np.int64)
        diameter = np.sqrt(4.0 * table[:, 6] / math.pi)
        optics = self.optics
        phase: dict[str, np.ndarray] = {}
        if with_phase:
            mean_phase = table[:, 12]
            integrated = mean_phase * table[:, 6]
            mean_opd = mean_phase * optics.opd_um_per_rad
            phase = {
                "mean_phase_rad": mean_phase,
                "integrated_phase_rad_px": integrated,
                "mean_opd_um": mean_opd,
                "mean_thickness_um": mean_opd / optics.refractive_index_difference,
                "dry_mass_pg": integrated * optics.opd_um_per_rad * optics.pixel_area_um2
                / optics.refraction_increment_ml_per_g,
            }
        return FrameObjects(
            components=components,
            component_count=component_count,
            component_id=table[:, 0].astype(np.int32),
            class_id=table[:, 1].astype(np.int64),
            area_px=area,
            area_um2=table[:, 6] * optics.pixel_area_um2,
            centroid_xy=table[:, 7:9].copy(),
            bbox=table[:, 2:6].astype(np.int32),
            equivalent_diameter_px=diameter,
            equivalent_diameter_um=diameter * optics.pixel_size_um,
            eccentricity=eccentricity_from_moments(table[:, 9], table[:, 10], table[:, 11], table[:, 6]),
            **phase,
        )
