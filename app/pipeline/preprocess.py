"""Preprocessing: a raw frame -> the float tensor a model expects.

One implementation shared by the live pipeline and by training augmentation, so a model sees the same
input in both places. Order: channel conversion -> CLAHE -> scale to [0, 1] -> background subtraction
-> resize -> normalisation -> HWC to CHW.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import cv2
import numpy as np

from app.config import RECIPE_KEYS, PreprocessConfig, PreprocessRecipe
from app.errors import AppError
from app.pipeline.hologram import (
    CHANNEL_NAMES,
    HOLOGRAM_MODES,
    Carrier,
    OffAxisDemodulator,
    load_background_hologram,
)

log = logging.getLogger(__name__)

BACKGROUND_METHODS = ("first_n_mean", "running_average", "mog2", "none")
HOLOGRAM_BACKENDS = ("auto", "numpy", "torch")


class PreprocessError(AppError, ValueError):
    """A frame or a preprocessing setting cannot be handled."""


def convert_channels(frame: np.ndarray, in_channels: int) -> np.ndarray:
    """Gray (H×W) or BGR(A) (H×W×3/4) frame -> H×W gray for 1 channel, H×W×3 RGB for 3. Dtype kept."""
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    if frame.ndim == 2:
        return frame if in_channels == 1 else np.repeat(frame[:, :, None], 3, axis=2)
    if frame.ndim != 3 or frame.shape[2] not in (3, 4):
        raise PreprocessError(f"unsupported frame shape {frame.shape}; expected H×W or H×W×3")
    if in_channels == 1:
        code = cv2.COLOR_BGR2GRAY if frame.shape[2] == 3 else cv2.COLOR_BGRA2GRAY
        return cv2.cvtColor(frame, code)
    code = cv2.COLOR_BGR2RGB if frame.shape[2] == 3 else cv2.COLOR_BGRA2RGB
    return cv2.cvtColor(frame, code)


class Clahe:
    """Contrast-limited adaptive histogram equalisation of uint8 or uint16 frames (not in place).

    Colour frames (H×W×3 RGB) are equalised on the L channel of Lab so hues are preserved.
    """

    def __init__(self, clip_limit: float = 2.0, tile_grid: int = 8) -> None:
        self._clahe = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tile_grid, tile_grid))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if image.dtype not in (np.uint8, np.uint16):
            raise PreprocessError(f"CLAHE needs uint8 or uint16 frames, got {image.dtype}")
        if image.ndim == 2:
            return self._clahe.apply(image)
        lab = cv2.cvtColor(image if image.dtype == np.uint8 else (image >> 8).astype(np.uint8), cv2.COLOR_RGB2Lab)
        lab[:, :, 0] = self._clahe.apply(lab[:, :, 0])
        return cv2.cvtColor(lab, cv2.COLOR_Lab2RGB)


def to_unit_float(image: np.ndarray) -> np.ndarray:
    """uint8 / uint16 / float image -> float32 scaled to [0, 1] by the dtype's range (floats kept)."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) * (1.0 / 255.0)
    if image.dtype == np.uint16:
        return image.astype(np.float32) * (1.0 / 65535.0)
    return image.astype(np.float32, copy=False)


class BackgroundModel(Protocol):
    """Maps a float32 [0, 1] frame to the frame minus its background estimate (a new array)."""

    def __call__(self, image: np.ndarray) -> np.ndarray: ...


class FirstNMeanBackground:
    """Subtract the mean of the first ``n`` frames from every frame (the interferogram seeds' trick).

    Until ``n`` frames have been seen the mean of those seen so far is used, so the first frames are
    already background-corrected rather than delayed; after that the estimate is frozen.
    """

    def __init__(self, n: int = 10) -> None:
        if n < 1:
            raise PreprocessError("background_frames must be >= 1")
        self.n = n
        self._sum: np.ndarray | None = None
        self._count = 0

    def fit(self, frames: list[np.ndarray]) -> FirstNMeanBackground:
        """Set the estimate from given frames at once (used by training on whole sequences)."""
        for frame in frames[: self.n]:
            self._accumulate(frame)
        return self

    def _accumulate(self, image: np.ndarray) -> None:
        if self._sum is None or self._sum.shape != image.shape:
            self._sum = np.zeros(image.shape, np.float64)
            self._count = 0
        self._sum += image
        self._count += 1

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if self._count < self.n or self._sum is None or self._sum.shape != image.shape:
            self._accumulate(image)
        return image - (self._sum / self._count).astype(np.float32)


class RunningAverageBackground:
    """Subtract an exponential running average of past frames (``alpha`` = update rate per frame)."""

    def __init__(self, alpha: float = 0.05) -> None:
        self.alpha = alpha
        self._mean: np.ndarray | None = None

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if self._mean is None or self._mean.shape != image.shape:
            self._mean = image.astype(np.float32, copy=True)
        out = image - self._mean
        cv2.accumulateWeighted(image, self._mean, self.alpha)
        return out


class Mog2Background:
    """Subtract OpenCV's MOG2 background image (a per-pixel Gaussian-mixture background model)."""

    def __init__(self) -> None:
        self._model = cv2.createBackgroundSubtractorMOG2(detectShadows=False)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        as_uint8 = np.clip(image * 255.0, 0, 255).astype(np.uint8)
        self._model.apply(as_uint8)
        background = self._model.getBackgroundImage()
        if background is None:
            return image.copy()
        return image - to_unit_float(background).reshape(image.shape)


class NoBackground:
    """Identity (returns the input unchanged)."""

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return image


def make_background(method: str, frames: int = 10, alpha: float = 0.05) -> BackgroundModel:
    """Build a background model by name: first_n_mean, running_average, mog2 or none."""
    if method == "first_n_mean":
        return FirstNMeanBackground(frames)
    if method == "running_average":
        return RunningAverageBackground(alpha)
    if method == "mog2":
        return Mog2Background()
    if method == "none":
        return NoBackground()
    raise PreprocessError(f"unknown background method '{method}'; valid: {', '.join(BACKGROUND_METHODS)}")


def normalize(image: np.ndarray, normalization: dict[str, Any]) -> np.ndarray:
    """Normalise a float32 H×W(×C) image: ``standardize`` (per image) or ``mean_std`` (per channel)."""
    mode = normalization.get("mode", "standardize")
    if mode == "standardize":
        mean = float(image.mean())
        std = float(image.std())
        return (image - mean) / max(std, 1e-6)
    if mode == "mean_std":
        mean = np.asarray(normalization["mean"], np.float32)
        std = np.asarray(normalization["std"], np.float32)
        return (image - mean) / std
    if mode == "none":
        return image
    raise PreprocessError(f"unknown normalisation mode '{mode}'; valid: standardize, mean_std, none")


@dataclass(frozen=True)
class PreprocessSettings(PreprocessRecipe):
    """Everything that decides the model input: the recorded :class:`~app.config.PreprocessRecipe`, the
    checkpoint's channels and normalisation, and the run-time choices of the ``preprocess`` section."""

    in_channels: int = 1
    input_size: int = 0
    normalization: tuple[tuple[str, Any], ...] = (("mode", "standardize"),)
    hologram_carrier: tuple[float, ...] = ()  # (period_px, angle_deg); empty = found from the data
    background_file: str = ""  # background hologram (run-time input, not part of the recipe)
    hologram_backend: str = "auto"  # numpy | torch | auto (torch when the model runs on CUDA); run time

    @property
    def normalization_dict(self) -> dict[str, Any]:
        return dict(self.normalization)


class Preprocessor:
    """A raw frame (H×W or H×W×3 BGR, uint8/uint16) -> float32 C×H'×W' model input (a new array).

    Stateful when background subtraction is on (one instance per stream, used from one thread).
    H'×W' is the frame size, or ``input_size``×``input_size`` when that is non-zero.
    """

    def __init__(self, settings: PreprocessSettings, background_hologram: np.ndarray | None = None) -> None:
        self.settings = settings
        self._clahe = Clahe(settings.clahe_clip_limit, settings.clahe_tile_grid) if settings.clahe else None
        self._background = make_background(settings.background, settings.background_frames,
                                           settings.background_alpha)
        self._normalization = settings.normalization_dict
        self.demodulator = make_demodulator(settings, background_hologram)
        self._on_device = False

    @property
    def on_device(self) -> bool:
        """True when the model's backend demodulates (see :meth:`device_demodulator`): frames leave here
        as 1×H×W float32 intensities."""
        return self._on_device

    def device_demodulator(self, device: str) -> Any:
        """Hand the hologram stage to the model's device: from now on this preprocessor only converts
        frames to float, and the returned :class:`app.pipeline.hologram.TorchDemodulator` (sharing this one's
        carrier, filter and background) runs in the backend."""
        from app.pipeline.hologram import TorchDemodulator

        if self.demodulator is None:
            raise PreprocessError("no hologram stage to move to the device")
        self._on_device = True
        return TorchDemodulator(self.demodulator, device=device)

    def display_image(self, tensor: np.ndarray) -> np.ndarray | None:
        """The phase picture (H×W uint8) of a tensor this preprocessor made, for the overlay; None
        without a hologram stage on the CPU (then the overlay draws on the frame itself)."""
        if self.demodulator is None or self._on_device or self.settings.input_size:
            return None
        from app.pipeline.hologram import phase_picture

        return phase_picture(tensor)

    def phase_image(self, tensor: np.ndarray) -> np.ndarray | None:
        """The wrapped phase (H×W float32 rad, background ≈ 0, sign as demodulated) of a tensor this
        preprocessor made, for the object read-outs; None without a hologram stage on the CPU at frame
        resolution."""
        if self.demodulator is None or self._on_device or self.settings.input_size:
            return None
        return np.arctan2(tensor[0], 1.0 - tensor[1]).astype(np.float32, copy=False)

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        if self._on_device:
            return np.ascontiguousarray(convert_channels(frame, 1), dtype=np.float32)[None]
        if self.demodulator is not None:
            image = self.demodulator.channels(convert_channels(frame, 1))
        else:
            image = convert_channels(frame, self.settings.in_channels)
            if self._clahe is not None:
                image = self._clahe(image)
            image = self._background(to_unit_float(image))
        size = self.settings.input_size
        if size and image.shape[:2] != (size, size):
            shrinking = image.shape[0] > size or image.shape[1] > size
            image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
        image = normalize(image, self._normalization)
        if image.ndim == 2:
            return np.ascontiguousarray(image[None], dtype=np.float32)
        return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)


def make_demodulator(settings: PreprocessSettings,
                     background_hologram: np.ndarray | None = None) -> OffAxisDemodulator | None:
    """The hologram stage ``settings`` ask for (None for ``hologram: none``).

    The background hologram is ``background_hologram`` when given, else ``settings.background_file``
    (read here, so an unreadable file fails before the first frame)."""
    if settings.hologram not in HOLOGRAM_MODES:
        raise PreprocessError(f"unknown hologram mode '{settings.hologram}'; valid: {', '.join(HOLOGRAM_MODES)}")
    if settings.hologram_backend not in HOLOGRAM_BACKENDS:
        raise PreprocessError(f"unknown hologram backend '{settings.hologram_backend}'; valid: "
                              f"{', '.join(HOLOGRAM_BACKENDS)}")
    if settings.hologram == "none":
        if settings.background_file:
            raise PreprocessError("a background hologram needs preprocess.hologram=offaxis (the checkpoint's "
                                  "preprocessing has no hologram stage)")
        return None
    carrier = None
    if settings.hologram_carrier:
        if len(settings.hologram_carrier) != 2 or settings.hologram_carrier[0] <= 2.0:
            raise PreprocessError("preprocess.hologram_carrier must be [period_px > 2, angle_deg], got "
                                  f"{list(settings.hologram_carrier)}")
        carrier = Carrier.from_period(*settings.hologram_carrier)
    if background_hologram is None and settings.background_file:
        background_hologram = load_background_hologram(settings.background_file)
    return OffAxisDemodulator(carrier, settings.hologram_filter, settings.hologram_filter_size,
                              background=background_hologram, background_fit=settings.hologram_background_fit)


def settings_from(config: PreprocessConfig, in_channels: int, normalization: dict[str, Any],
                  recorded: dict[str, Any] | None = None) -> PreprocessSettings:
    """Combine the config with what a checkpoint recorded.

    ``recorded`` is the preprocessing a model was trained with (a checkpoint's
    ``train_config["preprocess"]``); with ``config.from_checkpoint`` it wins over the config's
    CLAHE / background values, so ``--weights FILE`` alone reproduces the training input; a value the
    config changed from its default that the checkpoint overrides is named in a warning, so a
    ``--set preprocess.background=mog2`` is never ignored silently.
    Channels and normalisation always come from the checkpoint; ``input_size`` from the config.
    """
    check_hologram_channels(recorded)
    source: dict[str, Any] = {key: getattr(config, key) for key in RECIPE_KEYS}
    if config.from_checkpoint and recorded:
        defaults = type(config)()
        overridden = [f"{key}={source[key]} (checkpoint: {recorded[key]})" for key in source
                      if key in recorded and source[key] not in (recorded[key], getattr(defaults, key))]
        if overridden:
            log.warning("the checkpoint's preprocessing wins over preprocess.%s; set "
                        "preprocess.from_checkpoint=false to use the config's", ", ".join(overridden))
        source.update({key: recorded[key] for key in source if key in recorded})
    return PreprocessSettings(in_channels=in_channels, input_size=config.input_size,
                              normalization=tuple(sorted(normalization.items())),
                              hologram_carrier=tuple(config.hologram_carrier),
                              hologram_backend=config.hologram_backend,
                              background_file=config.background_file, **source)


def recipe(settings: PreprocessSettings) -> dict[str, Any]:
    """The part of ``settings`` a checkpoint records (inverse of :func:`settings_from`), with the model
    channels the hologram stage makes when it is on."""
    recorded = {key: getattr(settings, key) for key in RECIPE_KEYS}
    if settings.hologram != "none":
        recorded["hologram_channels"] = list(CHANNEL_NAMES)
    return recorded


def check_hologram_channels(recorded: dict[str, Any] | None) -> None:
    """A checkpoint trained on other hologram channels than this version makes cannot run (a recipe
    without the key is from the first hologram models, which used today's channels)."""
    channels = (recorded or {}).get("hologram_channels")
    if channels is not None and tuple(channels) != CHANNEL_NAMES:
        raise PreprocessError(f"the checkpoint was trained on hologram channels {', '.join(channels)}; this "
                              f"version makes {', '.join(CHANNEL_NAMES)}")
