"""A generator of off-axis holograms that look like real ones: propagated object waves, coherent noise.

Where :mod:`app.synthesis.generator`'s classic generator draws fringes around in-focus phase objects, this one
models the optics of a digital holographic microscope, frame by frame on the whole field:

1. **Objects** in the focal plane, as a complex transmission ``t = exp(-α + iφ)``: cells (phase domes
   with weak absorption, the classic generator's shapes), beads (uniform spheres whose phase follows
   the chord length, up to several π, so it wraps), absorbing elongated organisms, and touching clusters
   of cells, all foreground (class 1; the mask is their support in focus), and sub-resolution debris
   specks, which are background.
2. **Imaging**: the illumination (Gaussian envelope, out-of-focus dust as Fresnel ring systems and a
   static speckle-like random phase screen) times ``t``, low-pass filtered by the objective's pupil
   (bandwidth ``pupil_fraction`` × the carrier frequency, as off-axis set-ups are designed) and
   propagated by the angular spectrum method to a defocus of ``defocus_px`` (wavelength
   ``wavelength_px``, both in object-plane pixels): defocused objects show their own Fresnel rings.
3. **Interference** with a tilted reference (fringe period and angle, static low-order aberration, a
   per-frame piston drift, parasitic plane waves from multiple reflections) at a chosen visibility.
4. **Camera**: shot + read noise, quantisation to 8, 10, 12 or 16 bits (10–16 bits in uint16).

The same field without objects is the **background hologram** (:meth:`background`), with its own
noise. Near the border of a defocused object the in-focus support is uncertain: a band of
``1 + 0.5·|z|·λ·NA`` px (at most 6) is labelled 255 = ignore.

``synth.randomize`` draws every optical setting per sequence from :data:`RANDOM_RANGES` (domain
randomisation), so a model trained on it has seen many microscopes. Deterministic per seed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import scipy.fft

from app.config import SynthConfig
from app.synthesis.generator import (
    _HARMONICS,
    _TEXTURE_TILE,
    CLASS_NAMES,
    IGNORE,
    Division,
    SynthError,
    SynthFrame,
    _arrival_frames,
    _bbox,
    _Cell,
    _cell_phase,
    _divide,
    _InstanceMap,
    _tracks,
    carrier_frequency,
    low_order_aberration,
    validate,
)

# Ranges of synth.randomize, per sequence (uniform unless said). Period and defocus come from the config.
RANDOM_RANGES: dict[str, Any] = {
    "fringe_angle_deg": (0.0, 360.0),
    "fringe_visibility": (0.2, 0.95),
    "bit_depth": (8, 10, 12, 16),  # one of
    "noise_std": (0.005, 0.05),
    "wavelength_px": (1.5, 5.0),
    "pupil_fraction": (0.22, 0.4),
    "object_radius_periods": (2.5, 14.0),  # object radius range in fringe periods (resolution scales with it)
    "num_cells": (1, 14),  # integer: tracked things at a time (objects and debris)
    "bead_fraction": (0.0, 0.6),
    "organism_fraction": (0.0, 0.4),
    "cluster_fraction": (0.0, 0.5),
    "max_phase_rad": (0.8, 4.0),
    "speckle_rad": (0.0, 0.4),
    "speckle_grain_px": (1.0, 6.0),
    "parasitic_fringes": (0, 3),  # integer
    "parasitic_strength": (0.01, 0.1),  # amplitude relative to the object wave
    "num_dust_rings": (0, 6),  # integer
    "dust_strength": (0.05, 0.35),
    "aberration_rad": (0.0, 6.0),
    "illumination_sigma": (0.3, 1.5),
    "drift_px_per_frame": (0.0, 3.0),
    "in_focus_probability": 0.4,  # share of sequences with |defocus| < IN_FOCUS_PX
}
IN_FOCUS_PX = 3.0
"""A sequence is in focus (ground truth ``in_focus``) when its ``|defocus_px|`` is below this."""
_MAX_IGNORE_PX = 6
_BACKGROUND_MISMATCH_RAD = 1.5  # largest tilt + curvature between a background and its frames
_DEBRIS_PROBABILITY = 0.3  # share of tracked things that are sub-resolution debris (background class)


def randomized(cfg: SynthConfig) -> SynthConfig:
    """``cfg`` with every optical setting drawn from :data:`RANDOM_RANGES` for ``cfg.seed``, except the
    settings named in ``cfg.keep``, which stay as configured (``--like`` keeps the measured ones)."""
    unknown = set(cfg.keep) - {f.name for f in dataclasses.fields(cfg)}
    if unknown:
        raise SynthError(f"synth.keep names unknown settings: {', '.join(sorted(unknown))}")
    rng = np.random.default_rng([cfg.seed, 77])
    r = RANDOM_RANGES

    def uniform(key: str) -> float:
        return float(rng.uniform(*r[key]))

    def integer(key: str) -> int:
        return int(rng.integers(r[key][0], r[key][1] + 1))

    period = float(rng.uniform(*cfg.fringe_period_range_px))
    low, high = r["object_radius_periods"]
    radius_low = float(np.clip(period * rng.uniform(low, (low + high) / 2), 4.0, cfg.size / 8))
    radius_high = float(np.clip(period * rng.uniform((low + high) / 2, high), radius_low + 1.0, cfg.size / 5))
    near, far = cfg.defocus_range_px
    defocus = (rng.uniform(-min(far, IN_FOCUS_PX), min(far, IN_FOCUS_PX)) if rng.uniform() < r["in_focus_probability"]
               else rng.choice([-1.0, 1.0]) * rng.uniform(near, far))
    drawn = dict(
        fringe_period_px=period,
        fringe_angle_deg=uniform("fringe_angle_deg"), fringe_visibility=uniform("fringe_visibility"),
        bit_depth=int(rng.choice(r["bit_depth"])), noise_std=uniform("noise_std"),
        wavelength_px=uniform("wavelength_px"), pupil_fraction=uniform("pupil_fraction"),
        object_radius_px=(radius_low, radius_high), num_cells=integer("num_cells"),
        bead_fraction=uniform("bead_fraction"), organism_fraction=uniform("organism_fraction"),
        cluster_fraction=uniform("cluster_fraction"), max_phase_rad=uniform("max_phase_rad"),
        speckle_rad=uniform("speckle_rad"), speckle_grain_px=uniform("speckle_grain_px"),
        parasitic_fringes=integer("parasitic_fringes"), parasitic_strength=uniform("parasitic_strength"),
        num_dust_rings=integer("num_dust_rings"), dust_strength=uniform("dust_strength"),
        aberration_rad=uniform("aberration_rad"), illumination_sigma=uniform("illumination_sigma"),
        drift_px_per_frame=uniform("drift_px_per_frame"), defocus_px=float(defocus))
    kept = {key: value for key, value in drawn.items() if key not in cfg.keep}
    result = dataclasses.replace(cfg, generator="propagated", randomize=False, **kept)
    return _recordable(result, rng, vary_angle="fringe_angle_deg" not in cfg.keep)


def _fits_nyquist(cfg: SynthConfig) -> bool:
    fy, fx = carrier_frequency(cfg)
    return max(abs(fy), abs(fx)) + cfg.pupil_fraction * math.hypot(fy, fx) <= 0.5


def _recordable(cfg: SynthConfig, rng: np.random.Generator, vary_angle: bool) -> SynthConfig:
    """A set-up whose sideband fits below Nyquist, as a working microscope's does: fringes near 2 px
    are only usable near 45°, so another angle is drawn (or, failing that, the pupil narrowed)."""
    for _ in range(32 if vary_angle else 0):
        if _fits_nyquist(cfg):
            return cfg
        cfg = dataclasses.replace(cfg, fringe_angle_deg=float(rng.uniform(0.0, 360.0)))
    fy, fx = carrier_frequency(cfg)
    room = (0.5 - max(abs(fy), abs(fx))) / math.hypot(fy, fx)
    return cfg if _fits_nyquist(cfg) else dataclasses.replace(cfg, pupil_fraction=max(0.1, 0.95 * room))


@dataclass(frozen=True)
class _Member:
    offset: tuple[float, float]  # (x, y) px from the group's centre
    body: _Cell
    absorption: float  # α at the body's peak phase (α = absorption · φ / peak)
    kind: str  # cell | bead | organism


@dataclass(frozen=True)
class _Group:
    """One tracked thing: a lone object, or a touching cluster of cells moving together."""

    members: tuple[_Member, ...]

    @property
    def bound(self) -> float:
        return max(math.hypot(*m.offset) + m.body.bound for m in self.members)


def _body(rng: np.random.Generator, radius: float, peak_phase: float, elongation: tuple[float, float],
          harmonics: float, profile: tuple[float, float], texture: bool) -> _Cell:
    tile = cv2.GaussianBlur(rng.standard_normal((_TEXTURE_TILE, _TEXTURE_TILE)).astype(np.float32),
                            (0, 0), 1.5, borderType=cv2.BORDER_REFLECT)
    tile /= max(float(np.abs(tile).max()), 1e-6)
    orders = np.asarray(_HARMONICS, np.float64)
    return _Cell(
        radius=radius, elongation=rng.uniform(*elongation), angle=rng.uniform(0.0, 2.0 * math.pi),
        spin=rng.normal(0.0, 0.01), harmonic_amplitudes=rng.uniform(0.0, 1.0, len(orders)) * harmonics / orders,
        harmonic_phases=rng.uniform(0.0, 2.0 * math.pi, len(orders)),
        harmonic_drift=rng.normal(0.0, 0.02, len(orders)),
        breathing_phases=rng.uniform(0.0, 2.0 * math.pi, len(orders)), breathing_period=rng.uniform(40.0, 120.0),
        peak_phase=peak_phase, profile_exponent=rng.uniform(*profile),
        nucleus_offset=tuple(rng.uniform(-0.25, 0.25, 2)), nucleus_sigma=rng.uniform(0.2, 0.35),
        nucleus_amplitude=rng.uniform(0.2, 0.5) if texture else 0.0,
        texture=tile if texture else np.zeros_like(tile),
    )


class HologramSequence:
    """Deterministic sequence of propagated off-axis holograms (same interface as the classic one).

    ``len(seq) == cfg.frames``; ``seq.frame(i)`` renders frame i on its own (random access, thread-safe);
    :meth:`background` is the object-free hologram of the same set-up. Cells, beads and organisms are
    the objects of the ground truth (:attr:`SynthFrame.objects`; each cell of a cluster is one), debris
    is not; ``seq.divisions`` lists the divisions (:class:`~app.synthesis.generator.Division`) of lone cells.
    """

    def __init__(self, cfg: SynthConfig) -> None:
        if cfg.randomize:
            cfg = randomized(cfg)
        validate(cfg)
        self.cfg = cfg
        size = cfg.size
        self._shape = (size, size)
        self._dtype = np.uint8 if cfg.bit_depth == 8 else np.uint16
        self._build_optics(np.random.default_rng([cfg.seed, 0]))
        groups = _tracks(self._streams(), self._random_group, size, cfg.frames, cfg.drift_px_per_frame,
                         cfg.drift_px_per_frame * 0.3, 8.0)
        self._groups, parents, divisions = _divide(
            groups, cfg.num_divisions, np.random.default_rng([cfg.seed, 6]), size, cfg.frames,
            lambda group: group.members[0].body if [m.kind for m in group.members] == ["cell"] else None,
            lambda group, cell: _Group((dataclasses.replace(group.members[0], body=cell),)))
        # Object ids count the members of the groups in order, debris (0) left out.
        self._member_ids: list[tuple[int, ...]] = []
        self._identities: dict[int, tuple[str, int]] = {}
        for group, parent in zip(self._groups.bodies, parents, strict=True):
            parent_id = self._member_ids[parent][0] if parent >= 0 else 0
            ids = []
            for member in group.members:
                ids.append(0 if member.kind == "debris" else len(self._identities) + 1)
                if ids[-1]:
                    self._identities[ids[-1]] = (member.kind, parent_id)
            self._member_ids.append(tuple(ids))
        self.divisions = tuple(Division(frame, self._member_ids[parent][0],
                                        (self._member_ids[first][0], self._member_ids[second][0]))
                               for frame, parent, first, second in divisions)

    def _streams(self):
        cfg = self.cfg
        # Arrivals balance departures, as in the classic generator.
        rate = 4.0 * cfg.num_cells * cfg.drift_px_per_frame / (math.pi * cfg.size)
        births = [0] * cfg.num_cells + _arrival_frames(np.random.default_rng([cfg.seed, 2, 0]), rate, cfg.frames)
        for k, birth in enumerate(births):
            yield birth, k >= cfg.num_cells, np.random.default_rng([cfg.seed, 2, 1, k])

    def _random_group(self, rng: np.random.Generator) -> _Group:
        cfg = self.cfg
        low, high = cfg.object_radius_px
        draw = rng.uniform()
        if rng.uniform() < _DEBRIS_PROBABILITY:  # small weak specks below the resolution: not objects
            radius = rng.uniform(1.5, max(2.0, 0.8 * cfg.fringe_period_px))
            body = _body(rng, radius, rng.uniform(0.2, 0.8), (1.0, 1.2), 0.0, (0.5, 0.5), texture=False)
            return _Group((_Member((0.0, 0.0), body, 0.0, "debris"),))
        if draw < cfg.bead_fraction:
            radius = rng.uniform(low, high) * 0.7
            body = _body(rng, radius, cfg.max_phase_rad * rng.uniform(1.0, 3.0), (1.0, 1.05), 0.0, (0.5, 0.5),
                         texture=False)
            return _Group((_Member((0.0, 0.0), body, rng.uniform(0.0, 0.05), "bead"),))
        if draw < cfg.bead_fraction + cfg.organism_fraction:
            radius = rng.uniform(low, high) * 0.6
            body = _body(rng, radius, cfg.max_phase_rad * rng.uniform(0.3, 0.8), (3.0, 8.0), 0.05, (0.5, 0.7),
                         texture=True)
            return _Group((_Member((0.0, 0.0), body, rng.uniform(0.3, 1.5), "organism"),))
        count = int(rng.integers(2, 6)) if rng.uniform() < cfg.cluster_fraction else 1
        members = []
        for index in range(count):
            radius = rng.uniform(low, high) * (0.8 if count > 1 else 1.0)
            body = _body(rng, radius, cfg.max_phase_rad * rng.uniform(0.5, 1.0), (1.0, 1.6), 0.16, (0.5, 1.0),
                         texture=True)
            if index == 0:
                offset = (0.0, 0.0)
            else:  # touching: place next to a random earlier member, at the sum of radii
                anchor = members[int(rng.integers(len(members)))]
                angle = rng.uniform(0.0, 2.0 * math.pi)
                distance = (anchor.body.radius + radius) * rng.uniform(0.85, 1.0)
                offset = (anchor.offset[0] + distance * math.cos(angle), anchor.offset[1] + distance * math.sin(angle))
            members.append(_Member(offset, body, rng.uniform(0.0, 0.05), "cell"))
        return _Group(tuple(members))

    def _build_optics(self, rng: np.random.Generator) -> None:
        """Everything static: illumination, dust, speckle screen, pupil, propagator, reference wave."""
        cfg, size = self.cfg, self.cfg.size
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
        centre = size / 2.0
        ex, ey = centre + rng.uniform(-0.15, 0.15, 2) * size
        envelope = np.exp(-((xx - ex) ** 2 + (yy - ey) ** 2) / (4.0 * (cfg.illumination_sigma * size) ** 2))
        illumination = envelope.astype(np.complex128)
        for _ in range(cfg.num_dust_rings):  # Fresnel-chirped scattered waves from out-of-focus dust
            cx, cy = rng.uniform(-0.1, 1.1, 2) * size
            extent = rng.uniform(0.08, 0.3) * size
            rings = max(1.0, rng.uniform(0.04, 0.1) * extent)
            chirp = extent**2 / (2.0 * rings)
            r2 = (xx - cx) ** 2 + (yy - cy) ** 2
            illumination *= 1.0 - 1j * cfg.dust_strength * rng.uniform(0.5, 1.0) * np.exp(1j * np.pi * r2 / chirp) \
                * np.exp(-r2 / extent**2)
        if cfg.speckle_rad > 0:
            screen = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0),
                                      cfg.speckle_grain_px, borderType=cv2.BORDER_REFLECT)
            screen *= cfg.speckle_rad / max(float(screen.std()), 1e-9)
            illumination *= np.exp(1j * screen)
        self._illumination = illumination.astype(np.complex64)

        fy = np.fft.fftfreq(size)[:, None]
        fx = np.fft.fftfreq(size)[None, :]
        carrier = math.hypot(*carrier_frequency(cfg))
        cutoff = cfg.pupil_fraction * carrier
        radius = np.hypot(fy, fx)
        pupil = np.clip((cutoff - radius) / (0.1 * cutoff) + 0.5, 0.0, 1.0)  # soft edge, a tenth of the cutoff
        k = 1.0 / cfg.wavelength_px
        kz = np.sqrt(np.maximum(k * k - radius**2, 0.0))
        self._transfer = (pupil * np.exp(2j * np.pi * cfg.defocus_px * (kz - k))).astype(np.complex64)
        band = 1 + 0.5 * abs(cfg.defocus_px) * cfg.wavelength_px * cutoff
        self._ignore_px = int(min(round(band), _MAX_IGNORE_PX))

        aberration = low_order_aberration(rng, xx, yy, centre, cfg.aberration_rad)
        cfy, cfx = carrier_frequency(cfg)
        reference = np.exp(1j * (2.0 * np.pi * (cfx * xx + cfy * yy) + aberration))
        visibility = cfg.fringe_visibility
        self._ratio = np.float32((1.0 - math.sqrt(1.0 - visibility**2)) / visibility)
        # Multiple reflections: weak extra plane waves, their amplitude relative to the object wave's,
        # so their fringes never outshine the carrier's.
        for _ in range(cfg.parasitic_fringes):
            angle, frequency = rng.uniform(0, 2 * math.pi), rng.uniform(0.01, 0.45)
            reference += cfg.parasitic_strength * self._ratio * np.exp(
                1j * (2 * np.pi * frequency * (math.cos(angle) * xx + math.sin(angle) * yy) + rng.uniform(0, 6.3)))
        self._reference = (reference * np.sqrt(envelope)).astype(np.complex64)
        self._max_count = float(2**cfg.bit_depth - 1)
        noiseless = self._intensity(self._illumination, 0.0)
        self._adc_gain = np.float32(0.85 * self._max_count / float(np.percentile(noiseless, 99.9)))
        self._mean_intensity = float(noiseless.mean())

    def _intensity(self, transmitted: np.ndarray, piston: float) -> np.ndarray:
        wave = scipy.fft.ifft2(scipy.fft.fft2(transmitted, workers=1) * self._transfer, workers=1)
        total = self._reference * np.complex64(np.exp(1j * piston)) + self._ratio * wave
        return (total.real**2 + total.imag**2).astype(np.float32)

    def __len__(self) -> int:
        return self.cfg.frames

    def __iter__(self):
        for index in range(len(self)):
            yield self.frame(index)

    def _objects(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, _InstanceMap]:
        """Phase (rad), absorption and in-focus support of all objects at frame ``index`` (float32/uint8),
        and their instance map (debris left out)."""
        phase = np.zeros(self._shape, np.float32)
        absorption = np.zeros(self._shape, np.float32)
        inside = np.zeros(self._shape, np.uint8)
        instances = _InstanceMap(self._shape)
        tracks = self._groups
        for k in tracks.active(index):
            cx, cy = tracks.positions[k][index - tracks.births[k]]
            for member, object_id in zip(tracks.bodies[k].members, self._member_ids[k], strict=True):
                box = _bbox(cx + member.offset[0], cy + member.offset[1], member.body.bound, self.cfg.size)
                if box is None:
                    continue
                rows, cols, dy, dx = box
                body_phase, body_inside = _cell_phase(member.body, index, dy, dx)
                if member.kind in ("bead", "debris"):  # a sphere: phase follows the chord, not a dome with texture
                    r2 = (dx * dx + dy * dy) / np.float32(member.body.radius**2)
                    body_inside = r2 < 1.0
                    body_phase = np.float32(member.body.peak_phase) * np.sqrt(np.maximum(1.0 - r2, 0.0))
                phase[rows, cols] += body_phase
                absorption[rows, cols] += np.float32(member.absorption / member.body.peak_phase) * body_phase
                if member.kind != "debris":
                    inside[rows, cols] |= body_inside.astype(np.uint8)
                    instances.add(object_id, rows, cols, body_phase, body_inside)
        return phase, absorption, inside, instances

    def _record(self, transmitted: np.ndarray, stream: int, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.cfg.seed, stream, index])
        intensity = self._intensity(transmitted, float(rng.uniform(0.0, 2.0 * math.pi)))
        if self.cfg.noise_std > 0:
            std = self.cfg.noise_std * np.sqrt(self._mean_intensity * (0.5 * np.maximum(intensity, 0.0)
                                                                       + 0.5 * self._mean_intensity))
            intensity += std * rng.standard_normal(self._shape, dtype=np.float32)
        intensity *= self._adc_gain
        intensity += 0.5
        np.clip(intensity, 0.0, self._max_count, out=intensity)
        return intensity.astype(self._dtype)

    def frame(self, index: int) -> SynthFrame:
        """Render frame ``index``; the same index always gives the same frame."""
        if not 0 <= index < len(self):
            raise IndexError(f"frame {index} out of range for a sequence of {len(self)} frames")
        phase, absorption, inside, instances = self._objects(index)
        transmitted = self._illumination * np.exp(-absorption + 1j * phase).astype(np.complex64)
        image, mask = self._record(transmitted, 1, index), self._label(inside)
        in_focus = abs(self.cfg.defocus_px) < IN_FOCUS_PX
        return SynthFrame(index, image, mask, phase, instances.ids,
                          instances.measure(mask, phase, self._identities, in_focus))

    def background(self) -> np.ndarray:
        """The object-free hologram of this set-up (its own noise draw), as a lab records per session:
        with the sample holder not quite back in place (a small random tilt and curvature, up to
        ``_BACKGROUND_MISMATCH_RAD`` across the field)."""
        rng = np.random.default_rng([self.cfg.seed, 5])
        size = self.cfg.size
        y, x = np.mgrid[-1.0:1.0:size * 1j, -1.0:1.0:size * 1j]
        terms = (x, y, x * x + y * y)
        mismatch = sum(rng.uniform(-1.0, 1.0) * t for t in terms) * (_BACKGROUND_MISMATCH_RAD / len(terms))
        return self._record(self._illumination * np.exp(1j * mismatch).astype(np.complex64), 4, 0)

    def _label(self, inside: np.ndarray) -> np.ndarray:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * self._ignore_px + 1,) * 2)
        band = cv2.dilate(inside, kernel) != cv2.erode(inside, kernel)
        labels = inside.copy()
        labels[band] = IGNORE
        return labels

    def meta(self) -> dict[str, Any]:
        """JSON-serialisable description: the settings actually used (after randomisation) and derived values."""
        fy, fx = carrier_frequency(self.cfg)
        settings = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.cfg).items()}
        kinds: dict[str, int] = {}
        for group in self._groups.bodies:
            for member in group.members:
                kinds[member.kind] = kinds.get(member.kind, 0) + 1
        return {
            **settings,
            "generator": "app.synth propagated off-axis hologram",
            "carrier_frequency_cycles_per_px": {"fy": fy, "fx": fx},
            "image_dtype": np.dtype(self._dtype).name,
            "classes": {str(k): v for k, v in CLASS_NAMES.items()},
            "objects_in_sequence": kinds,
            "clusters_in_sequence": sum(len(g.members) > 1 for g in self._groups.bodies),
            "ignore_band_px": self._ignore_px,
            "divisions": [dataclasses.asdict(division) for division in self.divisions],
        }
