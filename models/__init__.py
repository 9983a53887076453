"""Segmentation networks (ICNet, FCN family), their registry, checkpoints, losses and ONNX export.

Public entry points: :func:`build_model` / :func:`list_models` (the registry) building
:class:`SegmentationModel` subclasses, :func:`save_checkpoint` /
:func:`load_checkpoint` with :class:`CheckpointMeta`, and the :class:`ModelError` /
:class:`CheckpointError` exceptions.
"""

from __future__ import annotations

from models.base import SegmentationModel
from models.checkpoint import CheckpointMeta, default_palette, load_checkpoint, save_checkpoint
from models.errors import CheckpointError, ModelError
from models.registry import build_model, list_models, model_options

__all__ = [
    "CheckpointError",
    "CheckpointMeta",
    "ModelError",
    "SegmentationModel",
    "build_model",
    "default_palette",
    "list_models",
    "load_checkpoint",
    "model_options",
    "save_checkpoint",
]
