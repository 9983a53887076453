"""The batching inference worker: preprocessed frames -> label maps at source resolution.

A *backend* (see :mod:`app.pipeline.backends`) is anything with ``name``, ``device``,
``predict(batch: float32 N×C×H×W) -> uint8 N×H×W`` and ``warmup(shape, iters)``.

:func:`collect_batch` takes up to ``batch_size`` items from a queue: it waits (stop-aware) for the
first one, then for at most ``batch_timeout_ms`` for more, so a batch never delays a frame by more than
that. :class:`InferenceWorker` stacks consecutive frames of equal shape into one backend call, and
resizes each label map (nearest neighbour) back to its frame's size when preprocessing resized it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

import cv2
import numpy as np

_POLL_S = 0.05


class Backend(Protocol):
    """What the worker needs from :mod:`app.pipeline.backends` (TorchBackend, OnnxBackend) or a test fake."""

    name: str
    device: str

    def predict(self, batch: np.ndarray) -> np.ndarray: ...

    def warmup(self, shape: tuple[int, ...], iters: int = 2) -> None: ...


class Stopped(Exception):
    """Raised by stop-aware queue helpers when the pipeline's stop event is set."""


def queue_get(source: queue.Queue[Any], stop: threading.Event, timeout_s: float | None = None) -> Any:
    """Blocking ``get`` that wakes every 50 ms to check ``stop`` (raises :class:`Stopped`).

    With ``timeout_s`` it raises ``queue.Empty`` after that long without an item.
    """
    deadline = None if timeout_s is None else time.perf_counter() + timeout_s
    while True:
        if stop.is_set():
            raise Stopped
        wait = _POLL_S if deadline is None else min(_POLL_S, deadline - time.perf_counter())
        if wait <= 0:
            return source.get_nowait()
        try:
            return source.get(timeout=wait)
        except queue.Empty:
            if deadline is not None and time.perf_counter() >= deadline:
                raise


def collect_batch(source: queue.Queue[Any], stop: threading.Event, batch_size: int,
                  batch_timeout_ms: float, is_end: Any) -> tuple[list[Any], bool]:
    """Up to ``batch_size`` items: wait for the first, then at most ``batch_timeout_ms`` for the rest.

    Returns ``(items, end_seen)``; the end marker (``is_end(item)`` true) is not included in ``items``.
    Raises :class:`Stopped` when ``stop`` is set while waiting for the first item.
    """
    first = queue_get(source, stop)
    if is_end(first):
        return [], True
    items = [first]
    deadline = time.perf_counter() + batch_timeout_ms / 1000.0
    while len(items) < batch_size:
        remaining = deadline - time.perf_counter()
        try:
            item = source.get_nowait() if remaining <= 0 else queue_get(source, stop, remaining)
        except queue.Empty:
            break
        if is_end(item):
            return items, True
        items.append(item)
    return items, False


class InferenceWorker:
    """Runs a backend on lists of C×H×W float32 tensors; returns H×W uint8 label maps per frame.

    ``warmup(chw_shape)`` runs ``warmup_iters`` untimed batches once per input shape (the pipeline calls
    it before timing starts). ``predict`` groups consecutive tensors of equal shape into one batch of
    at most ``batch_size``.
    """

    def __init__(self, backend: Backend, *, batch_size: int = 1, batch_timeout_ms: float = 5.0,
                 warmup_iters: int = 2) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.backend = backend
        self.batch_size = batch_size
        self.batch_timeout_ms = batch_timeout_ms
        self.warmup_iters = warmup_iters
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
        """Label maps (uint8, ``sizes[i]`` = (H, W) of frame i) for C×H×W float32 ``tensors``."""
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
