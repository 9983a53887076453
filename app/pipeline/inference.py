"""The batching inference worker: preprocessed frames -> label maps at source resolution.

A *backend* (see :mod:`app.pipeline.backends`) is anything with ``name``, ``device``,
``predict(batch: float32 N×C×H×W) -> uint8 N×H×W`` and ``warmup(shape, iters)``.

The pipeline hands the worker batches of up to ``batch_size`` frames (collected by
:func:`app.pipeline.queues.collect_batch`, which waits at most ``batch_timeout_ms`` for more after the
first, so a batch never delays a frame by more than that). :class:`InferenceWorker` stacks consecutive
frames of equal shape into one backend call, and resizes each label map (nearest neighbour) back to its
frame's size when preprocessing resized it.

A model whose last class is named :data:`models.checkpoint.CONTACT_CLASS` (``contact``) draws the seams between touching objects as
that class (trained on the generator's instance maps, ``train.contact_px``). The worker hands on label
maps without it: contact pixels are given to the first object class (class 1), so masks, overlays
and statistics see objects as a two-class model draws them, and :meth:`InferenceWorker.predict_with_contacts`
returns the seams beside them (H×W bool), for the object read-out to tell touching objects apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import cv2
import numpy as np


def split_contacts(labels: np.ndarray, contact_class: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(labels with the contact class given to class 1, H×W bool seams) for a raw label map; the map
    as it is and None without a contact class."""
    if contact_class is None:
        return labels, None
    seams = cv2.compare(labels, contact_class, cv2.CMP_EQ)
    if not cv2.countNonZero(seams):
        return labels, np.zeros(labels.shape, bool)
    merged = labels.copy()
    merged[seams > 0] = 1
    return merged, seams.view(bool)


class Backend(Protocol):
    """What the worker needs from :mod:`app.pipeline.backends` (TorchBackend, OnnxBackend) or a test fake."""

    name: str
    device: str

    def predict(self, batch: np.ndarray) -> np.ndarray: ...

    def warmup(self, shape: tuple[int, ...], iters: int = 2) -> None: ...


class InferenceWorker:
    """Runs a backend on lists of C×H×W float32 tensors; returns H×W uint8 label maps per frame.

    ``warmup(chw_shape)`` runs ``warmup_iters`` untimed batches once per input shape (the pipeline calls
    it before timing starts). ``predict`` groups consecutive tensors of equal shape into one batch of
    at most ``batch_size``.
    """

    def __init__(self, backend: Backend, *, batch_size: int = 1, batch_timeout_ms: float = 5.0,
                 warmup_iters: int = 2, contact_class: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.backend = backend
        self.batch_size = batch_size
        self.batch_timeout_ms = batch_timeout_ms
        self.warmup_iters = warmup_iters
        self.contact_class = contact_class
        self._warm: set[tuple[int, ...]] = set()

    @property
    def name(self) -> str:
        return str(self.backend.name)

    def warmup(self, chw_shape: tuple[int, ...]) -> bool:
        """Warm the backend up for C×H×W inputs; returns False when it already was for this shape."""
        shape = tuple(int(s) for s in chw_shape)
        if shape in self._warm or self.warmup_iters <= 0:
            return False
        self.backend.warmup((self.batch_size, *shape), iters=self.warmup_iters)
        self._warm.add(shape)
        return True

    def predict(self, tensors: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Label maps (uint8, ``sizes[i]`` = (H, W) of frame i) for C×H×W float32 ``tensors``; a
        contact class is given to class 1 (see the module docstring)."""
        return [labels for labels, _ in self.predict_with_contacts(tensors, sizes)]

    def predict_with_contacts(self, tensors: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]]
                              ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """(label map, seams between touching objects or None) per frame (see :func:`split_contacts`)."""
        return [split_contacts(labels, self.contact_class) for labels in self._predict_raw(tensors, sizes)]

    def _predict_raw(self, tensors: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        labels: list[np.ndarray] = []
        start = 0
        while start < len(tensors):
            end = start + 1
            while (end < len(tensors) and end - start < self.batch_size
                   and tensors[end].shape == tensors[start].shape):
                end += 1
            batch = np.stack(tensors[start:end]) if end - start > 1 else tensors[start][None]
            predicted = np.asarray(self.backend.predict(np.ascontiguousarray(batch, dtype=np.float32)))
            if predicted.shape[0] != end - start:
                raise RuntimeError(f"backend returned {predicted.shape[0]} label maps for {end - start} frames")
            for offset, label_map in enumerate(predicted):
                labels.append(resize_labels(label_map, sizes[start + offset]))
            start = end
        return labels


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """H'×W' label map -> ``size`` = (H, W) uint8 by nearest neighbour (no copy when already that size)."""
    labels = labels.astype(np.uint8, copy=False)
    if labels.shape == tuple(size):
        return labels
    return cv2.resize(labels, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
