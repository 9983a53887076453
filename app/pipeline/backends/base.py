"""What every backend shares: :class:`BackendError`, the input check, the inference thread count, and
the :class:`BackendSpec` arguments a backend's ``build`` receives. Imports no PyTorch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from app.errors import AppError
from app.pipeline.cpu import reserved_cores, usable_cores

if TYPE_CHECKING:
    from app.config import ModelConfig


class BackendError(AppError, RuntimeError):
    """A backend cannot be created or run as configured (unknown device or precision, missing file)."""


@dataclass(frozen=True)
class BuildRequest:
    """Everything a backend module's ``build(request)`` gets: the ``model`` section, the model in eval
    mode, its input channels, the weights it came from, the thread count, and where an exported graph
    goes (``onnx_path``; None = the user's cache folder, or ``model.onnx_path`` when set)."""

    settings: ModelConfig
    model: Any
    in_channels: int
    weights_path: Path
    threads: int
    onnx_path: Path | None = None


def check_batch(batch: np.ndarray) -> np.ndarray:
    if not isinstance(batch, np.ndarray) or batch.ndim != 4:
        shape = getattr(batch, "shape", None)
        raise BackendError(f"expected an N×C×H×W array, got {type(batch).__name__} with shape {shape}")
    return np.ascontiguousarray(batch, dtype=np.float32)


def inference_threads(setting: int, *, concurrent: bool) -> int:
    """CPU threads for inference from ``model.threads``: a positive value as given; 0 = auto.

    Auto leaves :func:`reserved_cores` to the other stages when inference shares the CPU with them
    (``concurrent``: the threaded pipeline, where reading, preprocessing, overlay and writers run at the
    same time) and takes every core when it runs alone (evaluation, a one-frame-at-a-time loop). A
    multi-threaded kernel whose threads are preempted by other stages stalls at every parallel region;
    on two cores one inference thread next to the other stages runs the pipeline far faster than two.
    """
    if not isinstance(setting, int) or isinstance(setting, bool) or setting < 0:
        raise BackendError(f"model.threads must be 0 (auto) or a positive number of threads, got {setting!r}")
    if setting > 0:
        return setting
    cores = usable_cores()
    return max(1, cores - reserved_cores(cores)) if concurrent else cores
