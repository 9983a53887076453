"""Segmentation metrics from one confusion matrix: per-class IoU and Dice, their means, pixel accuracy.

The matrix is accumulated on the device the predictions live on with a single ``torch.bincount`` per
update (no per-pixel Python, no one-hot tensors). Rows are target classes, columns predicted classes.

A class that appears in neither the predictions nor the targets has an undefined IoU and Dice: it is
reported as NaN and left out of the means (``miou``, ``mdice``). Likewise a class absent from the
targets has an undefined accuracy and is left out of ``mean_acc``. :func:`json_safe` turns NaN into
``None`` for JSON output.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from app.errors import AppError

METRIC_KEYS = ("iou", "dice", "miou", "mdice", "pixel_acc", "mean_acc")


class MetricsError(AppError, ValueError):
    """Predictions and targets cannot be compared (shapes, class count or label values)."""


def _as_tensor(values: torch.Tensor | np.ndarray) -> torch.Tensor:
    """NumPy array or tensor -> tensor sharing memory where possible; bool becomes uint8."""
    if isinstance(values, np.ndarray):
        if not values.flags.writeable:
            values = values.copy()  # torch.from_numpy warns on read-only arrays
        values = torch.from_numpy(values)
    if not isinstance(values, torch.Tensor):
        raise MetricsError(f"expected a torch tensor or a NumPy array, got {type(values).__name__}")
    if values.dtype == torch.bool:
        return values.view(torch.uint8)
    return values


def _narrow(labels: torch.Tensor) -> torch.Tensor:
    """Integer labels -> uint8 when every value fits (class ids and 255), which makes the rest fast."""
    if labels.dtype == torch.uint8 or labels.numel() == 0:
        return labels
    if labels.is_floating_point() or labels.is_complex():
        raise MetricsError(f"labels must be integers, got {labels.dtype}")
    low, high = torch.aminmax(labels)
    if low >= 0 and high <= 255:
        return labels.to(torch.uint8)
    return labels


def _index_dtype(largest: int) -> torch.dtype:
    """The narrowest integer dtype torch.bincount accepts that holds ``largest`` (narrow = fewer bytes)."""
    if largest <= 255:
        return torch.uint8
    if largest <= torch.iinfo(torch.int16).max:
        return torch.int16
    if largest <= torch.iinfo(torch.int32).max:
        return torch.int32
    return torch.int64


class ConfusionMatrix:
    """Accumulates a ``num_classes``×``num_classes`` confusion matrix over any number of updates.

    ``update(pred, target)``: ``target`` holds class ids (N×H×W or H×W; ``ignore_index`` pixels are
    skipped); ``pred`` holds class ids of the same shape, or logits/probabilities with a class axis
    before H×W (N×C×H×W or C×H×W), which are reduced with argmax. Both may be torch tensors on any
    device or NumPy arrays, of any integer dtype (uint8 is the fastest). Inputs are never modified.
    A label outside ``[0, num_classes)`` (other than ``ignore_index``) raises :class:`MetricsError`.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise MetricsError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self._counts: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self._counts = None

    @property
    def matrix(self) -> torch.Tensor:
        """The int64 K×K matrix on the device of the first update (zeros on CPU before any update)."""
        if self._counts is None:
            return torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        return self._counts

    def merge(self, other: ConfusionMatrix) -> None:
        """Add another matrix of the same class count (e.g. a per-image one into a running total)."""
        if other.num_classes != self.num_classes:
            raise MetricsError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
        self._add(other.matrix)

    def _add(self, counts: torch.Tensor) -> None:
        if self._counts is None:
            self._counts = counts.clone()
        else:
            self._counts += counts.to(self._counts.device)

    def _rows(self, target: torch.Tensor) -> torch.Tensor:
        """Per pixel: 0 = ignored, 1..K = class 0..K-1, K+1 = out of range."""
        k = self.num_classes
        if target.dtype == torch.uint8 and self.ignore_index == 255:
            return (target + 1).clamp_(max=k + 1)  # uint8 arithmetic wraps 255 to 0
        rows = torch.where((target < 0) | (target >= k), k + 1, target.to(torch.int64) + 1)
        return rows.masked_fill_(target == self.ignore_index, 0)

    def _columns(self, pred: torch.Tensor) -> torch.Tensor:
        """Per pixel: 0..K-1 = predicted class, K = out of range."""
        k = self.num_classes
        if pred.dtype == torch.uint8:
            return pred.clamp(max=k)
        return torch.where((pred < 0) | (pred > k), k, pred.to(torch.int64))

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """Add one batch (or one image) of predictions and targets; see the class docstring."""
        pred = _as_tensor(pred)
        target = _as_tensor(target)
        k = self.num_classes
        if pred.ndim == target.ndim + 1:
            if pred.shape[-3] != k:
                raise MetricsError(f"logits have {pred.shape[-3]} channels, expected {k}")
            # argmax over a contiguous last axis is ~8× faster on the CPU than over the strided class axis.
            pred = pred.movedim(-3, -1).contiguous().argmax(dim=-1)
        if pred.shape != target.shape:
            raise MetricsError(f"prediction shape {tuple(pred.shape)} does not match target {tuple(target.shape)}")
        rows = self._rows(_narrow(target.to(pred.device).reshape(-1)))
        columns = self._columns(_narrow(pred.reshape(-1)))
        dtype = _index_dtype((k + 2) * (k + 1) - 1)
        index = rows.to(dtype).mul_(k + 1).add_(columns.to(dtype))
        counts = torch.bincount(index, minlength=(k + 2) * (k + 1)).reshape(k + 2, k + 1)
        if counts[k + 1].sum() > 0:
            raise MetricsError(f"target has labels outside [0, {k}) that are not ignore_index {self.ignore_index}")
        if counts[:, k].sum() > 0:
            raise MetricsError(f"prediction has labels outside [0, {k})")
        self._add(counts[1 : k + 1, :k])

    def compute(self) -> dict[str, Any]:
        """Scores of everything accumulated: ``iou``, ``dice`` (per-class lists), ``miou``, ``mdice``,
        ``pixel_acc``, ``mean_acc`` (floats; NaN where undefined, see the module docstring)."""
        matrix = self.matrix.to("cpu", torch.float64)
        true_pos = matrix.diagonal()
        in_target = matrix.sum(dim=1)
        in_pred = matrix.sum(dim=0)
        iou = true_pos / (in_target + in_pred - true_pos)
        dice = 2 * true_pos / (in_target + in_pred)
        class_acc = true_pos / in_target
        return {
            "iou": iou.tolist(),
            "dice": dice.tolist(),
            "miou": float(iou.nanmean()),
            "mdice": float(dice.nanmean()),
            "pixel_acc": float(true_pos.sum() / matrix.sum()),
            "mean_acc": float(class_acc.nanmean()),
        }


def json_safe(value: Any) -> Any:
    """Replace float NaN with None in nested dicts/lists (JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value
