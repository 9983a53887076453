"""The ONNX Runtime backend (``model.backend: onnx``): the model exported by :mod:`models.onnx_export`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.errors import first_line
from app.pipeline.backends.base import BackendError, BuildRequest, check_batch
from app.pipeline.backends.torch_backend import PRECISIONS, resolve_torch_device
from app.resources import cache_dir, content_key
from models.onnx_export import LABELS_NAME, LOGITS_NAME, ExportError, export_onnx

log = logging.getLogger(__name__)


def onnx_providers(device: str = "auto") -> list[str]:
    """Execution providers to ask for, best first: TensorRT -> CUDA -> CPU when a GPU is present and
    ONNX Runtime was built with them; CPU only otherwise (asking for absent GPU providers makes ONNX
    Runtime log errors on every session)."""
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device != "auto":
        resolve_torch_device(device)  # validates the name and that CUDA exists
    available = ort.get_available_providers()
    gpu = torch.cuda.is_available() and "CUDAExecutionProvider" in available
    if device != "auto" and not gpu:
        raise BackendError(f"device '{device}' requested but no CUDA-capable ONNX Runtime / GPU is available")
    if not gpu:
        return ["CPUExecutionProvider"]
    return [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
            if p in available]


class OnnxBackend:
    """Runs an exported ONNX graph with ONNX Runtime (see :mod:`models.onnx_export` for its inputs/outputs).

    A graph with a ``labels`` output gets its argmax computed by ONNX Runtime on its device; a graph
    without one falls back to a host argmax. ``threads`` > 0 sets the intra-op thread count.
    ``precision="fp16"`` lets TensorRT build fp16 engines (other providers run the graph as exported).
    """

    def __init__(self, onnx_path: str | Path, threads: int = 0, device: str = "auto",
                 precision: str = "fp32") -> None:
        import onnxruntime as ort

        path = Path(onnx_path)
        if not path.is_file():
            raise BackendError(f"{path}: ONNX file not found")
        if precision not in PRECISIONS:
            raise BackendError(f"unknown precision '{precision}'; valid: {', '.join(PRECISIONS)}")
        device_id = int(device.split(":", 1)[1]) if device.startswith("cuda:") else 0
        providers = onnx_providers(device)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.threads = threads if threads > 0 else 0
        if threads > 0:
            options.intra_op_num_threads = threads
        provider_options: list[dict[str, Any]] = []
        for provider in providers:
            if provider == "TensorrtExecutionProvider":
                # Engines take minutes to build; cache them next to the model for the next start.
                provider_options.append({"device_id": device_id, "trt_fp16_enable": precision == "fp16",
                                         "trt_engine_cache_enable": True,
                                         "trt_engine_cache_path": str(path.parent / "trt_cache")})
            elif provider == "CUDAExecutionProvider":
                provider_options.append({"device_id": device_id})
            else:
                provider_options.append({})
        try:
            self._session = ort.InferenceSession(str(path), sess_options=options, providers=providers,
                                                 provider_options=provider_options)
        except Exception as exc:  # ONNX Runtime raises its own exception types
            raise BackendError(f"{path}: ONNX Runtime cannot load it ({first_line(exc)})") \
                from None
        inputs = self._session.get_inputs()
        self._input_name = inputs[0].name
        self._input_dtype = np.float16 if inputs[0].type == "tensor(float16)" else np.float32
        outputs = [output.name for output in self._session.get_outputs()]
        self._logits_name = LOGITS_NAME if LOGITS_NAME in outputs else outputs[0]
        self._labels_name = LABELS_NAME if LABELS_NAME in outputs else None
        active = self._session.get_providers()[0]
        self.device = "cuda" if active in ("TensorrtExecutionProvider", "CUDAExecutionProvider") else "cpu"
        self.name = f"onnx {active.removesuffix('ExecutionProvider').lower()}"

    def _run(self, output: str, batch: np.ndarray) -> np.ndarray:
        x = check_batch(batch).astype(self._input_dtype, copy=False)
        return self._session.run([output], {self._input_name: x})[0]

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """float32 N×C×H×W -> float32 N×K×H×W logits."""
        return self._run(self._logits_name, batch).astype(np.float32, copy=False)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """float32 N×C×H×W -> uint8 N×H×W class ids."""
        if self._labels_name is None:
            return self.infer(batch).argmax(axis=1).astype(np.uint8)
        return self._run(self._labels_name, batch)

    def warmup(self, shape: tuple[int, ...], iters: int = 2) -> None:
        """Run ``iters`` zero batches of ``shape`` (N×C×H×W)."""
        zeros = np.zeros(shape, np.float32)
        for _ in range(iters):
            self.predict(zeros)


def cached_graph(weights_path: Path) -> Path:
    """Where the graph exported from ``weights_path`` is cached: the user's cache folder
    (:func:`app.resources.cache_dir`), named after the weights and keyed by their content, so that
    changed weights get a new graph and the weights' own folder (inside an installed package, perhaps
    read-only) is never written to."""
    if not weights_path.is_file():
        raise BackendError(f"{weights_path}: weights file not found (the ONNX graph is exported from it); "
                           "or run a graph of your own with model.onnx_path")
    return cache_dir() / "onnx" / f"{weights_path.stem}-{content_key(weights_path)}.onnx"


def build(request: BuildRequest) -> OnnxBackend:
    """An ONNX Runtime session on ``model.onnx_path`` when set (used as it is), else on the graph at
    ``request.onnx_path`` (exported when missing or older than the weights), else on the graph cached for
    these weights (:func:`cached_graph`, exported when missing). One log line names the graph."""
    settings = request.settings
    if request.onnx_path is None and settings.onnx_path:
        onnx_path = Path(settings.onnx_path)
        log.info("ONNX graph: %s (model.onnx_path)", onnx_path)
    else:
        onnx_path = request.onnx_path or cached_graph(request.weights_path)
        weights_mtime = request.weights_path.stat().st_mtime if request.weights_path.exists() else 0.0
        if onnx_path.exists() and onnx_path.stat().st_mtime >= weights_mtime:
            log.info("ONNX graph: %s (exported earlier from %s)", onnx_path, request.weights_path)
        else:
            try:
                onnx_path.parent.mkdir(parents=True, exist_ok=True)
                export_onnx(request.model, onnx_path, in_channels=request.in_channels)
            except (ExportError, OSError) as exc:
                raise BackendError(f"cannot export the ONNX graph to {onnx_path}: {first_line(exc)}") from None
            log.info("ONNX graph: exported %s to %s", request.weights_path, onnx_path)
    return OnnxBackend(onnx_path, threads=request.threads, device=settings.device, precision=settings.precision)
