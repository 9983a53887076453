"""Cascade label guidance loss: nearest label downsampling and per-output weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.losses import MultiOutputLoss, resize_labels


def _labels() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (2, 64, 96), generator=generator)
    target[:, 10:30, 20:50] = 255  # an ignore region
    return target


@pytest.mark.parametrize("factor", [2, 4, 8, 16])
def test_labels_are_downsampled_by_nearest_sampling(factor: int) -> None:
    target = _labels()
    resized = resize_labels(target, (64 // factor, 96 // factor))
    assert resized.dtype == torch.int64
    torch.testing.assert_close(resized, target[:, ::factor, ::factor])
    assert set(resized.unique().tolist()) <= {0, 1, 2, 255}


def test_odd_sizes_keep_integer_class_ids() -> None:
    resized = resize_labels(_labels(), (9, 12))
    assert resized.shape == (2, 9, 12)
    assert set(resized.unique().tolist()) <= {0, 1, 2, 255}


def test_weighted_sum_over_outputs_at_their_resolutions() -> None:
    target = _labels()
    base = nn.CrossEntropyLoss(ignore_index=255)
    outputs = {"sub4": torch.randn(2, 3, 16, 24), "sub8": torch.randn(2, 3, 8, 12),
               "sub16": torch.randn(2, 3, 4, 6), "out": torch.randn(2, 3, 64, 96)}
    weights = {"sub16": 0.4, "sub8": 0.4, "sub4": 1.0}
    loss = MultiOutputLoss(base, weights)(outputs, target)
    expected = sum(w * base(outputs[k], target[:, :: 64 // outputs[k].shape[-2], :: 96 // outputs[k].shape[-1]])
                   for k, w in weights.items())
    torch.testing.assert_close(loss, expected)


def test_bare_tensor_is_scored_alone() -> None:
    target = _labels()
    base = nn.CrossEntropyLoss(ignore_index=255)
    logits = torch.randn(2, 3, 64, 96)
    torch.testing.assert_close(MultiOutputLoss(base, {"out": 1.0, "aux": 0.4})(logits, target), base(logits, target))


def test_missing_weighted_output_is_an_error() -> None:
    loss = MultiOutputLoss(nn.CrossEntropyLoss(ignore_index=255), {"out": 1.0, "aux": 0.4})
    with pytest.raises(ValueError, match="aux"):
        loss({"out": torch.randn(2, 3, 64, 96)}, _labels())


def test_gradients_reach_every_weighted_output() -> None:
    outputs = {"sub4": torch.randn(2, 3, 16, 24, requires_grad=True),
               "sub8": torch.randn(2, 3, 8, 12, requires_grad=True)}
    MultiOutputLoss(nn.CrossEntropyLoss(ignore_index=255), {"sub4": 1.0, "sub8": 0.4})(outputs, _labels()).backward()
    assert all(tensor.grad is not None and tensor.grad.abs().sum() > 0 for tensor in outputs.values())
