"""Typed exceptions of the models package (kept apart so every module can raise them without cycles)."""

from __future__ import annotations

from app.errors import AppError


class ModelError(AppError, ValueError):
    """A model cannot be built as asked: unknown name, unknown option or an invalid option value."""


class CheckpointError(AppError, RuntimeError):
    """A weights file cannot be used: missing, truncated, foreign, or made for another model or class count."""
