"""What every sink shares: the :class:`Rendered` item it writes, the :class:`Sink` protocol, the
:class:`SinkSpec` a sink module registers, :class:`SinkError`, and checking an output path up front."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from app.errors import AppError
from app.pipeline.frames import Frame

if TYPE_CHECKING:
    from app.config import OutputConfig


class SinkError(AppError, OSError):
    """An output cannot be created or written (message is one line for the user)."""


@dataclass(frozen=True)
class Rendered:
    """One finished frame: the source frame, its H×W uint8 labels, the BGR overlay, latency so far (ms)."""

    frame: Frame
    labels: np.ndarray
    overlay: np.ndarray
    latency_ms: float


class Sink(Protocol):
    path: Path

    def write(self, item: Rendered) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class SinkSpec:
    """How a sink plugs in: the ``output.<config_key>`` path that turns it on, its CLI flag, and
    ``open(path, output_config, class_names) -> Sink``. ``bench_name`` is the file the benchmark writes."""

    config_key: str
    flag: str
    metavar: str
    help: str
    open: Callable[[str | Path, OutputConfig, Sequence[str]], Sink]
    bench_name: str


def prepare_output(path: str | Path) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SinkError(f"cannot create folder {path.parent}: {exc.strerror or exc}") from exc
    if not os.access(path.parent, os.W_OK):
        raise SinkError(f"cannot write to folder {path.parent}")
    return path
