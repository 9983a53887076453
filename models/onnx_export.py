"""ONNX export with dynamic batch/height/width, and a parity check against PyTorch.

The exported graph has one input ``input`` (N×C×H×W float) and two outputs: ``logits`` (N×K×H×W) and
``labels`` (N×H×W uint8, the argmax), so a runtime can fetch only the label map and keep the argmax on
its device. The TorchScript-based exporter (``dynamo=False``) is used: it keeps H and W symbolic through
the size computations of the models here, matches PyTorch to ~1e-7, and exports a model in about a second
where the torch.export-based one took several times longer for the same graph (torch 2.13).
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    import onnxruntime

INPUT_NAME = "input"
LOGITS_NAME = "logits"
LABELS_NAME = "labels"


class ExportError(RuntimeError):
    """A model could not be exported to ONNX or the exported file could not be run."""


class _LogitsAndLabels(nn.Module):
    """Wraps a segmentation model: N×C×H×W -> (N×K×H×W logits, N×H×W uint8 labels)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.model(x)
        return logits, logits.argmax(dim=1).to(torch.uint8)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
        raise ExportError(f"ONNX export to {out_path} failed: {_first_line(exc)}") from exc
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


def verify_onnx(model: nn.Module, onnx_path: str | Path, sizes: Sequence[tuple[int, int]] = ((64, 64),),
                batch: int = 2, fp16: bool = False, seed: int = 0) -> float:
    """Max |logits_onnx - logits_torch| over random N×C×H×W inputs at each (H, W) in ``sizes``.

    The reference is ``model`` in fp32 eval mode on the CPU; ONNX Runtime runs on the CPU. For an fp16
    graph the input is rounded to float16 for both, so the difference measures the graph alone.
    """
    reference = _export_copy(model, fp16=False)
    try:
        session = cpu_session(onnx_path)
    except Exception as exc:  # ONNX Runtime raises its own exception types
        raise ExportError(f"{onnx_path}: ONNX Runtime cannot load it ({_first_line(exc)})") from exc
    graph_input = session.get_inputs()[0]
    channels = graph_input.shape[1]
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for height, width in sizes:
        x = torch.randn(batch, channels, height, width, generator=generator)
        if fp16:
            x = x.half()
        try:
            logits = session.run([LOGITS_NAME], {graph_input.name: x.numpy()})[0]
        except Exception as exc:  # ONNX Runtime raises its own exception types
            raise ExportError(f"{onnx_path}: ONNX Runtime failed at {height}×{width} "
                              f"({_first_line(exc)})") from exc
        with torch.inference_mode():
            expected = reference(x.float()).numpy()
        worst = max(worst, float(np.max(np.abs(logits.astype(np.float32) - expected))))
    return worst
