"""``python -m app.synth --like FILE``: measure a real hologram's recording settings for the generator.

From one hologram: the carrier (fringe period and angle, :func:`app.pipeline.hologram.find_carrier`), the fringe
visibility (twice the sideband amplitude over the local mean intensity, the generator's definition),
the sensor noise (the flat floor of the spectrum away from the DC term and the sidebands, less the
quantisation floor, relative to the mean intensity) and the bit depth (dtype and largest value).
The names are :class:`app.config.SynthConfig` fields, so the result can be kept by ``synth.keep``.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from app.pipeline.hologram import HologramError, find_carrier, plan_sideband, sideband_field


def bit_depth_of(image: np.ndarray) -> int:
    """8 for uint8; for uint16 the smallest of 10, 12, 16 bits that holds the largest value."""
    if image.dtype == np.uint8:
        return 8
    peak = int(image.max())
    return next(bits for bits in (10, 12, 16) if peak < 2**bits)


def measure(image: np.ndarray) -> dict[str, float]:
    """Recording settings of one gray hologram (H×W, uint8/uint16): synth field name -> value."""
    if image.ndim != 2:
        raise HologramError(f"--like needs a gray hologram, got shape {image.shape}")
    data = image.astype(np.float32)
    carrier = find_carrier(data)
    height, width = data.shape
    plan = plan_sideband(data.shape, carrier, "smooth_disk", 0.5)
    sideband = np.abs(sideband_field(data, plan))
    sideband = cv2.resize(sideband, (width, height), interpolation=cv2.INTER_LINEAR)
    mean = cv2.GaussianBlur(data, (0, 0), 2.0 * carrier.period_px, borderType=cv2.BORDER_REFLECT)
    margin_y, margin_x = height // 8, width // 8
    centre = (slice(margin_y, height - margin_y), slice(margin_x, width - margin_x))
    visibility = float(np.median(2.0 * sideband[centre] / np.maximum(mean[centre], 1e-6)))

    power = np.abs(np.fft.fft2(data - data.mean())) ** 2
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.fftfreq(width)[None, :]
    radius = 0.6 * carrier.frequency
    empty = np.hypot(fy, fx) > radius
    for sign in (1.0, -1.0):
        empty &= np.hypot(fy - sign * carrier.fy, fx - sign * carrier.fx) > radius
    if empty.sum() < 16:
        raise HologramError("the spectrum has no room outside the DC term and sidebands to measure the noise")
    # |F|² of white noise is exponential with mean N·σ²: its median is ln 2 times that.
    variance = float(np.median(power[empty])) / math.log(2.0) / data.size - 1.0 / 12.0
    noise = math.sqrt(max(variance, 0.0)) / max(float(data.mean()), 1e-6)
    return {"fringe_period_px": carrier.period_px, "fringe_angle_deg": carrier.angle_deg,
            "fringe_visibility": float(np.clip(visibility, 0.01, 1.0)), "noise_std": noise,
            "bit_depth": bit_depth_of(image)}


def like(path: str | Path) -> dict[str, float]:
    """Read ``path`` (any bit depth; colour is converted to gray) and :func:`measure` it."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise HologramError(f"cannot read hologram {path}")
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY if image.shape[2] == 3 else cv2.COLOR_BGRA2GRAY)
    return measure(image)
