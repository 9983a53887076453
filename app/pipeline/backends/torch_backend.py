"""The PyTorch backend (``model.backend: torch``)."""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import nn

from app.pipeline.backends.base import BackendError, BuildRequest, check_batch

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TRACE_CACHE = 8
"""Traced graphs a :class:`TorchBackend` keeps (one per input shape, least recently used dropped)."""
_TRANSFORM_SUFFIX = " +hologram on device"


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
        host = torch.from_numpy(check_batch(batch))
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


def build(request: BuildRequest) -> TorchBackend:
    settings = request.settings
    return TorchBackend(request.model, device=settings.device, precision=settings.precision,
                        channels_last=settings.channels_last, compile=settings.compile, threads=request.threads,
                        trace=settings.trace)
