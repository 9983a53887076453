"""Test doubles and small builders shared by the pipeline, sink and CLI tests."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from app.config import Config, PipelineConfig, replace
from app.pipeline.inference import InferenceWorker
from app.pipeline.overlay import OverlayRenderer
from app.pipeline.preprocess import Preprocessor, PreprocessSettings

PALETTE = [(0, 0, 0), (0, 255, 0)]
# The real 1280×720 H.264 sample beside the checkout (../shared/data), or wherever CELLSEG_SAMPLE_VIDEO points.
VTEST = Path(os.environ.get("CELLSEG_SAMPLE_VIDEO")
             or Path(__file__).resolve().parents[2] / "shared" / "data" / "vtest.avi")


class FakeBackend:
    """Backend double: label 1 where the first channel is above its mean.

    ``delay_s`` sleeps per call (a slow model); ``fail_on`` raises when that frame index is in the batch
    (the index is read from the top-left pixel of the tensor, see :func:`indexed_frames`).
    """

    name = "fake"
    device = "cpu"

    def __init__(self, delay_s: float = 0.0, fail_on: int | None = None) -> None:
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.batch_sizes: list[int] = []
        self.warmups: list[tuple[int, ...]] = []
        self._lock = threading.Lock()

    def warmup(self, shape: tuple[int, ...], iters: int = 2) -> None:
        self.warmups.append(tuple(shape))

    def predict(self, batch: np.ndarray) -> np.ndarray:
        assert batch.dtype == np.float32 and batch.ndim == 4
        with self._lock:
            self.batch_sizes.append(batch.shape[0])
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_on is not None and self.fail_on in {int(round(v)) for v in batch[:, 0, 0, 0]}:
            raise RuntimeError(f"boom on frame {self.fail_on}")
        first = batch[:, 0]
        return (first > first.mean(axis=(1, 2), keepdims=True)).astype(np.uint8)


def raw_preprocessor() -> Preprocessor:
    """Gray, no normalisation: tensor values are the raw pixel values scaled to [0, 1]."""
    return Preprocessor(PreprocessSettings(in_channels=1, normalization=(("mode", "none"),)))


def index_preprocessor(image: np.ndarray) -> np.ndarray:
    """Keeps the frame index written by :func:`write_indexed_images` readable at pixel (0, 0)."""
    gray = image if image.ndim == 2 else image[:, :, 0]
    return gray.astype(np.float32)[None]


def write_indexed_images(folder: Path, count: int, size: int = 64, suffix: str = ".png",
                         dtype: type = np.uint8) -> list[Path]:
    """``frame0.png`` … with a disc (the object) and the frame index stored at pixel (0, 0)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        image = np.zeros((size, size), dtype)
        high = 60000 if dtype == np.uint16 else 200
        cv2.circle(image, (size // 2, size // 2), size // 4, high, -1)
        image[0, 0] = index
        path = folder / f"frame{index}{suffix}"
        assert cv2.imwrite(str(path), image)
        paths.append(path)
    return paths


def make_stages(backend: FakeBackend, batch_size: int = 1, preprocessor=None, hud: bool = False):
    worker = InferenceWorker(backend, batch_size=batch_size, batch_timeout_ms=20.0, warmup_iters=1)
    renderer = OverlayRenderer(PALETTE, alpha=0.5, contours=True, hud=hud)
    return (preprocessor or raw_preprocessor()), worker, renderer


def small_config(**sections: dict) -> Config:
    """Defaults with a small synthetic sequence (64 px, 12 frames) and no display."""
    base = replace(Config(), synth={"size": 64, "frames": 12, "num_cells": 2, "num_particles": 1,
                                    "num_dust_rings": 1},
                   output={"display": False}, pipeline={"queue_size": 4})
    return replace(base, **sections) if sections else base


def pipeline_settings(**values) -> PipelineConfig:
    return PipelineConfig(**{"queue_size": 4, "batch_timeout_ms": 20.0, "join_timeout_s": 5.0, **values})


def count_video_frames(path: Path) -> tuple[int, tuple[int, int] | None]:
    capture = cv2.VideoCapture(str(path))
    count, size = 0, None
    while True:
        ok, image = capture.read()
        if not ok:
            break
        count += 1
        size = image.shape[:2]
    capture.release()
    return count, size


def read_gif(path: Path) -> list[np.ndarray]:
    ok, animation = cv2.imreadanimation(str(path))
    assert ok, f"cannot read GIF {path}"
    return list(animation.frames)
