"""Inference backends: a batch of preprocessed frames -> logits or label maps, on PyTorch or ONNX Runtime.

Both backends share one interface:

* ``name`` / ``device``: what runs where, for logs and the HUD (e.g. "torch cuda:0 fp16", "cuda");
* ``infer(batch)``: float32 N×C×H×W -> float32 N×K×H×W logits (host memory);
* ``predict(batch)``: float32 N×C×H×W -> uint8 N×H×W label map, the argmax taken on the device so only
  the labels cross back to the host;
* ``warmup(shape, iters)``: run a few zero batches so the first real frame does not pay for
  kernel selection, allocation or compilation.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from app.errors import AppError
from app.pipeline.cpu import reserved_cores, usable_cores
from models.onnx_export import LABELS_NAME, LOGITS_NAME, ExportError, export_onnx

if TYPE_CHECKING:
    from app.config import ModelConfig
    from models import CheckpointMeta

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BACKENDS = ("torch", "onnx")
TRACE_CACHE = 8
_TRANSFORM_SUFFIX = " +hologram on device"
"""Traced graphs a :class:`TorchBackend` keeps (one per input shape, least recently used dropped)."""


class BackendError(AppError, RuntimeError):
    """A backend cannot be created or run as configured (unknown device or precision, missing file)."""


def _check_batch(batch: np.ndarray) -> np.ndarray:
    if not isinstance(batch, np.ndarray) or batch.ndim != 4:
        shape = getattr(batch, "shape", None)
        raise BackendError(f"expected an N×C×H×W array, got {type(batch).__name__} with shape {shape}")
    return np.ascontiguousarray(batch, dtype=np.float32)


def resolve_torch_device(device: str) -> torch.device:
    """"auto" -> CUDA when available, else CPU; "cpu", "cuda", "cuda:N" as given (CUDA must exist)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise BackendError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"device '{device}' requested but CUDA is not available (use device auto or cpu)")
    if resolved.type not in ("cpu", "cuda"):
        raise BackendError(f"unsupported device '{device}'; use auto, cpu, cuda or cuda:N")
    return resolved


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


class TorchBackend:
    """Runs a PyTorch model under ``torch.inference_mode``.

    On CUDA: fp16/bf16 autocast when asked (on the CPU precision stays fp32, where autocast brings no
    speed), input copied through a reused pinned host buffer with a non-blocking transfer. Optional
    channels-last memory format (faster convolutions on tensor cores) and ``torch.compile``. The model
    itself is put in eval mode and moved to the device (not copied: a second copy would double memory).

    ``trace`` (default on) runs the model as a frozen TorchScript trace, one per input shape (up to
    :data:`TRACE_CACHE` shapes kept): the trace executes in C++ without holding Python's GIL, so the
    pipeline's other threads keep running while a frame is inferred (an eager forward takes the GIL for
    every operator and stalls them), and freezing folds batch norms into convolutions (about 20-30 %
    faster on the CPU). A model that cannot be traced falls back to eager execution with a warning.
    Tracing is skipped under ``torch.compile`` and for fp16/bf16 autocast.

    ``threads`` > 0 sets PyTorch's intra-op thread count on the CPU. That count is global to the
    process, so it is (re)applied before every batch: two backends with different counts in one process
    (the benchmark's pipeline and naive loop) each run with their own, as long as they take turns.
    """

    def __init__(self, model: nn.Module, device: str = "auto", precision: str = "fp32",
                 channels_last: bool = True, compile: bool = False, threads: int = 0,
                 trace: bool = True) -> None:
        if precision not in PRECISIONS:
            raise BackendError(f"unknown precision '{precision}'; valid: {', '.join(PRECISIONS)}")
        self._device = resolve_torch_device(device)
        on_gpu = self._device.type == "cuda"
        self.precision = precision if on_gpu else "fp32"
        self._channels_last = channels_last
        model = model.eval().to(self._device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self._model = torch.compile(model) if compile else model
        self._pinned: torch.Tensor | None = None
        self.threads = threads if self._device.type == "cpu" and threads > 0 else 0
        self.trace = trace and not compile and self.precision == "fp32"
        self._traces: OrderedDict[tuple[Any, ...], torch.jit.ScriptModule] = OrderedDict()
        self.name = (f"torch {self.device} {self.precision}{' compiled' if compile else ''}"
                     f"{' traced' if self.trace else ''}")
        self._input_transform: Any = None

    def set_input_transform(self, transform: Any) -> None:
        """Run ``transform`` (None: no transform) (an object with ``channels(N×H×W tensor) -> N×C×H×W`` and ``out_channels``)
        on the device before the model: the hologram stage on the GPU, so raw frames cross to the device
        once and their field channels never come back to the host."""
        self._input_transform = transform
        self.name = self.name.removesuffix(_TRANSFORM_SUFFIX) + (_TRANSFORM_SUFFIX if transform is not None else "")

    @property
    def device(self) -> str:
        return str(self._device)

    def _to_device(self, batch: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(_check_batch(batch))
        if self._device.type != "cuda":
            return host
        if self._pinned is None or self._pinned.shape != host.shape:
            self._pinned = torch.empty(host.shape, dtype=torch.float32, pin_memory=True)
        # The copy into the pinned buffer is synchronous, so reusing it for the next batch is safe.
        self._pinned.copy_(host)
        return self._pinned.to(self._device, non_blocking=True)

    def _logits(self, batch: np.ndarray) -> torch.Tensor:
        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        x = self._to_device(batch)
        if self._input_transform is not None:
            x = self._input_transform.channels(x[:, 0])
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = (torch.autocast("cuda", dtype=PRECISIONS[self.precision]) if self.precision != "fp32"
                    else contextlib.nullcontext())
        with autocast:
            return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.trace:
            return self._model(x)
        key = (tuple(x.shape), x.dtype, x.is_contiguous(memory_format=torch.channels_last))
        graph = self._traces.get(key)
        if graph is None:
            try:
                with warnings.catch_warnings():
                    # TorchScript is deprecated upstream but still the only GIL-free eager-free path that
                    # needs no compiler; if a future torch drops it, the fallback below runs eagerly.
                    warnings.filterwarnings("ignore", category=DeprecationWarning)
                    graph = torch.jit.freeze(torch.jit.trace(self._model, x, check_trace=False))
            except Exception as exc:  # noqa: BLE001 - any tracing failure means: run eagerly
                warnings.warn(f"{type(self._model).__name__} cannot be traced ({str(exc).strip()[:200]}); "
                              "running it eagerly", RuntimeWarning, stacklevel=2)
                self.trace = False
                self.name = self.name.removesuffix(" traced")
                return self._model(x)
            self._traces[key] = graph
            while len(self._traces) > TRACE_CACHE:
                self._traces.popitem(last=False)
        else:
            self._traces.move_to_end(key)
        return graph(x)

    @torch.inference_mode()
    def infer(self, batch: np.ndarray) -> np.ndarray:
        """float32 N×C×H×W -> float32 N×K×H×W logits."""
        return self._logits(batch).float().cpu().numpy()

    @torch.inference_mode()
    def predict(self, batch: np.ndarray) -> np.ndarray:
        """float32 N×C×H×W -> uint8 N×H×W class ids."""
        return self._logits(batch).argmax(dim=1).to(torch.uint8).cpu().numpy()

    def warmup(self, shape: tuple[int, ...], iters: int = 2) -> None:
        """Run ``iters`` zero batches of ``shape`` (N×C×H×W) and wait for the device.

        With an input transform the zeros go to the model alone (in the channels it expects): the
        transform's start-up (the hologram carrier) needs a real frame."""
        if self._input_transform is not None:
            zeros = torch.zeros((shape[0], self._input_transform.out_channels, *shape[2:]), device=self._device)
            if self._channels_last:
                zeros = zeros.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                for _ in range(iters):
                    self._forward(zeros)
        else:
            zeros = np.zeros(shape, np.float32)
            for _ in range(iters):
                self.predict(zeros)
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)


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
            raise BackendError(f"{path}: ONNX Runtime cannot load it ({str(exc).strip().splitlines()[0]})") \
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
        x = _check_batch(batch).astype(self._input_dtype, copy=False)
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


def create_backend(model_cfg: ModelConfig, model: nn.Module, meta: CheckpointMeta,
                   weights_path: str | Path, *, concurrent: bool = True) -> TorchBackend | OnnxBackend:
    """The backend ``model_cfg.backend`` asks for, set up from the config.

    ``concurrent``: inference shares the CPU with other pipeline stages (picks the automatic thread
    count, see :func:`inference_threads`); False for a backend that runs alone, such as evaluation.

    For ``onnx`` with an empty ``onnx_path`` the model is exported next to the weights
    (``weights.with_suffix(".onnx")``) when that file is missing or older than the weights.
    """
    threads = inference_threads(model_cfg.threads, concurrent=concurrent)
    if model_cfg.backend == "torch":
        return TorchBackend(model, device=model_cfg.device, precision=model_cfg.precision,
                            channels_last=model_cfg.channels_last, compile=model_cfg.compile, threads=threads,
                            trace=model_cfg.trace)
    if model_cfg.backend != "onnx":
        raise BackendError(f"unknown backend '{model_cfg.backend}'; valid: {', '.join(BACKENDS)}")
    if model_cfg.onnx_path:
        onnx_path = Path(model_cfg.onnx_path)
    else:
        weights = Path(weights_path)
        onnx_path = weights.with_suffix(".onnx")
        weights_mtime = weights.stat().st_mtime if weights.exists() else 0.0
        if not onnx_path.exists() or onnx_path.stat().st_mtime < weights_mtime:
            try:
                export_onnx(model, onnx_path, in_channels=meta.in_channels)
            except ExportError as exc:
                raise BackendError(str(exc)) from None
    return OnnxBackend(onnx_path, threads=threads, device=model_cfg.device,
                       precision=model_cfg.precision)
