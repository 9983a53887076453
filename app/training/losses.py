"""Per-pixel segmentation losses: cross-entropy, the asymmetric loss, Dice, and their combinations.

Every loss maps logits N×K×H×W and a target N×H×W (int64 class ids, ``ignore_index`` = not labelled)
to a scalar; ignored pixels contribute nothing, neither to the value nor to the gradient. Models with
auxiliary outputs (ICNet's cascade) are trained with ``models.losses.MultiOutputLoss`` wrapped around
one of these, see :func:`build_loss`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from app.errors import AppError

LOSS_NAMES = ("ce", "asl", "dice", "ce+dice")
ASL_ACTIVATIONS = ("softmax", "sigmoid")


class LossError(AppError, ValueError):
    """An unknown loss name or an invalid loss setting."""


def _valid_one_hot(target: torch.Tensor, num_classes: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Target N×H×W -> (one-hot N×K×H×W float, valid-pixel mask N×1×H×W float)."""
    valid = target != ignore_index
    labels = torch.where(valid, target, 0)
    one_hot = F.one_hot(labels, num_classes).permute(0, 3, 1, 2).to(torch.float32)
    return one_hot, valid.unsqueeze(1).to(torch.float32)


class AsymmetricLoss(nn.Module):
    """The asymmetric loss (Ridnik et al., ICCV 2021) applied per pixel, one-vs-all over the K classes.

    For each pixel and class k with probability p_k and one-hot label y_k::

        loss = -Σ_k [ y_k (1 - p_k)^gamma_pos log(p_k) + (1 - y_k) p_m^gamma_neg log(1 - p_m) ],
        p_m = max(p_k - clip, 0)

    averaged over the labelled pixels. ``gamma_neg > gamma_pos`` down-weights the many easy negatives
    (background pixels vastly outnumber cell pixels); the probability margin ``clip`` discards very
    easy negatives entirely. ``activation="softmax"`` (the default, for single-label segmentation)
    takes p from a softmax over classes; ``"sigmoid"`` uses independent per-class sigmoids as in the
    paper's multi-label setting. At gamma_pos = gamma_neg = clip = 0 the sigmoid form is exactly the
    per-class binary cross-entropy summed over classes, and for K = 2 the softmax form is exactly twice
    the cross-entropy.
    """

    def __init__(self, gamma_pos: float = 0.0, gamma_neg: float = 4.0, clip: float = 0.05,
                 ignore_index: int = 255, activation: str = "softmax", eps: float = 1e-8) -> None:
        super().__init__()
        if activation not in ASL_ACTIVATIONS:
            raise LossError(f"unknown ASL activation '{activation}'; valid: {', '.join(ASL_ACTIVATIONS)}")
        if gamma_pos < 0 or gamma_neg < 0 or not 0 <= clip < 1:
            raise LossError("ASL needs gamma_pos >= 0, gamma_neg >= 0 and 0 <= clip < 1")
        self.gamma_pos = gamma_pos
        self.gamma_neg = gamma_neg
        self.clip = clip
        self.ignore_index = ignore_index
        self.activation = activation
        self.eps = eps

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.activation == "softmax":
            log_prob = F.log_softmax(logits, dim=1)
        else:
            log_prob = F.logsigmoid(logits)
        prob = log_prob.exp()
        positive, valid = _valid_one_hot(target, logits.shape[1], self.ignore_index)
        shifted = (prob - self.clip).clamp(min=0) if self.clip > 0 else prob
        log_not = torch.log((1 - shifted).clamp(min=self.eps))
        loss_pos = log_prob
        loss_neg = log_not
        if self.gamma_pos > 0:
            loss_pos = loss_pos * (1 - prob).pow(self.gamma_pos)
        if self.gamma_neg > 0:
            loss_neg = loss_neg * shifted.pow(self.gamma_neg)
        per_pixel = -(positive * loss_pos + (1 - positive) * loss_neg).sum(dim=1, keepdim=True)
        return (per_pixel * valid).sum() / valid.sum().clamp(min=1)


class DiceLoss(nn.Module):
    """1 − mean over classes of the soft Dice ``(2Σpy + s) / (Σp + Σy + s)`` on softmax probabilities,
    with sums over the batch and all labelled pixels (``s`` = ``smooth`` keeps absent classes finite)."""

    def __init__(self, ignore_index: int = 255, smooth: float = 1.0) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        prob = F.softmax(logits.float(), dim=1)
        one_hot, valid = _valid_one_hot(target, logits.shape[1], self.ignore_index)
        prob = prob * valid
        dims = (0, 2, 3)
        overlap = (prob * one_hot).sum(dims)
        total = prob.sum(dims) + one_hot.sum(dims)
        return 1 - ((2 * overlap + self.smooth) / (total + self.smooth)).mean()


class SumLoss(nn.Module):
    """The sum of several losses of the same (logits, target)."""

    def __init__(self, *losses: nn.Module) -> None:
        super().__init__()
        self.losses = nn.ModuleList(losses)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum((loss(logits, target) for loss in self.losses), logits.new_zeros(()))


def build_loss(name: str, *, class_weights: Sequence[float] | None = None, ignore_index: int = 255,
               asl_gamma_pos: float = 0.0, asl_gamma_neg: float = 4.0, asl_clip: float = 0.05,
               asl_activation: str = "softmax") -> nn.Module:
    """A per-pixel loss by name: ``ce`` (optionally class-weighted), ``asl``, ``dice`` or ``ce+dice``."""
    weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
    if name == "ce":
        return nn.CrossEntropyLoss(weight=weight, ignore_index=ignore_index)
    if name == "asl":
        return AsymmetricLoss(asl_gamma_pos, asl_gamma_neg, asl_clip, ignore_index, asl_activation)
    if name == "dice":
        return DiceLoss(ignore_index)
    if name == "ce+dice":
        return SumLoss(nn.CrossEntropyLoss(weight=weight, ignore_index=ignore_index), DiceLoss(ignore_index))
    raise LossError(f"unknown loss '{name}'; valid: {', '.join(LOSS_NAMES)}")


def cascade_weights(default_weights: Mapping[str, float], aux_weights: Sequence[float]) -> dict[str, float]:
    """Loss weight per model output: ICNet's ``sub16``/``sub8``/``sub4`` take ``aux_weights`` in that
    order (the config's ``train.aux_weights``); any other model keeps its own ``default_loss_weights``."""
    cascade = ("sub16", "sub8", "sub4")
    if set(cascade) <= set(default_weights):
        if len(aux_weights) != len(cascade):
            raise LossError(f"aux_weights needs {len(cascade)} values (1/16, 1/8, 1/4), got {len(aux_weights)}")
        return dict(zip(cascade, map(float, aux_weights), strict=True))
    return dict(default_weights)
