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
The phase sign depends on the microscope (see :mod:`app.pipeline.hologram`): it is used as given.

Speed (1024², 50 objects, one core: see ``benchmarks/tracking.py``): OpenCV's ``connectedComponents``
labels the pixels; the bounding boxes come from the components' outer contours (``findContours``,
several times cheaper than ``connectedComponentsWithStats`` there); everything else is computed inside
each object's box (``cv2.moments``, ``cv2.mean``), so no full-image pass is made per object.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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
        x, y, w, h = (int(v) for v in self.bbox[index])
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
    """The wrapped phase (rad) of one object's bounding box, unwrapped when it comes near ±π inside the
    object: the wrapped differences between neighbours are summed along rows and along columns from the
    box's edge (where an object's phase is small) and the two integrals averaged. A cell's phase is
    smooth, so neighbouring pixels differ by far less than π and the sum is the true phase."""
    if float(np.abs(box[inside.view(bool)]).max(initial=0.0)) < WRAP_RISK_RAD:
        return box
    two_pi = 2.0 * math.pi
    along_x = np.diff(box, axis=1, prepend=0.0)
    along_y = np.diff(box, axis=0, prepend=0.0)
    along_x[:, 1:] = (along_x[:, 1:] + math.pi) % two_pi - math.pi
    along_y[1:] = (along_y[1:] + math.pi) % two_pi - math.pi
    return (0.5 * (np.cumsum(along_x, axis=1) + np.cumsum(along_y, axis=0))).astype(np.float32)


SPLIT_SOLIDITY = 0.9
"""A component whose area is below this fraction of its convex hull's is checked for touching objects."""
_SEED_FRACTION = 0.6  # seeds: where the distance to the border exceeds this fraction of its maximum


def _split_touching(labels: np.ndarray, component: int, contour: np.ndarray, box: tuple[int, int, int, int],
                    count: int, pieces: list[tuple[int, int, int, int, int]], min_area_px: int) -> int:
    """Split a concave component of ``labels`` (in place) into the touching objects it holds: seeds are
    the cores far from the border (distance transform), and each pixel of the component goes to the
    nearest core.
    Appends ``(component, x, y, w, h)`` for each piece (the first keeps the id, the others get ``count``,
    ``count + 1``, ...) and returns the new count. A convex component, or one with a single core, is
    left whole."""
    x, y, w, h = box
    hull = cv2.contourArea(cv2.convexHull(contour))
    if hull <= 0 or cv2.contourArea(contour) >= SPLIT_SOLIDITY * hull:
        pieces.append((component, x, y, w, h))
        return count
    region = labels[y:y + h, x:x + w]
    inside = (region == component).view(np.uint8)
    distance = cv2.distanceTransform(cv2.copyMakeBorder(inside, 1, 1, 1, 1, cv2.BORDER_CONSTANT, 0),
                                     cv2.DIST_L2, 3)[1:-1, 1:-1]
    seeds = cv2.compare(distance, _SEED_FRACTION * float(distance.max()), cv2.CMP_GT)
    seed_count, markers = cv2.connectedComponents(seeds, connectivity=8, ltype=cv2.CV_32S)
    if seed_count <= 2:  # background plus one core: one object
        pieces.append((component, x, y, w, h))
        return count
    # Each pixel goes to the nearest core: the cores grown back out to the component's border.
    nearest = np.stack([cv2.distanceTransform(cv2.compare(markers, core, cv2.CMP_NE), cv2.DIST_L2, 3)
                        for core in range(1, seed_count)])
    owner = np.argmin(nearest, axis=0) + 2
    for core in range(2, seed_count + 1):
        piece = ((owner == core) & (inside > 0)).view(np.uint8)
        if cv2.countNonZero(piece) < min_area_px:
            continue
        new_id = component if core == 2 else count
        if core != 2:
            region[piece > 0] = count
            count += 1
        px, py, pw, ph = cv2.boundingRect(piece)
        pieces.append((new_id, x + px, y + py, pw, ph))
    return count


class ObjectMeasurer:
    """Label map (H×W uint8) [+ phase (H×W float, rad)] -> :class:`FrameObjects`. Inputs are not modified.

    ``classes``: the class ids to measure (e.g. ``range(1, num_classes)`` of the model, which saves a
    histogram per frame); None measures every value present except 0 and :data:`IGNORE_VALUE`.
    Components smaller than ``min_area_px`` pixels are left out. Stateless: one instance may serve
    any number of frames, from one thread at a time.
    """

    def __init__(self, optics: Optics | None = None, min_area_px: int = 16,
                 classes: Sequence[int] | None = None, unwrap: bool = False, split: bool = False) -> None:
        if min_area_px < 1:
            raise ObjectsError(f"min_area_px must be >= 1, got {min_area_px}")
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

    def __call__(self, labels: np.ndarray, phase: np.ndarray | None = None) -> FrameObjects:
        if not (isinstance(labels, np.ndarray) and labels.ndim == 2 and labels.dtype == np.uint8):
            raise ObjectsError("labels must be an H×W uint8 class map, got "
                               f"{getattr(labels, 'shape', type(labels).__name__)} {getattr(labels, 'dtype', '')}".rstrip())
        if phase is not None:
            if getattr(phase, "shape", None) != labels.shape:
                raise ObjectsError(f"phase image must match the label map {labels.shape}, "
                                   f"got {getattr(phase, 'shape', type(phase).__name__)}")
            if phase.dtype not in (np.float32, np.float64):
                phase = phase.astype(np.float32)

        components: np.ndarray | None = None
        offset = 0
        rows: list[tuple[float, ...]] = []  # component, class, x, y, w, h, area, cx, cy, mu20, mu02, mu11, mean phase
        for class_id in self._present_classes(labels):
            mask = cv2.compare(labels, class_id, cv2.CMP_EQ)
            if not cv2.countNonZero(mask):
                continue
            count, class_components = cv2.connectedComponents(mask, connectivity=8, ltype=cv2.CV_32S)
            contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
            pieces: list[tuple[int, int, int, int, int]] = []  # component, x, y, w, h
            for contour, (_, _, _, parent) in zip(contours, hierarchy[0], strict=True):
                if parent != -1:  # the border of a hole, not of a component
                    continue
                x, y, w, h = cv2.boundingRect(contour)
                if w * h < self.min_area_px:
                    continue
                first_x, first_y = contour[0, 0]
                component = int(class_components[first_y, first_x])
                if self.split and cv2.contourArea(contour) >= 2 * self.min_area_px:
                    count = _split_touching(class_components, component, contour, (x, y, w, h), count, pieces,
                                            self.min_area_px)
                else:
                    pieces.append((component, x, y, w, h))
            if components is None:
                components = class_components
            else:  # disjoint classes share one image, each class's ids after the previous class's
                cv2.add(class_components, offset, dst=components, mask=mask)
            for component, x, y, w, h in pieces:
                # NumPy's ==, not cv2.compare: OpenCV reads an array of up to 4 values as a scalar
                inside = (class_components[y:y + h, x:x + w] == component).view(np.uint8)
                moments = cv2.moments(inside, binaryImage=True)
                area = moments["m00"]
                if area < self.min_area_px:
                    continue
                mean_phase = 0.0
                if phase is not None:
                    box = phase[y:y + h, x:x + w]
                    if self.unwrap:
                        box = unwrap_in_box(box, inside)
                    mean_phase = cv2.mean(box, mask=inside)[0]
                rows.append((component + offset, class_id, x, y, w, h, area, x + moments["m10"] / area,
                             y + moments["m01"] / area, moments["mu20"], moments["mu02"], moments["mu11"],
                             mean_phase))
            offset += count - 1
        if components is None:
            components = np.zeros(labels.shape, np.int32)
        return self._objects(components, offset, rows, phase is not None)

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
