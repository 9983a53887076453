"""ONNX export with dynamic batch/height/width, and a parity check against PyTorch.

The exported graph has one input ``input`` (N×C×H×W float) and two outputs: ``logits`` (N×K×H×W) and
``labels`` (N×H×W uint8, the argmax), so a runtime can fetch only the label map and keep the argmax on
its device. The TorchScript-based exporter (``dynamo=False``) is used: it keeps H and W symbolic through
the size computations of the models here and exports a model in about a second where the
torch.export-based one took several times longer for the same graph (torch 2.13).

Parity with PyTorch is judged relative to the logit scale (:func:`parity_tolerance`), because bilinear
resizing cannot agree exactly. ONNX Runtime's ``Resize`` puts output pixel x of an in→out resize at
(x + ½) / fl(out/in) − ½, PyTorch's kernel at fma(fl(in/out), x + ½, −½): two float32 roundings that
differ by up to ~2^-24·in pixels and agree exactly only when in/out is a power of two. Every other
operator (convolutions, the pyramid pooling's matrix products) agrees to ~1e-7 of its values. On random
input the sample-point difference moves the logits by about 2^-24·L times their scale at a frame side of
L pixels: the shipped ICNet (logits up to ~10) differs by 1.2e-4 at 203×317, 1.2e-3 at 1441×1919,
and 5e-6 at 1440×1920, whose ratios are all powers of two. Writing the resizes out as gathers and
interpolations in both runtimes makes them agree to 1e-5, but costs 5-26 % more time per frame on the CPU.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from app.errors import AppError, first_line

if TYPE_CHECKING:
    import onnxruntime

INPUT_NAME = "input"
LOGITS_NAME = "logits"
LABELS_NAME = "labels"

# The allowed max |logits_onnx - logits_torch|, as fractions of the logit scale (see parity_tolerance).
FP32_RTOL = 1e-4  # accumulation order in convolutions and matrix products, with a wide margin
RESIZE_RTOL_PER_PIXEL = 2.0**-22  # bilinear sample points: 4× the ~2^-24 per pixel of side measured
FP16_RTOL = 1e-2


class ExportError(AppError, RuntimeError):
    """A model could not be exported to ONNX or the exported file could not be run."""


class _LogitsAndLabels(nn.Module):
    """Wraps a segmentation model: N×C×H×W -> (N×K×H×W logits, N×H×W uint8 labels)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.model(x)
        return logits, logits.argmax(dim=1).to(torch.uint8)


def _export_copy(model: nn.Module, fp16: bool) -> nn.Module:
    """An eval-mode CPU copy (half precision for fp16), leaving the caller's model untouched."""
    model = copy.deepcopy(getattr(model, "_orig_mod", model)).cpu().eval()
    return model.half() if fp16 else model.float()


def export_onnx(model: nn.Module, out_path: str | Path, *, in_channels: int, opset: int = 17,
                dynamic: bool = True, static_hw: tuple[int, int] | None = None, fp16: bool = False,
                sample_hw: tuple[int, int] = (64, 64)) -> Path:
    """Export ``model`` (eval mode) to ``out_path`` atomically and return the path.

    ``dynamic``: batch, height and width are symbolic (any H, W ≥ 32 at run time). ``static_hw=(H, W)``
    fixes height and width (batch stays dynamic while ``dynamic`` is true), which some runtimes optimise
    better. ``fp16`` exports a half-precision graph (input and logits float16). Failure -> ExportError.
    """
    out_path = Path(out_path)
    height, width = static_hw if static_hw is not None else sample_hw
    wrapped = _LogitsAndLabels(_export_copy(model, fp16))
    dtype = torch.float16 if fp16 else torch.float32
    sample = torch.randn(1, in_channels, height, width, dtype=dtype)
    dynamic_axes = None
    if dynamic:
        spatial = {} if static_hw is not None else {2: "height", 3: "width"}
        dynamic_axes = {INPUT_NAME: {0: "batch", **spatial}, LOGITS_NAME: {0: "batch", **spatial},
                        LABELS_NAME: {0: "batch", **{k - 1: v for k, v in spatial.items()}}}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter warns that it is deprecated and that traced sizes are tensors.
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapped, (sample,), str(temporary), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[LOGITS_NAME, LABELS_NAME],
                              dynamic_axes=dynamic_axes, do_constant_folding=True)
        os.replace(temporary, out_path)
    except Exception as exc:  # the exporter raises many types; callers need one
        raise ExportError(f"ONNX export to {out_path} failed: {first_line(exc)}") from exc
    finally:
        temporary.unlink(missing_ok=True)
    return out_path


def cpu_session(onnx_path: str | Path, threads: int = 0) -> onnxruntime.InferenceSession:
    """ONNX Runtime session on the CPU provider, quiet (warnings and info not logged)."""
    import onnxruntime as ort  # imported here: building and training models does not need it

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Idle worker threads sleep instead of spinning: on a busy machine spinning threads starve the rest.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads > 0:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])


def parity_tolerance(size: tuple[int, int], logit_scale: float, fp16: bool = False) -> float:
    """The largest max |logits_onnx - logits_torch| accepted at input size (H, W) for logits whose largest
    magnitude is ``logit_scale`` (taken as at least 1).

    fp32: ``FP32_RTOL`` plus ``RESIZE_RTOL_PER_PIXEL`` × max(H, W) of the scale (1.8e-4 of it at 203×317,
    5.6e-4 at 1920 pixels a side), covering the resize rounding explained above with a margin of four;
    real export faults exceed it by far (the shipped model exported with ``align_corners=True``, nearest
    or bicubic resizing: 1,100-3,600 times the tolerance). fp16: ``FP16_RTOL`` of the scale.
    """
    scale = max(1.0, logit_scale)
    if fp16:
        return FP16_RTOL * scale
    return scale * (FP32_RTOL + RESIZE_RTOL_PER_PIXEL * max(size))


@dataclass(frozen=True)
class Parity:
    """ONNX Runtime against PyTorch on one random batch of input size ``size`` (H, W)."""

    size: tuple[int, int]
    max_abs_diff: float  # max |logits_onnx - logits_torch|
    logit_scale: float  # max |logits_torch|
    tolerance: float  # parity_tolerance(size, logit_scale, fp16)

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def check_parity(model: nn.Module, onnx_path: str | Path, sizes: Sequence[tuple[int, int]] = ((64, 64),),
                 batch: int = 2, fp16: bool = False, seed: int = 0) -> list[Parity]:
    """Compare ONNX Runtime with PyTorch on a random N×C×H×W batch at each (H, W) in ``sizes``.

    The reference is ``model`` in fp32 eval mode on the CPU; ONNX Runtime runs on the CPU. For an fp16
    graph the input is rounded to float16 for both, so the difference measures the graph alone.
    """
    reference = _export_copy(model, fp16=False)
    try:
        session = cpu_session(onnx_path)
    except Exception as exc:  # ONNX Runtime raises its own exception types
        raise ExportError(f"{onnx_path}: ONNX Runtime cannot load it ({first_line(exc)})") from exc
    graph_input = session.get_inputs()[0]
    channels = graph_input.shape[1]
    generator = torch.Generator().manual_seed(seed)
    results = []
    for height, width in sizes:
        x = torch.randn(batch, channels, height, width, generator=generator)
        if fp16:
            x = x.half()
        try:
            logits = session.run([LOGITS_NAME], {graph_input.name: x.numpy()})[0]
        except Exception as exc:  # ONNX Runtime raises its own exception types
            raise ExportError(f"{onnx_path}: ONNX Runtime failed at {height}×{width} "
                              f"({first_line(exc)})") from exc
        with torch.inference_mode():
            expected = reference(x.float()).numpy()
        if logits.shape != expected.shape:
            raise ExportError(f"{onnx_path}: at {height}×{width} ONNX Runtime returns logits of shape "
                              f"{logits.shape}, PyTorch {expected.shape} (a size frozen while exporting?)")
        scale = float(np.max(np.abs(expected)))
        results.append(Parity((height, width), float(np.max(np.abs(logits.astype(np.float32) - expected))),
                              scale, parity_tolerance((height, width), scale, fp16)))
    return results


def verify_onnx(model: nn.Module, onnx_path: str | Path, sizes: Sequence[tuple[int, int]] = ((64, 64),),
                batch: int = 2, fp16: bool = False, seed: int = 0) -> float:
    """Max |logits_onnx - logits_torch| over :func:`check_parity` at every size in ``sizes``."""
    return max(result.max_abs_diff for result in check_parity(model, onnx_path, sizes, batch, fp16, seed))
