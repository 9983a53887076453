"""Losses over a model's named outputs: ICNet's cascade label guidance and FCN's auxiliary loss.

Labels are brought to each output's resolution by NEAREST sampling, never bilinear: interpolating class
ids would invent classes between neighbours (e.g. 0 and 2 -> 1) and blend the 255 = ignore label into
real ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def resize_labels(target: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """N×H×W int64 labels -> N×size labels by nearest sampling (row floor(i·H/h), column floor(j·W/w))."""
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    # float32 holds every label id exactly (ids are far below 2**24); interpolate has no integer kernel.
    resized = F.interpolate(target[:, None].float(), size=tuple(size), mode="nearest")
    return resized[:, 0].long()


class MultiOutputLoss(nn.Module):
    """Weighted sum of ``base_loss`` over named outputs, each against labels resized to its resolution.

    ``outputs`` is a model's training output (dict name -> N×K×h×w logits) or a bare N×K×h×w tensor,
    which is scored alone with weight 1. ``target`` is N×H×W int64 with 255 = ignore (as far as
    ``base_loss`` ignores it, e.g. ``nn.CrossEntropyLoss(ignore_index=255)``). Outputs without a weight are
    not scored (e.g. ICNet's "out", which is "sub4" upsampled); a weighted name that the outputs lack is
    a ValueError. Returns a scalar.
    """

    def __init__(self, base_loss: Callable[[Tensor, Tensor], Tensor], weights: Mapping[str, float]) -> None:
        super().__init__()
        if not weights:
            raise ValueError("MultiOutputLoss needs at least one output weight")
        self.base_loss = base_loss
        self.weights = dict(weights)

    def forward(self, outputs: Mapping[str, Tensor] | Tensor, target: Tensor) -> Tensor:
        if isinstance(outputs, Tensor):
            return self.base_loss(outputs, resize_labels(target, outputs.shape[-2:]))
        missing = [name for name in self.weights if name not in outputs]
        if missing:
            raise ValueError(f"loss weights name outputs {missing} that the model did not return "
                             f"(it returned {sorted(outputs)})")
        total = target.new_zeros((), dtype=torch.float32)
        for name, weight in self.weights.items():
            if weight:
                logits = outputs[name]
                total = total + weight * self.base_loss(logits, resize_labels(target, logits.shape[-2:]))
        return total
