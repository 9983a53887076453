"""Off-axis hologram demodulation: a recorded interferogram -> the complex object field.

The field's way (Cuche et al. 2000; qpretrieve's ``OffAxisHologram``): the camera records
``I = |R + O|²``, whose spectrum holds the object wave twice, as sidebands around ± the carrier
frequency of the tilted reference. Take one sideband, filter it with a disk around the carrier, move it
to the origin and transform back: that is ``O·R*``, the object field up to the reference's phase.

Speed comes from three things: the real FFT (half spectrum), cropping only the sideband window before
the inverse transform (the field at reduced resolution, all the information the filter lets through),
and doing the start-up work (carrier search, filter, sub-pixel ramp, background field) once per
sequence. Everything a frame costs is one ``rfft2`` of the frame and one small ``ifft2``.

Sideband convention: the one at ``fx > 0`` (``fy > 0`` when ``fx == 0``) of ``numpy.fft.fft2``'s layout.
The object phase's sign depends on the microscope (which way the reference is tilted), so nothing
downstream may rely on it: the model is trained with both signs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import scipy.fft

from app.errors import AppError

FILTERS = ("disk", "smooth_disk")
HOLOGRAM_MODES = ("none", "offaxis")
OVERSAMPLE = 1.5  # reduced-field samples per Nyquist sample (see plan_sideband)
MIN_CARRIER_CYCLES_PER_PX = 0.05  # fringe periods up to 20 px; below this the sideband meets the DC term
_EPS = 1e-12


class HologramError(AppError, ValueError):
    """A hologram or a hologram setting cannot be demodulated (no carrier, wrong size, bad value)."""


def load_background_hologram(path: str | Path) -> np.ndarray:
    """Read a background hologram (any bit depth, gray or colour) or raise a one-line HologramError."""
    file = Path(path)
    if not file.is_file():
        raise HologramError(f"background hologram not found: {file}")
    image = cv2.imread(str(file), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise HologramError(f"cannot read background hologram {file}: not an image OpenCV can decode")
    return _gray_float(image)


@dataclass(frozen=True)
class Carrier:
    """Carrier spatial frequency in cycles/px: where the +1 order sits in ``numpy.fft.fft2``."""

    fy: float
    fx: float

    @property
    def frequency(self) -> float:
        return math.hypot(self.fy, self.fx)

    @property
    def period_px(self) -> float:
        return 1.0 / max(self.frequency, _EPS)

    @property
    def angle_deg(self) -> float:
        """Direction of the carrier wave vector, degrees from +x (columns) towards +y (rows, down)."""
        return math.degrees(math.atan2(self.fy, self.fx)) % 360.0

    @classmethod
    def from_period(cls, period_px: float, angle_deg: float) -> Carrier:
        angle = math.radians(angle_deg)
        return cls(math.sin(angle) / period_px, math.cos(angle) / period_px)

    def canonical(self) -> Carrier:
        """The same carrier on the sideband of the convention (fx > 0, or fx == 0 and fy > 0)."""
        if self.fx < 0 or (self.fx == 0 and self.fy < 0):
            return Carrier(-self.fy, -self.fx)
        return self


def _gray_float(image: np.ndarray) -> np.ndarray:
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.shape[2] == 3 else image[:, :, 0]
    if image.ndim != 2:
        raise HologramError(f"a hologram must be a 2-D gray image, got shape {image.shape}")
    return image.astype(np.float32, copy=False)


def _parabolic_offset(left: float, centre: float, right: float) -> float:
    """Sub-bin offset of a peak from three samples of its log magnitude (in [-0.5, 0.5])."""
    denominator = left - 2.0 * centre + right
    if denominator >= 0:
        return 0.0
    return float(np.clip(0.5 * (left - right) / denominator, -0.5, 0.5))


def find_carrier(image: np.ndarray, min_frequency: float = MIN_CARRIER_CYCLES_PER_PX) -> Carrier:
    """The carrier of an off-axis hologram (H×W, any dtype): the strongest spectral peak away from DC.

    A Hann window keeps the frame edges from smearing the DC term across the spectrum, and frequencies
    below ``min_frequency`` cycles/px are not searched (illumination, dust rings, the object's own
    intensity live there). The peak is refined to a fraction of a bin by parabolic interpolation of the
    log magnitude along each axis. Raises :class:`HologramError` for a frame without fringes.
    """
    data = _gray_float(image)
    height, width = data.shape
    if min(height, width) < 16:
        raise HologramError(f"a hologram must be at least 16×16 px to find its carrier, got {width}×{height}")
    window = np.outer(np.hanning(height), np.hanning(width)).astype(np.float32)
    spectrum = np.abs(np.fft.fftshift(np.fft.fft2((data - data.mean()) * window)))
    fy = (np.arange(height) - height // 2) / height
    fx = (np.arange(width) - width // 2) / width
    radius = np.hypot(fy[:, None], fx[None, :])
    half = (fx[None, :] > 0) | ((fx[None, :] == 0) & (fy[:, None] > 0))
    searched = np.where(half & (radius >= min_frequency), spectrum, 0.0)
    row, col = np.unravel_index(int(np.argmax(searched)), searched.shape)
    peak = searched[row, col]
    background = float(np.median(spectrum[half & (radius >= min_frequency)]))
    if peak <= 0 or peak < 8.0 * background:
        raise HologramError("no off-axis carrier found: the frame has no clear interference fringes "
                            "(set preprocess.hologram_carrier to give the carrier, or hologram: none)")
    log_spectrum = np.log(spectrum + _EPS)
    dy = _parabolic_offset(log_spectrum[row - 1, col], log_spectrum[row, col],
                           log_spectrum[(row + 1) % height, col]) if row > 0 else 0.0
    dx = _parabolic_offset(log_spectrum[row, col - 1], log_spectrum[row, col],
                           log_spectrum[row, (col + 1) % width]) if col > 0 else 0.0
    return Carrier(float((row - height // 2 + dy) / height), float((col - width // 2 + dx) / width)).canonical()


@dataclass(frozen=True)
class SidebandPlan:
    """Start-up work of one frame size and carrier, reused by every frame (see :func:`plan_sideband`).

    ``rows``/``cols`` index the half spectrum of ``rfft2`` (H × W//2+1) for every bin of the h×w
    window around the carrier; ``conjugate`` marks the bins that sit at negative fx, read as the complex
    conjugate of their mirror. ``weights`` is the filter times the normalisation (ifftshifted), and
    ``ramp`` removes the sub-bin remainder of the carrier on the reduced grid.
    """

    shape: tuple[int, int]
    carrier: Carrier
    window: tuple[int, int]
    rows: np.ndarray  # (h, w) int64
    cols: np.ndarray  # (h, w) int64
    conjugate: np.ndarray  # (h, w) bool
    weights: np.ndarray  # (h, w) complex64, already ifftshifted
    ramp: np.ndarray  # (h, w) complex64
    border_rows: np.ndarray  # (h, w) complex64: the periodic-component correction (see periodic_correction)
    border_cols: np.ndarray  # (h, w) complex64


def _window_side(extent_bins: float, full: int, oversample: float) -> int:
    side = scipy.fft.next_fast_len(int(math.ceil(2.0 * extent_bins * oversample)) + 2)
    return min(side, full)


def check_filter(filter_name: str, filter_size: float) -> None:
    """Raise :class:`HologramError` for an unknown filter or a size outside (0, 1]."""
    if filter_name not in FILTERS:
        raise HologramError(f"unknown hologram filter '{filter_name}'; valid: {', '.join(FILTERS)}")
    if not 0.0 < filter_size <= 1.0:
        raise HologramError(f"hologram filter_size must be in (0, 1], got {filter_size}")


def plan_sideband(shape: tuple[int, int], carrier: Carrier, filter_name: str = "smooth_disk",
                  filter_size: float = 0.5, oversample: float = OVERSAMPLE) -> SidebandPlan:
    """Precompute the sideband window, filter and sub-bin ramp for frames of ``shape`` (H, W).

    The filter is a disk of radius ``filter_size`` × the carrier's distance from DC (cycles/px) around
    the carrier, shrunk where it would cross the Nyquist frequency; ``smooth_disk`` softens its edge
    with a raised cosine over the outer 20 % of the radius, which trades a little resolution for less
    ringing. The reduced field is h×w with h, w the smallest
    fast FFT sizes that hold ``oversample`` × the filter's support: at 1 the field is sampled at its
    Nyquist rate and bilinear resizing back loses detail (0.049 rad RMS inside the HL60 cell against
    qpretrieve's full-resolution field); 1.5 gives 0.032 rad, 3 gives 0.028 rad.
    """
    check_filter(filter_name, filter_size)
    height, width = shape
    carrier = carrier.canonical()
    if not 0.0 < carrier.frequency <= math.sqrt(0.5):
        raise HologramError(f"carrier ({carrier.fy:.4f}, {carrier.fx:.4f}) cycles/px is outside the spectrum")
    # The disk stays inside the sampled spectrum: beyond Nyquist it would take in the aliased other
    # sideband (a period near 2 px at a steep angle leaves only a small disk, as it does the microscope).
    radius = min(filter_size * carrier.frequency, 0.5 - max(abs(carrier.fy), abs(carrier.fx)))
    if radius < 0.01:
        raise HologramError(f"carrier (period {carrier.period_px:.2f} px, angle {carrier.angle_deg:.0f}°) leaves no "
                            "room for a sideband filter below the Nyquist frequency")
    h, w = _window_side(radius * height, height, oversample), _window_side(radius * width, width, oversample)
    centre_y, centre_x = round(carrier.fy * height), round(carrier.fx * width)
    ky = centre_y + np.arange(h) - h // 2  # signed bins of the window
    kx = centre_x + np.arange(w) - w // 2
    KY, KX = np.meshgrid(ky, kx, indexing="ij")
    distance = np.hypot(KY / height - carrier.fy, KX / width - carrier.fx) / radius
    # Fold every bin into the sampled spectrum (a carrier near Nyquist has a sideband that wraps round,
    # as the camera aliased it) and read negative-fx bins as the conjugate of their mirror.
    folded = (KX + width // 2) % width - width // 2
    conjugate = folded < 0
    rows = np.where(conjugate, -KY, KY) % height
    cols = np.minimum(np.abs(folded), width // 2)
    if filter_name == "disk":
        mask = (distance <= 1.0).astype(np.float64)
    else:
        edge = np.clip((distance - 0.8) / 0.2, 0.0, 1.0)
        mask = np.where(distance <= 1.0, 0.5 * (1.0 + np.cos(np.pi * edge)), 0.0)
    # ifft2 divides by h·w; the full-size inverse would divide by H·W: rescale so amplitudes agree.
    weights = np.fft.ifftshift(mask * (h * w) / (height * width)).astype(np.complex64)
    # The window is centred on the nearest bin; the remaining fraction of a bin is a phase ramp.
    residual_y, residual_x = carrier.fy - centre_y / height, carrier.fx - centre_x / width
    yy = np.arange(h)[:, None] * (height / h)
    xx = np.arange(w)[None, :] * (width / w)
    ramp = np.exp(-2j * np.pi * (residual_y * yy + residual_x * xx)).astype(np.complex64)
    rows, cols = np.fft.ifftshift(rows), np.fft.ifftshift(cols)
    border_rows, border_cols = _border_factors(rows, cols, (height, width))
    # The window is unshifted by ifftshift, so its first sample sits at the centre bin.
    return SidebandPlan((height, width), carrier, (h, w), rows, cols, np.fft.ifftshift(conjugate), weights, ramp,
                        border_rows, border_cols)


def _border_factors(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The factors that turn the DFTs of a frame's two border differences into the spectrum of its
    smooth component at the window's bins (Moisan 2011, "Periodic plus smooth image decomposition").

    An FFT treats the frame as periodic, so the jump between opposite edges (fringes rarely fit the
    frame a whole number of times) rings across the whole spectrum, sideband included: the
    demodulated phase is noisy for a few pixels along the edges, and a model reads that as objects.
    The frame is ``p + s`` with ``p`` periodic and ``s`` smooth, and ``ŝ = v̂ / (2cos 2πq/H + 2cos 2πr/W − 4)``
    for the image ``v`` of the edge jumps, whose spectrum needs only two 1-D FFTs:
    ``v̂(q, r) = A(r)(1 − e^{2πiq/H}) + B(q)(1 − e^{2πir/W})`` with ``A`` the DFT of the last row minus
    the first and ``B`` that of the last column minus the first."""
    height, width = shape
    q, r = 2.0 * np.pi * rows / height, 2.0 * np.pi * cols / width
    denominator = 2.0 * np.cos(q) + 2.0 * np.cos(r) - 4.0
    safe = np.where(denominator == 0.0, 1.0, denominator)
    keep = denominator != 0.0  # the DC bin: the smooth part has zero mean
    border_rows = np.where(keep, (1.0 - np.exp(1j * q)) / safe, 0.0).astype(np.complex64)
    border_cols = np.where(keep, (1.0 - np.exp(1j * r)) / safe, 0.0).astype(np.complex64)
    return border_rows, border_cols


def periodic_correction(data: np.ndarray, plan: SidebandPlan) -> np.ndarray:
    """The spectrum of the frame's smooth component at the window's bins (h×w complex64, before the
    conjugation of negative-fx bins): subtracted from the frame's, it leaves the periodic component's,
    free of the edge jumps' ringing (see :func:`_border_factors`)."""
    along_x = scipy.fft.rfft(data[-1, :] - data[0, :], workers=1)  # A(r), r = 0..W/2
    along_y = scipy.fft.fft(data[:, -1] - data[:, 0], workers=1)  # B(q), q = 0..H-1
    return (along_x[plan.cols] * plan.border_rows + along_y[plan.rows] * plan.border_cols).astype(np.complex64)


def sideband_field(image: np.ndarray, plan: SidebandPlan) -> np.ndarray:
    """One frame (H×W) -> its object field on the reduced h×w grid (complex64), via NumPy/SciPy on CPU."""
    data = _gray_float(image)
    if data.shape != plan.shape:
        raise HologramError(f"frame is {data.shape[1]}×{data.shape[0]}, the sideband plan "
                            f"{plan.shape[1]}×{plan.shape[0]}")
    half = scipy.fft.rfft2(data, workers=1)
    window = half[plan.rows, plan.cols]
    window -= periodic_correction(data, plan)
    np.conjugate(window, out=window, where=plan.conjugate)
    window *= plan.weights
    field = scipy.fft.ifft2(window, workers=1, overwrite_x=True)
    field *= plan.ramp
    return field.astype(np.complex64, copy=False)


def polynomial_phase(field: np.ndarray, order: int = 2, step: int = 2) -> np.ndarray:
    """A low-order phase surface (tilt, curvature) fitted to a field's wrapped phase, wrap-free.

    Fitted to the phase *gradient* (the angle of neighbour products, which does not wrap), so no
    unwrapping is needed: a quadratic phase has a linear gradient. Two robust passes: the second drops
    the points whose gradient is far from the first fit (objects, dust, edges). Returns the fitted phase
    (float32 rad, field's shape), zero-mean.
    """
    h, w = field.shape
    yy, xx = np.mgrid[0:h:step, 0:w:step].astype(np.float64)
    sub = field[::step, ::step]
    gx = np.angle(sub[:, 1:] * np.conj(sub[:, :-1])) / step  # rad per px at the midpoints
    gy = np.angle(sub[1:, :] * np.conj(sub[:-1, :])) / step
    weight_x = np.minimum(np.abs(sub[:, 1:]), np.abs(sub[:, :-1]))
    weight_y = np.minimum(np.abs(sub[1:, :]), np.abs(sub[:-1, :]))
    # Unknowns of phi = a·x + b·y + c·x² + d·y² + e·x·y in normalised coordinates.
    sx, sy = max(w, 1) / 2.0, max(h, 1) / 2.0
    xmx, ymx = (xx[:, 1:] + xx[:, :-1]) / 2.0 / sx - 1.0, yy[:, 1:] / sy - 1.0
    xmy, ymy = xx[1:, :] / sx - 1.0, (yy[1:, :] + yy[:-1, :]) / 2.0 / sy - 1.0
    zeros_x, zeros_y = np.zeros_like(xmx), np.zeros_like(xmy)
    if order >= 2:
        rows_x = np.stack([np.ones_like(xmx), zeros_x, 2 * xmx, zeros_x, ymx], -1).reshape(-1, 5) / sx
        rows_y = np.stack([zeros_y, np.ones_like(ymy), zeros_y, 2 * ymy, xmy], -1).reshape(-1, 5) / sy
    else:
        rows_x = np.stack([np.ones_like(xmx), zeros_x], -1).reshape(-1, 2) / sx
        rows_y = np.stack([zeros_y, np.ones_like(ymy)], -1).reshape(-1, 2) / sy
    design = np.concatenate([rows_x, rows_y])
    target = np.concatenate([gx.ravel(), gy.ravel()])
    weight = np.concatenate([weight_x.ravel(), weight_y.ravel()])
    keep = weight > 0.2 * np.median(weight)
    coefficients = np.zeros(design.shape[1])
    for _ in range(3):
        if keep.sum() < design.shape[1] * 4:
            break
        coefficients = np.linalg.lstsq(design[keep], target[keep], rcond=None)[0]
        residual = np.abs(design @ coefficients - target)
        spread = 1.4826 * np.median(residual[keep]) + 1e-6
        keep &= residual < 3.0 * spread
    fy, fx = np.mgrid[0:h, 0:w].astype(np.float64)
    x, y = fx / sx - 1.0, fy / sy - 1.0
    terms = [x, y, x * x, y * y, x * y][: design.shape[1]]
    phase = sum(c * t for c, t in zip(coefficients, terms, strict=True))
    return (phase - phase.mean()).astype(np.float32)


def reference_field(field: np.ndarray, smooth_fraction: float = 0.125) -> np.ndarray:
    """A stand-in for a background field made from one object frame: smooth amplitude, fitted phase.

    Dividing by it removes the illumination envelope, the carrier remainder and the curvature, as a
    recorded background hologram would (but not the static dust or aberrations of higher order).
    """
    h, w = field.shape
    sigma = max(h, w) * smooth_fraction
    amplitude = cv2.GaussianBlur(np.abs(field).astype(np.float32), (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    return (np.maximum(amplitude, 1e-6) * np.exp(1j * polynomial_phase(field))).astype(np.complex64)


def inverse_of(field: np.ndarray) -> np.ndarray:
    """1/field (complex64), safe where the field vanishes (there the result is 0)."""
    power = (field.real.astype(np.float64) ** 2 + field.imag.astype(np.float64) ** 2)
    floor = 1e-6 * float(np.median(power)) + 1e-20
    return (np.conj(field) / np.maximum(power, floor)).astype(np.complex64)


def remove_piston(field: np.ndarray) -> np.ndarray:
    """Rotate the field so its dominant (background) phase is 0: the mean unit phasor (in place).

    Estimated on every 4th sample per axis (the piston is one number, the field is smooth), twice: the
    second mean takes only the samples within 0.5 rad of the first, so objects do not pull it."""
    sample = field[::4, ::4]
    phasor = sample / (np.abs(sample) + 1e-12)
    mean = phasor.mean()
    near = (phasor * np.conj(mean)).real > _PISTON_COS * abs(mean)
    if near.any():
        mean = phasor[near].mean()
    if abs(mean) > 1e-9:
        field *= np.complex64(np.conj(mean) / abs(mean))
    return field


_PISTON_COS = math.cos(0.5)
NUM_CHANNELS = 3
CHANNEL_NAMES = ("sin_phase", "one_minus_cos_phase", "log_amplitude")
LOG_AMPLITUDE_CLIP = 3.0


def field_channels(field: np.ndarray) -> np.ndarray:
    """Normalised field (h×w complex, background = 1) -> h×w×3 float32 model channels.

    sin φ and 1 − cos φ carry the phase without a wrap discontinuity (beads of several π show as ring
    systems, not as cuts); flipping the phase sign flips only the first. ln|E| carries absorption and
    the Fresnel rings of defocused objects, clipped to ±3.
    """
    amplitude = np.abs(field)
    cos = field.real / (amplitude + 1e-12)
    sin = field.imag / (amplitude + 1e-12)
    log_amplitude = np.clip(np.log(amplitude + 1e-6), -LOG_AMPLITUDE_CLIP, LOG_AMPLITUDE_CLIP)
    return np.stack([sin, 1.0 - cos, log_amplitude], axis=-1).astype(np.float32)


def phase_picture(channels: np.ndarray) -> np.ndarray:
    """Model channels (3×H×W float32, :func:`field_channels` order) -> H×W uint8 picture of the wrapped
    phase: background (φ = 0) mid-grey, φ = ±π black/white, the way DHM software shows phase."""
    sin, cos = channels[0], 1.0 - channels[1]
    shifted = cv2.phase(-cos, -sin)  # φ + π in [0, 2π): the background lands at π, mid-grey
    return cv2.convertScaleAbs(shifted, alpha=255.0 / (2.0 * math.pi))


def resize_to(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a reduced-grid h×w(×C) float32 array to the frame's ``shape`` (H, W).

    Reduced sample j sits at frame coordinate j·W/w (the FFT grid), not at cv2.resize's pixel-centre
    mapping, which would shift the field by up to half a frame pixel (0.084 instead of 0.032 rad RMS
    inside the HL60 cell against qpretrieve); the grid is periodic, so the border wraps.
    """
    if image.shape[:2] == shape:
        return image
    h, w = image.shape[:2]
    matrix = np.array([[w / shape[1], 0.0, 0.0], [0.0, h / shape[0], 0.0]])
    return cv2.warpAffine(image, matrix, (shape[1], shape[0]), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_WRAP)


class OffAxisDemodulator:
    """Per-sequence demodulator: a raw hologram frame -> normalised field and model channels.

    State (the start-up work, never repeated per frame): the carrier, found from the background hologram
    when one is given, else from the first frame, unless ``carrier`` fixes it; the sideband plan; and
    the inverse of the reference field, which is the background hologram's own field (with the tilt
    and curvature left between it and the first frame fitted away, unless ``background_fit`` is off)
    or, without one, a smooth stand-in fitted to the first frame (:func:`reference_field`). A frame of another size
    starts over (new carrier and plan); a background hologram of another size is an error.
    Use one instance per stream, from one thread.
    """

    def __init__(self, carrier: Carrier | None = None, filter_name: str = "smooth_disk",
                 filter_size: float = 0.5, background: np.ndarray | None = None, background_fit: bool = True) -> None:
        self.fixed_carrier = carrier.canonical() if carrier is not None else None
        self.filter_name = filter_name
        self.filter_size = filter_size
        self.background_fit = background_fit
        self.background = _gray_float(background) if background is not None else None
        self.plan: SidebandPlan | None = None
        self.reference_inverse: np.ndarray | None = None
        check_filter(filter_name, filter_size)  # bad settings fail here, before the first frame

    @property
    def carrier(self) -> Carrier | None:
        return self.plan.carrier if self.plan is not None else self.fixed_carrier

    def _start(self, image: np.ndarray) -> None:
        shape = image.shape[:2]
        if self.background is not None and self.background.shape != shape:
            raise HologramError(f"background hologram is {self.background.shape[1]}×{self.background.shape[0]}, "
                                f"the frames {shape[1]}×{shape[0]}")
        first = self.background if self.background is not None else image
        carrier = self.fixed_carrier or find_carrier(first)
        self.plan = plan_sideband(shape, carrier, self.filter_name, self.filter_size)
        reference = sideband_field(first, self.plan)
        if self.background is None:
            reference = reference_field(reference)
        elif self.background_fit:
            # A background is rarely recorded with the sample holder exactly in place: the tilt and
            # curvature left between the first frame and it are fitted once, like the carrier.
            residual = polynomial_phase(sideband_field(image, self.plan) * inverse_of(reference))
            reference = (reference * np.exp(1j * residual)).astype(np.complex64)
        self.reference_inverse = inverse_of(reference)

    def field(self, image: np.ndarray) -> np.ndarray:
        """Frame (H×W) -> reduced field (h×w complex64) divided by the reference, background phase 0."""
        data = _gray_float(image)
        if self.plan is None or self.plan.shape != data.shape:
            self._start(data)
        field = sideband_field(data, self.plan)
        field *= self.reference_inverse
        return remove_piston(field)

    def channels(self, image: np.ndarray) -> np.ndarray:
        """Frame (H×W) -> H×W×3 float32 model channels (see :func:`field_channels`), at frame resolution."""
        return resize_to(field_channels(self.field(image)), image.shape[:2])

    def full_field(self, image: np.ndarray) -> np.ndarray:
        """Frame (H×W) -> the normalised field at frame resolution (H×W complex64); ``np.angle`` of it
        is the phase difference to the reference (rad), ``np.abs`` the amplitude ratio."""
        field = self.field(image)
        parts = resize_to(np.stack([field.real, field.imag], axis=-1), image.shape[:2])
        return (parts[..., 0] + 1j * parts[..., 1]).astype(np.complex64)


class TorchDemodulator:
    """The same demodulation with ``torch.fft`` on the model's device (frames stay on the GPU).

    Start-up (carrier, plan, reference field) is shared with :class:`OffAxisDemodulator` on the CPU
    from the first frame or the background; per frame: (N, H, W) float tensor -> (N, 3, H, W) channels.
    """

    out_channels = NUM_CHANNELS

    def __init__(self, demodulator: OffAxisDemodulator, device: str = "cpu") -> None:
        import torch

        self._torch = torch
        self.cpu = demodulator
        self.device = torch.device(device)
        self._tensors: dict[str, object] | None = None

    def _prepare(self, first: np.ndarray) -> None:
        torch = self._torch
        if self.cpu.plan is None or self.cpu.plan.shape != first.shape:
            self.cpu._start(first)
        plan = self.cpu.plan
        half_width = plan.shape[1] // 2 + 1
        to = {"device": self.device}
        self._tensors = {
            "shape": plan.shape,
            "index": torch.as_tensor((plan.rows * half_width + plan.cols).ravel(), **to),
            "conjugate": torch.as_tensor(plan.conjugate, **to),
            "rows": torch.as_tensor(plan.rows, **to),
            "cols": torch.as_tensor(plan.cols, **to),
            "border_rows": torch.as_tensor(plan.border_rows, **to),
            "border_cols": torch.as_tensor(plan.border_cols, **to),
            "weights": torch.as_tensor(plan.weights, **to),
            "ramp_inverse": torch.as_tensor(plan.ramp * self.cpu.reference_inverse, **to),
            "grid": self._resize_grid(plan.window, plan.shape),
        }

    def _resize_grid(self, window: tuple[int, int], shape: tuple[int, int]) -> object:
        """grid_sample coordinates of :func:`resize_to`'s mapping (sample j at frame coordinate j·W/w) on
        the reduced grid padded by one wrapped row and column, so both paths interpolate the same points."""
        torch = self._torch
        (h, w), (height, width) = window, shape
        y = torch.arange(height, dtype=torch.float64) * (h / height) / h * 2.0 - 1.0
        x = torch.arange(width, dtype=torch.float64) * (w / width) / w * 2.0 - 1.0
        grid_y, grid_x = torch.meshgrid(y, x, indexing="ij")
        return torch.stack([grid_x, grid_y], dim=-1)[None].to(self.device, torch.float32)

    def channels(self, frames: object) -> object:
        """(N, H, W) float32 tensor of raw frames -> (N, 3, H, W) float32 channels on the same device."""
        torch = self._torch
        frames = frames.to(self.device, torch.float32)
        shape = tuple(frames.shape[-2:])
        if self._tensors is None or self._tensors["shape"] != shape:
            self._prepare(frames[0].detach().cpu().numpy())
        t = self._tensors
        h, w = t["weights"].shape
        half = torch.fft.rfft2(frames)
        window = half.flatten(1)[:, t["index"]].view(-1, h, w)
        along_x = torch.fft.rfft(frames[:, -1, :] - frames[:, 0, :])  # see periodic_correction
        along_y = torch.fft.fft(frames[:, :, -1] - frames[:, :, 0])
        window = window - (along_x[:, t["cols"]] * t["border_rows"] + along_y[:, t["rows"]] * t["border_cols"])
        window = torch.where(t["conjugate"], window.conj(), window) * t["weights"]
        field = torch.fft.ifft2(window) * t["ramp_inverse"]
        sample = field[:, ::4, ::4]
        phasor = sample / (sample.abs() + 1e-12)
        mean = phasor.mean(dim=(-2, -1), keepdim=True)
        near = ((phasor * mean.conj()).real > _PISTON_COS * mean.abs()).to(phasor.real.dtype)
        count = near.sum(dim=(-2, -1), keepdim=True)
        robust = (phasor * near).sum(dim=(-2, -1), keepdim=True) / count.clamp(min=1)
        mean = torch.where(count > 0, robust, mean)
        field = field * (mean.conj() / (mean.abs() + 1e-12))
        amplitude = field.abs()
        cos = field.real / (amplitude + 1e-12)
        sin = field.imag / (amplitude + 1e-12)
        log_amplitude = torch.log(amplitude + 1e-6).clamp(-LOG_AMPLITUDE_CLIP, LOG_AMPLITUDE_CLIP)
        stacked = torch.stack([sin, 1.0 - cos, log_amplitude], dim=1)
        padded = torch.cat([stacked, stacked[:, :, :1]], dim=2)
        padded = torch.cat([padded, padded[:, :, :, :1]], dim=3)
        grid = t["grid"].expand(stacked.shape[0], -1, -1, -1)
        return torch.nn.functional.grid_sample(padded, grid, mode="bilinear", padding_mode="border",
                                               align_corners=True)
