"""Inference backends: a batch of preprocessed frames -> logits or label maps, on PyTorch or ONNX Runtime.

Both backends share one interface:

* ``name`` / ``device``: what runs where, for logs and the HUD (e.g. "torch cuda:0 fp16", "cuda");
* ``infer(batch)``: float32 N×C×H×W -> float32 N×K×H×W logits (host memory);
* ``predict(batch)``: float32 N×C×H×W -> uint8 N×H×W label map, the argmax taken on the device so only
  the labels cross back to the host;
* ``warmup(shape, iters)``: run a few zero batches so the first real frame does not pay for
  kernel selection, allocation or compilation.


:data:`BACKENDS` is the registry: backend name -> the module that implements it, whose
``build(BuildRequest)`` makes one. Modules are imported on first use, so naming the backends (CLI
``choices``) does not load PyTorch or ONNX Runtime. A new backend is one module with ``build`` plus one
line here.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from app.pipeline.backends.base import BackendError, BuildRequest, inference_threads

if TYPE_CHECKING:
    from app.config import ModelConfig

__all__ = ["BACKENDS", "BackendError", "BuildRequest", "create_backend", "inference_threads"]

BACKENDS: Mapping[str, str] = MappingProxyType({
    "torch": "app.pipeline.backends.torch_backend",
    "onnx": "app.pipeline.backends.onnx_backend",
})


def create_backend(model_cfg: ModelConfig, model: Any, in_channels: int, weights_path: str | Path, *,
                   concurrent: bool = True, onnx_path: str | Path | None = None) -> Any:
    """The backend ``model_cfg.backend`` names, built by its module from the config.

    ``concurrent``: inference shares the CPU with other pipeline stages (picks the automatic thread
    count, see :func:`inference_threads`); False for a backend that runs alone, such as evaluation.
    ``onnx_path``: where an ONNX backend exports the graph (default: ``model.onnx_path``, else the user's
    cache folder, keyed by the weights' content; see :func:`app.pipeline.backends.onnx_backend.build`).
    """
    module = BACKENDS.get(model_cfg.backend)
    if module is None:
        raise BackendError(f"unknown backend '{model_cfg.backend}'; valid: {', '.join(BACKENDS)}")
    threads = inference_threads(model_cfg.threads, concurrent=concurrent)
    request = BuildRequest(model_cfg, model, in_channels, Path(weights_path), threads,
                           None if onnx_path is None else Path(onnx_path))
    return importlib.import_module(module).build(request)
