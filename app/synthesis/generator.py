"""Synthetic off-axis hologram (interferogram) sequences of moving cells, with exact ground truth.

Physics: the camera records ``I = |R + O|^2``. ``R`` is a tilted plane reference wave (the carrier
fringes) carrying a static low-order phase aberration; ``O = a·D·exp(iφ)`` is the object wave, where
``φ`` is the optical phase delay of the cells (thickness × refractive-index difference) and of small
debris particles, and ``D`` holds the Fresnel ring patterns of out-of-focus dust. Both beams share a
Gaussian illumination envelope. Expanded, ``I = E·(r² + a²|D|²) + 2·E·r·a·|D|·cos(θ₀ − φ)`` with the
static fringe phase ``θ₀ = 2π(fx·x + fy·y) + aberration − arg D``, so only ``φ`` changes per frame and
only the pixels around cells and particles are re-rendered. A slightly defocused phase object also
changes the object intensity, ``|O|² ∝ 1 − h·∇²φ`` (transport of intensity), which gives cells the faint
halo seen in real holograms. Then come a slight blur, shot (Poisson-like) plus read (Gaussian) noise,
and 8- or 16-bit quantisation.

Cells are domes with irregular boundaries (radius modulated by low-order Fourier harmonics), a nucleus
bump and smooth internal texture. They drift with a slow random walk, rotate and deform, and enter and
leave the field. All trajectories are drawn from the seed at construction, so any frame can be rendered
on its own (random access, thread-safe) and a seed always gives the same sequence.

CLI: ``python -m app.synth --out DIR --frames N --size S [--seed K] [--video FILE.mp4]``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from app.config import SynthConfig
from app.errors import AppError

MIN_SIZE = 32
GENERATORS = ("classic", "propagated")
BACKGROUND, CELL, IGNORE = 0, 1, 255
CLASS_NAMES = {BACKGROUND: "background", CELL: "cell", IGNORE: "ignore"}

# Physical and statistical constants of the model that users rarely need to change.
_HARMONICS = (2, 3, 4, 5)  # boundary Fourier orders: 2 = oval, higher = lobes and dents
_MAX_ELONGATION = 1.6  # major / minor axis of a cell's base ellipse
_TEXTURE_TILE = 16  # side of the smooth-noise tile mapped onto each cell
_TEXTURE_AMPLITUDE = 0.15  # relative internal texture; < 1 keeps the phase positive inside
_VELOCITY_JITTER = 0.3  # slow random walk of a cell's velocity, relative to its drift speed
_VELOCITY_SMOOTHING_FRAMES = 8.0  # time scale of that random walk
_PARTICLE_BROWNIAN_PX = 0.4  # per-frame Brownian step of a debris particle
_HALO_SMOOTHING_PX = 2.0  # spatial scale of the defocus halo around phase edges
_SHOT_NOISE_FRACTION = 0.5  # share of the noise variance that is shot noise at the mean intensity
_FULL_SCALE = 0.9  # brightest noiseless pixel lands at this fraction of the ADC range
_WALK_BLOCK = 256  # frames of a body's random walk drawn at a time (then doubling) until it has left
_RETURN_LOG_ODDS = 40.0  # a walk is cut once the chance of its body coming back is below e^-40
_SPLIT_FRAMES = 6  # frames two daughter cells take to move apart after a division


class SynthError(AppError, ValueError):
    """A synthetic-sequence setting is out of range."""


@dataclass(frozen=True)
class SynthObject:
    """Ground truth of one object (labelled 1 in the mask) in one frame.

    ``object_id``: >= 1, the same for the object in every frame, never reused within a sequence.
    ``parent_id``: the id of the cell it divided from (0 = none). ``kind``: cell (classic generator),
    cell, bead or organism (propagated; each cell of a touching cluster is an object of its own).
    The object's pixels are those of ``SynthFrame.instances == object_id``: ``x_px``, ``y_px`` their
    centroid (column, row; pixel centres at integers), ``integrated_phase_rad_px`` the exact phase
    ``SynthFrame.cell_phase`` summed over them (rad·px, before blur and noise), ``area_px`` how many
    of them the mask labels 1 (all of them without an ignore band). ``in_focus``: always True for the
    classic generator; the propagated one's sequences are in focus within ±3 px of defocus.
    """

    object_id: int
    parent_id: int
    kind: str
    x_px: float
    y_px: float
    area_px: int
    integrated_phase_rad_px: float
    in_focus: bool


@dataclass(frozen=True)
class Division:
    """Cell ``parent_id`` is last seen at frame ``frame - 1``; its daughters ``daughter_ids`` appear at
    ``frame`` as two touching halves on a random axis (half its area and the same peak phase each, so
    about its integrated phase together), move apart over ``_SPLIT_FRAMES`` frames, then drift on as
    their parent would have. Daughters do not divide again."""

    frame: int
    parent_id: int
    daughter_ids: tuple[int, int]


@dataclass(frozen=True)
class SynthFrame:
    """One rendered frame and its exact ground truth.

    ``image``: H×W uint8 (bit_depth 8) or uint16 (bit_depth 16) recorded intensity.
    ``mask``: H×W uint8 class ids, 0 = background, 1 = cell, 255 = ignore (cell border band).
    ``cell_phase``: H×W float32 optical phase delay of the cells in radians; > 0 exactly inside cells
    (debris particles are not included).
    ``instances``: H×W int32 object ids (:attr:`SynthObject.object_id`), 0 = none, on every pixel inside
    an object (the ignore band's pixels inside included); where objects overlap, the pixel goes to the
    one whose own phase is larger there (the one on top).
    ``objects``: one :class:`SynthObject` per object with at least one pixel in ``instances``, by id.
    """

    index: int
    image: np.ndarray
    mask: np.ndarray
    cell_phase: np.ndarray
    instances: np.ndarray
    objects: tuple[SynthObject, ...]


@dataclass(frozen=True)
class _Cell:
    """Shape parameters of one cell, in pixels and radians; deformation is analytic in time."""

    radius: float
    elongation: float
    angle: float
    spin: float  # rad/frame
    harmonic_amplitudes: np.ndarray  # (len(_HARMONICS),) relative radius modulation
    harmonic_phases: np.ndarray  # (len(_HARMONICS),) rad
    harmonic_drift: np.ndarray  # (len(_HARMONICS),) rad/frame, slow shape change
    breathing_phases: np.ndarray  # (len(_HARMONICS),) rad, amplitude modulation offsets
    breathing_period: float  # frames
    peak_phase: float  # rad
    profile_exponent: float  # dome (1 - r²)^p: 0.5 = ellipsoid, 1 = paraboloid
    nucleus_offset: tuple[float, float]  # local (u, v) as a fraction of the radius
    nucleus_sigma: float  # fraction of the radius
    nucleus_amplitude: float  # relative to peak_phase
    texture: np.ndarray  # (_TEXTURE_TILE, _TEXTURE_TILE) float32 in [-1, 1]

    @property
    def bound(self) -> float:
        """Radius (px) of a circle that contains the cell at every frame."""
        # Breathing scales the harmonics by at most 1.25.
        return self.radius * math.sqrt(self.elongation) * (1.0 + 1.25 * float(self.harmonic_amplitudes.sum())) + 1.0


@dataclass(frozen=True)
class _Particle:
    radius: float  # px
    peak_phase: float  # rad

    @property
    def bound(self) -> float:
        return self.radius + 1.0


@dataclass(frozen=True)
class _Tracks:
    """Trajectories of bodies: body k exists from frame ``births[k]`` to ``ends[k] - 1``."""

    births: np.ndarray  # (K,) int64
    ends: np.ndarray  # (K,) int64
    positions: list[np.ndarray]  # K arrays (ends[k] - births[k], 2) float64 (x, y) in px
    bodies: list[Any]

    def active(self, index: int) -> np.ndarray:
        return np.flatnonzero((self.births <= index) & (index < self.ends))


def carrier_frequency(cfg: SynthConfig) -> tuple[float, float]:
    """Carrier spatial frequency (fy, fx) in cycles/pixel: where the +1 order sits in ``np.fft.fft2``.

    The reference wave vector points at ``fringe_angle_deg`` from the +x axis (image columns) towards
    +y (image rows, downwards); the fringes run perpendicular to it, ``fringe_period_px`` apart.
    """
    angle = math.radians(cfg.fringe_angle_deg)
    return math.sin(angle) / cfg.fringe_period_px, math.cos(angle) / cfg.fringe_period_px


def validate(cfg: SynthConfig) -> None:
    """Raise :class:`SynthError` naming the first setting that cannot produce a sequence."""
    low, high = cfg.cell_radius_px
    checks = [
        (cfg.size >= MIN_SIZE, f"size must be at least {MIN_SIZE} px, got {cfg.size}"),
        (cfg.frames >= 1, f"frames must be at least 1, got {cfg.frames}"),
        (cfg.seed >= 0, f"seed must be >= 0, got {cfg.seed}"),
        (cfg.fringe_period_px > 2.0, f"fringe_period_px must be > 2 (Nyquist), got {cfg.fringe_period_px}"),
        (0.0 < low <= high < 0.5,
         f"cell_radius_px must satisfy 0 < min <= max < 0.5 (fractions of size), got {list(cfg.cell_radius_px)}"),
        (cfg.max_phase_rad > 0.0, f"max_phase_rad must be > 0, got {cfg.max_phase_rad}"),
        (cfg.drift_px_per_frame >= 0.0, f"drift_px_per_frame must be >= 0, got {cfg.drift_px_per_frame}"),
        (min(cfg.num_cells, cfg.num_particles, cfg.num_dust_rings) >= 0,
         "num_cells, num_particles and num_dust_rings must be >= 0"),
        (cfg.num_divisions >= 0, f"num_divisions must be >= 0, got {cfg.num_divisions}"),
        (cfg.noise_std >= 0.0, f"noise_std must be >= 0, got {cfg.noise_std}"),
        (cfg.defocus_sigma_px >= 0.0, f"defocus_sigma_px must be >= 0, got {cfg.defocus_sigma_px}"),
        (cfg.bit_depth in (8, 10, 12, 16), f"bit_depth must be 8, 10, 12 or 16, got {cfg.bit_depth}"),
        (cfg.generator in GENERATORS, f"generator must be one of {', '.join(GENERATORS)}, got '{cfg.generator}'"),
        (2.0 < cfg.fringe_period_range_px[0] <= cfg.fringe_period_range_px[1],
         f"fringe_period_range_px must satisfy 2 < min <= max, got {list(cfg.fringe_period_range_px)}"),
        (0.0 <= cfg.defocus_range_px[0] <= cfg.defocus_range_px[1],
         f"defocus_range_px must satisfy 0 <= min <= max, got {list(cfg.defocus_range_px)}"),
        (cfg.wavelength_px > 0.0, f"wavelength_px must be > 0, got {cfg.wavelength_px}"),
        (0.0 < cfg.pupil_fraction < 1.0, f"pupil_fraction must be in (0, 1), got {cfg.pupil_fraction}"),
        (0.0 < cfg.object_radius_px[0] <= cfg.object_radius_px[1],
         f"object_radius_px must satisfy 0 < min <= max, got {list(cfg.object_radius_px)}"),
        (min(cfg.bead_fraction, cfg.organism_fraction, cfg.cluster_fraction) >= 0.0
         and cfg.bead_fraction + cfg.organism_fraction <= 1.0,
         "bead_fraction and organism_fraction must be >= 0 with a sum <= 1, cluster_fraction >= 0"),
        (cfg.speckle_grain_px > 0.0, f"speckle_grain_px must be > 0, got {cfg.speckle_grain_px}"),
        (cfg.parasitic_fringes >= 0, f"parasitic_fringes must be >= 0, got {cfg.parasitic_fringes}"),
        (cfg.ignore_border_px >= 0, f"ignore_border_px must be >= 0, got {cfg.ignore_border_px}"),
        (0.0 < cfg.fringe_visibility <= 1.0, f"fringe_visibility must be in (0, 1], got {cfg.fringe_visibility}"),
        (cfg.illumination_sigma > 0.0, f"illumination_sigma must be > 0, got {cfg.illumination_sigma}"),
        (cfg.aberration_rad >= 0.0, f"aberration_rad must be >= 0, got {cfg.aberration_rad}"),
        (cfg.defocus_halo >= 0.0, f"defocus_halo must be >= 0, got {cfg.defocus_halo}"),
    ]
    for ok, message in checks:
        if not ok:
            raise SynthError(f"synth.{message}")


def low_order_aberration(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, centre: float,
                         peak_rad: float) -> np.ndarray:
    """A static phase aberration (rad, ``xx``'s shape) of low orders only — defocus, astigmatism,
    trefoil — with random weights, scaled to ``peak_rad``. No tilt, so the carrier peak stays where
    :func:`carrier_frequency` says."""
    x, y = (xx - centre) / centre, (yy - centre) / centre
    terms = np.stack([x * x + y * y, x * x - y * y, 2 * x * y, x**3 - 3 * x * y * y, 3 * x * x * y - y**3])
    aberration = np.tensordot(rng.standard_normal(len(terms)), terms, axes=1)
    peak = np.abs(aberration).max()
    aberration *= peak_rad / peak if peak > 0 else 0.0
    return aberration


@functools.lru_cache(maxsize=8)
def _walk_kernel(smoothing: float) -> np.ndarray:
    """Causal exponential filter of time scale ``smoothing`` frames, unit norm (white noise keeps its
    variance); ``[1]`` (no filtering) for ``smoothing <= 0``. Shared between calls, so read-only."""
    kernel = np.ones(1)
    if smoothing > 0.0:
        kernel = np.exp(-np.arange(int(4 * smoothing) + 1) / smoothing)
        kernel /= np.sqrt((kernel**2).sum())
    kernel.setflags(write=False)
    return kernel


def _smooth_walk(rng: np.random.Generator, length: int, step_std: float, smoothing: float,
                 first_block: int = _WALK_BLOCK) -> Iterator[np.ndarray]:
    """``length`` samples of correlated Gaussian noise, std ``step_std``, time scale ``smoothing`` frames,
    as consecutive (n, 2) blocks drawn only when the caller asks for them (blocks double in length).

    The filter is causal, so sample t depends only on draws up to t: a longer sequence extends a
    shorter one with the same seed instead of changing it, and the blocks joined are bit for bit the
    samples of one ``(length, 2)`` draw filtered at once (each later block is filtered together with the
    previous ``len(kernel) - 1`` draws, and keeps only the outputs where the whole kernel overlaps).
    """
    kernel = _walk_kernel(smoothing)
    history = np.zeros((0, 2))
    done, block = 0, max(first_block, len(kernel))
    while done < length:
        noise = rng.standard_normal((min(block, length - done), 2))
        if smoothing <= 0.0:
            yield noise * step_std
        else:
            padded = np.concatenate([history, noise])
            filtered = [np.convolve(padded[:, i], kernel)[len(history):len(padded)] for i in range(2)]
            yield np.stack(filtered, axis=1) * step_std
            history = padded[len(padded) - len(kernel) + 1:]
        done += len(noise)
        block *= 2


def _point_of_no_return(velocity: np.ndarray, low: float, high: float, step_std: float,
                        kernel: np.ndarray) -> tuple[float, float, float] | None:
    """``(hx, hy, d)``: once a body's position ``p`` (px) has ``hx·px + hy·py >= d``, it has left the
    square ``(low, high)²`` (px) for good: it is so far past the square's farthest corner along its
    drift ``velocity`` (px/frame) that its jitter brings it back with probability below
    ``exp(-_RETURN_LOG_ODDS)``. None for a body that does not drift (it may always come back).

    Its position is a random walk with drift ``|v|`` and long-run variance ``σ² = (step_std·Σkernel)²``
    per frame, which ever climbs back a distance ``x`` with probability ``exp(-2|v|x/σ²)`` (Cox & Miller);
    a slack of ``sqrt(2·_RETURN_LOG_ODDS·len(kernel))·σ`` covers the part of the filtered noise that is
    not yet a plain random walk (the draws still inside the kernel).
    """
    speed = math.hypot(*velocity)
    if speed == 0.0:
        return None
    hx, hy = float(velocity[0]) / speed, float(velocity[1]) / speed
    farthest = hx * (high if hx > 0 else low) + hy * (high if hy > 0 else low)
    sigma = step_std * float(kernel.sum())
    slack = math.sqrt(2.0 * _RETURN_LOG_ODDS * len(kernel)) * sigma
    return hx, hy, farthest + slack + _RETURN_LOG_ODDS * sigma * sigma / (2.0 * speed)


def _arrival_frames(rng: np.random.Generator, rate: float, frames: int) -> list[int]:
    """Frames (>= 1, < frames) at which bodies arrive: a Poisson process of ``rate`` per frame."""
    births: list[int] = []
    time = 0.0
    while rate > 0.0:
        time += rng.exponential(1.0 / rate)
        if math.ceil(time) >= frames:
            break
        births.append(max(1, math.ceil(time)))
    return births


def _track(rng: np.random.Generator, bound: float, birth: int, entering: bool, size: int, frames: int,
           speed: float, jitter: float, smoothing: float) -> np.ndarray | None:
    """(L, 2) float64 (x, y) positions from frame ``birth`` while the body (radius ``bound``) can be
    seen, or None if it never can. A body that is not ``entering`` starts anywhere inside the field;
    an entering one starts just outside a border and heads inwards. Velocity does a slow random walk.

    The walk is drawn block by block and stops once the body has left for good (:func:`_point_of_no_return`),
    so building costs the body's lifetime, not ``frames - birth``; the positions are those of the walk
    drawn to the end of the sequence (the same seed gives the same track either way).
    """
    magnitude = speed * rng.uniform(0.5, 1.5)
    if entering:
        side, along = int(rng.integers(4)), rng.uniform(0.0, size)
        start = np.array([(along, -bound), (size + bound, along), (along, size + bound), (-bound, along)][side])
        target = rng.uniform(0.2 * size, 0.8 * size, 2)
        heading = math.atan2(target[1] - start[1], target[0] - start[0])
    else:
        start = rng.uniform(0.0, size, 2)
        heading = rng.uniform(0.0, 2.0 * math.pi)
    velocity = magnitude * np.array([math.cos(heading), math.sin(heading)])
    escape = _point_of_no_return(velocity, -bound, size + bound, jitter, _walk_kernel(smoothing))
    pieces: list[np.ndarray] = []
    drawn, last_visible, offset = 0, -1, np.zeros((0, 2))
    for noise in _smooth_walk(rng, frames - birth, jitter, smoothing):
        steps = velocity + noise
        if drawn == 0:
            steps[0] = 0.0
        # Carrying the last sum adds in the same order as one cumsum over the whole walk would.
        offsets = np.cumsum(np.concatenate([offset, steps]), axis=0)[len(offset):]
        offset = offsets[-1:]
        path = start + offsets
        visible = np.flatnonzero(np.all((path > -bound) & (path < size + bound), axis=1))
        if visible.size:
            last_visible = drawn + int(visible[-1])
        pieces.append(path)
        drawn += len(path)
        if escape is not None and escape[0] * path[-1, 0] + escape[1] * path[-1, 1] >= escape[2]:
            break
    if last_visible < 0:
        return None
    return (pieces[0] if len(pieces) == 1 else np.concatenate(pieces))[: last_visible + 1].copy()


def _tracks(streams: Iterator[tuple[int, bool, np.random.Generator]], make_body: Callable[[np.random.Generator], Any],
            size: int, frames: int, speed: float, jitter: float, smoothing: float) -> _Tracks:
    """Bodies and trajectories from ``(birth, entering, rng)`` triples; ``make_body(rng)`` draws a body."""
    births, ends, positions, bodies = [], [], [], []
    for birth, entering, rng in streams:
        body = make_body(rng)
        path = _track(rng, body.bound, birth, entering, size, frames, speed, jitter, smoothing)
        if path is None:
            continue
        births.append(birth)
        ends.append(birth + len(path))
        positions.append(path)
        bodies.append(body)
    return _Tracks(np.asarray(births, np.int64), np.asarray(ends, np.int64), positions, bodies)


def _bbox(cx: float, cy: float, bound: float, size: int) -> tuple[slice, slice, np.ndarray, np.ndarray] | None:
    """Frame-clipped box around (cx, cy) and pixel-centre offsets from it: (rows, cols, dy (h,1), dx (1,w))."""
    x0, x1 = max(math.floor(cx - bound), 0), min(math.ceil(cx + bound) + 1, size)
    y0, y1 = max(math.floor(cy - bound), 0), min(math.ceil(cy + bound) + 1, size)
    if x0 >= x1 or y0 >= y1:
        return None
    dx = (np.arange(x0, x1, dtype=np.float32) - np.float32(cx))[None, :]
    dy = (np.arange(y0, y1, dtype=np.float32) - np.float32(cy))[:, None]
    return slice(y0, y1), slice(x0, x1), dy, dx


def _cell_phase(cell: _Cell, index: int, dy: np.ndarray, dx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Phase (float32 rad, 0 outside) and inside mask (bool) of ``cell`` at frame ``index`` on a box grid."""
    angle = cell.angle + cell.spin * index
    c, s = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    u = dx * c + dy * s  # local axes rotate with the cell
    v = dy * c - dx * s
    stretch = math.sqrt(cell.elongation)
    ue = u / np.float32(cell.radius * stretch)
    ve = v / np.float32(cell.radius / stretch)
    rho2 = ue * ue + ve * ve
    polar = np.arctan2(ve, ue)
    breathing = 1.0 + 0.25 * np.sin(2.0 * math.pi * index / cell.breathing_period + cell.breathing_phases)
    amplitudes = cell.harmonic_amplitudes * breathing
    phases = cell.harmonic_phases + cell.harmonic_drift * index
    boundary = np.ones_like(polar)
    for order, amplitude, phase in zip(_HARMONICS, amplitudes, phases, strict=True):
        boundary += np.float32(amplitude) * np.cos(order * polar + np.float32(phase))
    rn2 = rho2 / (boundary * boundary)
    inside = rn2 < 1.0
    dome = np.power(np.maximum(1.0 - rn2, 0.0), np.float32(cell.profile_exponent))
    scale, centre = np.float32((_TEXTURE_TILE - 1) / (2.0 * cell.bound)), np.float32((_TEXTURE_TILE - 1) / 2.0)
    texture = cv2.remap(cell.texture, u * scale + centre, v * scale + centre, cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_REFLECT)
    nu, nv = cell.nucleus_offset
    nucleus = np.exp(((ue - nu) ** 2 + (ve - nv) ** 2) * np.float32(-0.5 / cell.nucleus_sigma**2))
    relief = 1.0 + _TEXTURE_AMPLITUDE * texture + np.float32(cell.nucleus_amplitude) * nucleus
    # dome > 0 exactly where rn2 < 1 and relief >= 1 - _TEXTURE_AMPLITUDE, so phase > 0 exactly inside.
    return np.float32(cell.peak_phase) * dome * relief, inside


def _particle_phase(particle: _Particle, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Phase (float32 rad) of a small sphere: peak·sqrt(1 - r²/R²) inside, 0 outside."""
    r2 = (dx * dx + dy * dy) / np.float32(particle.radius**2)
    return np.float32(particle.peak_phase) * np.sqrt(np.maximum(1.0 - r2, 0.0))


class _InstanceMap:
    """A frame's :attr:`SynthFrame.instances`, built object by object, and the objects measured on it."""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.ids = np.zeros(shape, np.int32)
        self._top = np.full(shape, -np.inf, np.float32)  # own phase of the object each pixel went to
        self._boxes: dict[int, tuple[slice, slice]] = {}

    def add(self, object_id: int, rows: slice, cols: slice, phase: np.ndarray, inside: np.ndarray) -> None:
        """Object ``object_id``'s own phase (float32 rad) and inside mask (bool) on the box ``rows, cols``:
        it takes the pixels inside it where no object added before has a larger phase."""
        wins = inside & (phase > self._top[rows, cols])
        np.copyto(self.ids[rows, cols], object_id, where=wins)
        np.copyto(self._top[rows, cols], phase, where=wins)
        self._boxes[object_id] = (rows, cols)

    def measure(self, mask: np.ndarray, phase: np.ndarray, identities: dict[int, tuple[str, int]],
                in_focus: bool) -> tuple[SynthObject, ...]:
        """The objects that kept pixels, by id, on the frame's ``mask`` and ``phase`` (the
        :class:`SynthFrame` maps); ``identities[object_id]`` is (kind, parent_id)."""
        objects = []
        for object_id in sorted(self._boxes):
            rows, cols = self._boxes[object_id]
            own = self.ids[rows, cols] == object_id
            pixels = np.count_nonzero(own)
            if not pixels:
                continue
            kind, parent_id = identities[object_id]
            x = own.sum(axis=0) @ np.arange(cols.start, cols.stop) / pixels
            y = own.sum(axis=1) @ np.arange(rows.start, rows.stop) / pixels
            objects.append(SynthObject(
                object_id, parent_id, kind, float(x), float(y), int(np.count_nonzero(mask[rows, cols][own] == CELL)),
                float(phase[rows, cols][own].sum(dtype=np.float64)), in_focus))
        return tuple(objects)


def _divide(tracks: _Tracks, count: int, rng: np.random.Generator, size: int, frames: int,
            cell_of: Callable[[Any], _Cell | None], with_cell: Callable[[Any, _Cell], Any],
            ) -> tuple[_Tracks, list[int], list[tuple[int, int, int, int]]]:
    """Let ``count`` bodies divide as :class:`Division` says (fewer if fewer can): bodies that
    ``cell_of`` gives a cell for, at a frame after their first where their centre is in the field;
    ``with_cell(body, cell)`` is the body with another cell. Returns the tracks, the daughters appended
    after the others (which keep their indices), each track's parent track (-1 = none) and (frame,
    parent, daughter, daughter) track indices per division. ``count == 0`` returns ``tracks`` as given."""
    parents = [-1] * len(tracks.bodies)
    if count == 0:
        return tracks, parents, []
    births, ends = tracks.births.tolist(), tracks.ends.tolist()
    positions, bodies = list(tracks.positions), list(tracks.bodies)
    candidates = {}
    for k, path in enumerate(positions):
        steps = np.flatnonzero(np.all((path[1:] >= 0.0) & (path[1:] < size), axis=1)) + 1
        if steps.size and cell_of(bodies[k]) is not None:
            candidates[k] = steps
    divisions = []
    chosen = sorted(rng.permutation(sorted(candidates))[:count].tolist())
    for frame, k in sorted((births[j] + int(rng.choice(candidates[j])), j) for j in chosen):  # ids grow with time
        step, cell, path, room = frame - births[k], cell_of(bodies[k]), positions[k], frames - ends[k]
        positions[k], ends[k] = path[:step], frame
        axis = rng.uniform(0.0, 2.0 * math.pi)
        direction = np.array([math.cos(axis), math.sin(axis)])
        daughters = []
        for sign in (1.0, -1.0):
            daughter = dataclasses.replace(
                cell, radius=cell.radius / math.sqrt(2.0), elongation=rng.uniform(1.2, _MAX_ELONGATION),
                angle=axis + 0.5 * math.pi - cell.spin * frame, harmonic_phases=rng.uniform(0.0, 2.0 * math.pi, len(_HARMONICS)),
                nucleus_offset=tuple(rng.uniform(-0.25, 0.25, 2)))
            tail = path[step:]
            if room > 0 and len(tail) > 1:  # the parent left the field: carry the daughter out along its last step
                velocity = tail[-1] - tail[-2]
                extra = min(room, math.ceil(2.0 * daughter.bound / max(math.hypot(*velocity), 0.05)))
                tail = np.concatenate([tail, tail[-1] + velocity * np.arange(1, extra + 1)[:, None]])
            # Two halves, long axes across the division axis, from touching to apart (a smoothstep).
            start = 0.8 * daughter.radius / math.sqrt(daughter.elongation)
            progress = np.minimum(np.arange(len(tail)) / _SPLIT_FRAMES, 1.0)
            separation = start + (daughter.bound - start) * progress * progress * (3.0 - 2.0 * progress)
            track = tail + sign * separation[:, None] * direction
            visible = np.flatnonzero(np.all((track > -daughter.bound) & (track < size + daughter.bound), axis=1))
            track = track[: visible[-1] + 1]
            births.append(frame)
            ends.append(frame + len(track))
            positions.append(track)
            bodies.append(with_cell(bodies[k], daughter))
            parents.append(k)
            daughters.append(len(bodies) - 1)
        divisions.append((frame, k, *daughters))
    return _Tracks(np.asarray(births, np.int64), np.asarray(ends, np.int64), positions, bodies), parents, divisions


class InterferogramSequence:
    """Deterministic sequence of synthetic off-axis interferograms of moving cells.

    ``len(seq) == cfg.frames``; ``seq.frame(i)`` renders frame i on its own (random access, no state is
    changed, safe to call from several threads); iterating yields frames 0 … frames-1. Cells are the
    objects of the ground truth (:attr:`SynthFrame.objects`), particles are not; ``seq.divisions``
    lists the ``cfg.num_divisions`` divisions (:class:`Division`) by frame of the parent's id.
    """

    def __init__(self, cfg: SynthConfig) -> None:
        validate(cfg)
        self.cfg = cfg
        size = cfg.size
        self._build_static_fields(np.random.default_rng([cfg.seed, 0]))
        self._cells, parents, divisions = _divide(self._build_cells(), cfg.num_divisions,
                                                  np.random.default_rng([cfg.seed, 6]), size, cfg.frames,
                                                  lambda cell: cell, lambda _, cell: cell)
        self._identities = {k + 1: ("cell", parent + 1) for k, parent in enumerate(parents)}  # id = track + 1
        self.divisions = tuple(Division(frame, parent + 1, (first + 1, second + 1))
                               for frame, parent, first, second in divisions)
        self._particles = self._build_particles()
        self._band_kernel = (
            cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * cfg.ignore_border_px + 1,) * 2)
            if cfg.ignore_border_px > 0 else None
        )
        self._dtype = np.uint8 if cfg.bit_depth == 8 else np.uint16
        self._shape = (size, size)

    @classmethod
    def from_config(cls, cfg: SynthConfig) -> InterferogramSequence:
        """Same as ``InterferogramSequence(cfg)``; reads well next to ``load_config().synth``."""
        return cls(cfg)

    def _build_static_fields(self, rng: np.random.Generator) -> None:
        """Everything that does not move: envelope, dust rings, aberration, carrier, noise and ADC scale."""
        cfg, size = self.cfg, self.cfg.size
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
        centre = size / 2.0
        ex, ey = centre + rng.uniform(-0.1, 0.1, 2) * size
        envelope = np.exp(-((xx - ex) ** 2 + (yy - ey) ** 2) / (2.0 * (cfg.illumination_sigma * size) ** 2))

        # Out-of-focus dust: an obstruction scatters a Fresnel-chirped wave, -i·ε·exp(iπr²/s), that
        # interferes with the object beam into concentric rings; a Gaussian bounds its extent.
        dust = np.ones((size, size), np.complex128)
        for _ in range(cfg.num_dust_rings):
            cx, cy = rng.uniform(-0.1, 1.1, 2) * size
            extent = rng.uniform(0.08, 0.2) * size
            rings = max(1.0, rng.uniform(0.04, 0.08) * extent)  # keeps the outer rings below ~0.15 cycles/px
            chirp = extent**2 / (2.0 * rings)
            r2 = (xx - cx) ** 2 + (yy - cy) ** 2
            strength = rng.uniform(0.05, 0.15)
            dust += -1j * strength * np.exp(1j * np.pi * r2 / chirp) * np.exp(-r2 / extent**2)

        aberration = low_order_aberration(rng, xx, yy, centre, cfg.aberration_rad)

        fy, fx = carrier_frequency(cfg)
        carrier = np.mod(2.0 * np.pi * (fx * xx + fy * yy), 2.0 * np.pi)
        # Object/reference amplitude ratio that gives the requested fringe visibility 2a/(1 + a²).
        visibility = cfg.fringe_visibility
        ratio = (1.0 - math.sqrt(1.0 - visibility**2)) / visibility
        dust_amplitude = np.abs(dust)
        self._reference_level = envelope.astype(np.float32)
        self._object_level = (envelope * ratio**2 * dust_amplitude**2).astype(np.float32)
        self._modulation = (2.0 * envelope * ratio * dust_amplitude).astype(np.float32)
        self._fringe_phase = (carrier + aberration - np.angle(dust)).astype(np.float32)
        mean_level = self._reference_level + self._object_level
        self._background = mean_level + self._modulation * np.cos(self._fringe_phase)
        # The focus error may lie on either side of the cells: the halo sign varies between sequences.
        self._halo = float(cfg.defocus_halo * rng.choice([-1.0, 1.0]))
        self._halo_margin = math.ceil(4 * _HALO_SMOOTHING_PX) + 1 if self._halo else 0

        mean_intensity = float(mean_level.mean())
        self._noise_offset = np.float32(cfg.noise_std**2 * mean_intensity**2 * (1.0 - _SHOT_NOISE_FRACTION))
        self._noise_slope = np.float32(cfg.noise_std**2 * mean_intensity * _SHOT_NOISE_FRACTION)
        brightest = float((mean_level + self._modulation).max())
        self._max_count = float(2**cfg.bit_depth - 1)
        self._adc_gain = np.float32(_FULL_SCALE * self._max_count / brightest)

    def _streams(self, stream: int, initial: int) -> Iterator[tuple[int, bool, np.random.Generator]]:
        """(birth, entering, rng) for ``initial`` bodies at frame 0 and later arrivals, each with its own
        random stream, so changing ``frames`` extends the sequence rather than redrawing it."""
        cfg = self.cfg
        # Arrivals balance departures: a body crosses the square on a mean chord of πL/4 at speed v,
        # so N bodies on average need 4·N·v/(π·L) arrivals per frame.
        rate = 4.0 * initial * cfg.drift_px_per_frame / (math.pi * cfg.size)
        births = [0] * initial + _arrival_frames(np.random.default_rng([cfg.seed, stream, 0]), rate, cfg.frames)
        for k, birth in enumerate(births):
            yield birth, k >= initial, np.random.default_rng([cfg.seed, stream, 1, k])

    def _build_cells(self) -> _Tracks:
        cfg = self.cfg
        return _tracks(self._streams(2, cfg.num_cells), self._random_cell, cfg.size, cfg.frames,
                       cfg.drift_px_per_frame, cfg.drift_px_per_frame * _VELOCITY_JITTER, _VELOCITY_SMOOTHING_FRAMES)

    def _build_particles(self) -> _Tracks:
        cfg = self.cfg
        return _tracks(self._streams(3, cfg.num_particles), self._random_particle, cfg.size, cfg.frames,
                       cfg.drift_px_per_frame, _PARTICLE_BROWNIAN_PX, 0.0)

    def _random_cell(self, rng: np.random.Generator) -> _Cell:
        low, high = self.cfg.cell_radius_px
        tile = cv2.GaussianBlur(rng.standard_normal((_TEXTURE_TILE, _TEXTURE_TILE)).astype(np.float32),
                                (0, 0), 1.5, borderType=cv2.BORDER_REFLECT)
        tile /= max(float(np.abs(tile).max()), 1e-6)
        orders = np.asarray(_HARMONICS, np.float64)
        return _Cell(
            radius=rng.uniform(low, high) * self.cfg.size,
            elongation=rng.uniform(1.0, _MAX_ELONGATION),
            angle=rng.uniform(0.0, 2.0 * math.pi),
            spin=rng.normal(0.0, 0.01),
            harmonic_amplitudes=rng.uniform(0.0, 1.0, len(orders)) * 0.16 / orders,
            harmonic_phases=rng.uniform(0.0, 2.0 * math.pi, len(orders)),
            harmonic_drift=rng.normal(0.0, 0.02, len(orders)),
            breathing_phases=rng.uniform(0.0, 2.0 * math.pi, len(orders)),
            breathing_period=rng.uniform(40.0, 120.0),
            peak_phase=self.cfg.max_phase_rad * rng.uniform(0.5, 1.0),
            profile_exponent=rng.uniform(0.5, 1.0),
            nucleus_offset=tuple(rng.uniform(-0.25, 0.25, 2)),
            nucleus_sigma=rng.uniform(0.2, 0.35),
            nucleus_amplitude=rng.uniform(0.2, 0.5),
            texture=tile,
        )

    def _random_particle(self, rng: np.random.Generator) -> _Particle:
        return _Particle(radius=max(1.5, rng.uniform(0.006, 0.015) * self.cfg.size),
                         peak_phase=self.cfg.max_phase_rad * rng.uniform(0.15, 0.5))

    def __len__(self) -> int:
        return self.cfg.frames

    def __iter__(self) -> Iterator[SynthFrame]:
        for index in range(len(self)):
            yield self.frame(index)

    def frame(self, index: int) -> SynthFrame:
        """Render frame ``index`` (0 <= index < len(self)); the same index always gives the same frame."""
        if not 0 <= index < len(self):
            raise IndexError(f"frame {index} out of range for a sequence of {len(self)} frames")
        size = self.cfg.size
        cell_phase = np.zeros(self._shape, np.float32)
        phase = np.zeros(self._shape, np.float32)
        inside = np.zeros(self._shape, np.uint8)
        instances = _InstanceMap(self._shape)
        boxes = []
        for k in self._cells.active(index):
            cx, cy = self._cells.positions[k][index - self._cells.births[k]]
            box = _bbox(cx, cy, self._cells.bodies[k].bound + self._halo_margin, size)
            if box is None:
                continue
            rows, cols, dy, dx = box
            body_phase, body_inside = _cell_phase(self._cells.bodies[k], index, dy, dx)
            cell_phase[rows, cols] += body_phase
            inside[rows, cols] |= body_inside
            instances.add(int(k) + 1, rows, cols, body_phase, body_inside)
            boxes.append((rows, cols))
        phase += cell_phase
        for k in self._particles.active(index):
            cx, cy = self._particles.positions[k][index - self._particles.births[k]]
            box = _bbox(cx, cy, self._particles.bodies[k].bound + self._halo_margin, size)
            if box is None:
                continue
            rows, cols, dy, dx = box
            phase[rows, cols] += _particle_phase(self._particles.bodies[k], dy, dx)
            boxes.append((rows, cols))
        image, mask = self._record(index, phase, boxes), self._label(inside)
        return SynthFrame(index, image, mask, cell_phase, instances.ids,
                          instances.measure(mask, cell_phase, self._identities, in_focus=True))

    def _record(self, index: int, phase: np.ndarray, boxes: list[tuple[slice, slice]]) -> np.ndarray:
        """Phase map (H×W float32 rad) -> quantised camera frame (H×W uint8/uint16)."""
        intensity = self._background.copy()
        transport = None
        if self._halo and boxes:
            transport = cv2.GaussianBlur(cv2.Laplacian(phase, cv2.CV_32F), (0, 0), _HALO_SMOOTHING_PX)
        # Overlapping boxes are simply recomputed: each uses the complete maps, so the result is the same.
        for rows, cols in boxes:
            fringes = np.cos(self._fringe_phase[rows, cols] - phase[rows, cols])
            if transport is None:
                object_level, modulation = self._object_level[rows, cols], self._modulation[rows, cols]
            else:
                gain = np.maximum(1.0 - np.float32(self._halo) * transport[rows, cols], 0.0)
                object_level = self._object_level[rows, cols] * gain
                modulation = self._modulation[rows, cols] * np.sqrt(gain)
            intensity[rows, cols] = self._reference_level[rows, cols] + object_level + modulation * fringes
        if self.cfg.defocus_sigma_px > 0:
            intensity = cv2.GaussianBlur(intensity, (0, 0), self.cfg.defocus_sigma_px, borderType=cv2.BORDER_REFLECT)
        if self.cfg.noise_std > 0:
            rng = np.random.default_rng([self.cfg.seed, 1, index])
            std = np.sqrt(np.maximum(intensity, 0.0) * self._noise_slope + self._noise_offset)
            intensity += std * rng.standard_normal(self._shape, dtype=np.float32)
        intensity *= self._adc_gain
        intensity += 0.5  # round to nearest count on the truncating cast below
        np.clip(intensity, 0.0, self._max_count, out=intensity)
        return intensity.astype(self._dtype)

    def _label(self, inside: np.ndarray) -> np.ndarray:
        """Inside map (H×W uint8 0/1) -> class ids, with the ignore band around cell borders if configured."""
        if self._band_kernel is None:
            return inside
        # Erosion treats outside the frame as cell, so the frame edge never counts as a cell border.
        band = cv2.dilate(inside, self._band_kernel) != cv2.erode(inside, self._band_kernel)
        inside[band] = IGNORE
        return inside

    def meta(self) -> dict[str, Any]:
        """JSON-serialisable description: every setting plus derived values (carrier, classes, ADC range)."""
        fy, fx = carrier_frequency(self.cfg)
        settings = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.cfg).items()}
        return {
            **settings,
            "generator": "app.synth off-axis interferogram",
            "carrier_frequency_cycles_per_px": {"fy": fy, "fx": fx},
            "image_dtype": np.dtype(self._dtype).name,
            "classes": {str(k): v for k, v in CLASS_NAMES.items()},
            "cells_in_sequence": len(self._cells.bodies),
            "particles_in_sequence": len(self._particles.bodies),
            "divisions": [dataclasses.asdict(division) for division in self.divisions],
        }
