"""The contract every registered segmentation model keeps, in one place.

Eval mode: N×in_channels×H×W -> N×num_classes×H×W logits (a tensor). Training mode: a dict with "out"
(the same logits) and one entry per name in ``aux_names`` (auxiliary logits at their own resolution),
the inputs of :class:`models.losses.MultiOutputLoss` with ``default_loss_weights``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from models.heads import resize


class SegmentationModel(nn.Module):
    """Base of the registered networks: records how it was built and builds the output of ``forward``.

    Holds no parameters, so subclasses keep their state_dict keys. A subclass computes coarse logits and
    returns ``self.outputs(logits, x.shape[-2:], auxiliary)``.
    """

    def __init__(self, num_classes: int, in_channels: int, *, aux_names: tuple[str, ...] = (),
                 default_loss_weights: Mapping[str, float]) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.aux_names = aux_names
        self.default_loss_weights = dict(default_loss_weights)

    def upsample(self, logits: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
        """N×K×h×w -> N×K×size logits; bilinear here, a subclass with its own upsampling overrides it."""
        return resize(logits, size)

    def outputs(self, logits: Tensor, size: tuple[int, int] | torch.Size,
                auxiliary: Callable[[], Mapping[str, Tensor]] | None = None) -> Tensor | dict[str, Tensor]:
        """Logits upsampled to ``size`` (H, W of the input); in training a dict of those as "out" and the
        auxiliary outputs, which ``auxiliary`` computes only then (its keys are ``aux_names``)."""
        out = self.upsample(logits, size)
        if not self.training:
            return out
        return {"out": out, **(auxiliary() if auxiliary is not None else {})}
