"""cellseg-live: real-time segmentation of microscopy video. ``from app import Segmenter`` is the
Python API (:mod:`app.api`); it is imported on first use, so ``import app`` stays light."""

from __future__ import annotations

from typing import Any

__all__ = ["Segmenter"]


def __getattr__(name: str) -> Any:
    if name == "Segmenter":
        from app.api import Segmenter

        return Segmenter
    raise AttributeError(f"module 'app' has no attribute '{name}'")
