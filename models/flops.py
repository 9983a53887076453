"""Model size and cost for benchmark tables: parameter count and GFLOPs of one forward pass.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add: convolutions and
matrix products; element-wise ops, pooling and resizing are not counted). The pass runs on the meta
device, so no arithmetic is done and even 1024×1024 inputs cost milliseconds.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers such as BatchNorm statistics excluded)."""
    return sum(parameter.numel() for parameter in model.parameters())


def count_gflops(model: nn.Module, input_shape: tuple[int, ...]) -> float:
    """GFLOPs (1e9 FLOPs) of one eval-mode forward pass on an input of ``input_shape`` (N×C×H×W)."""
    meta_state = {name: torch.empty_like(tensor, device="meta")
                  for name, tensor in [*model.named_parameters(), *model.named_buffers()]}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            functional_call(model, meta_state, (torch.empty(input_shape, device="meta"),))
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 1e9
