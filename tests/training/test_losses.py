from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from app.training.losses import LOSS_NAMES, AsymmetricLoss, LossError, build_loss, cascade_weights

IGNORE = 255


def batch(num_classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, num_classes, 8, 8, generator=generator)
    target = torch.randint(0, num_classes, (2, 8, 8), generator=generator)
    target[:, :2] = IGNORE
    return logits, target


ALL_LOSSES = [*LOSS_NAMES, "asl-sigmoid"]


def make(name: str) -> torch.nn.Module:
    if name == "asl-sigmoid":
        return build_loss("asl", asl_activation="sigmoid")
    return build_loss(name)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_finite_with_gradient(name):
    logits, target = batch()
    logits.requires_grad_(True)
    loss = make(name)(logits, target)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_ignored_pixels_change_nothing(name):
    logits, target = batch()
    changed = logits.clone()
    changed[:, :, :2] = 50 * torch.randn_like(changed[:, :, :2])  # only where target is ignored
    loss_fn = make(name)
    torch.testing.assert_close(loss_fn(changed, target), loss_fn(logits, target))
    changed.requires_grad_(True)
    loss_fn(changed, target).backward()
    assert changed.grad[:, :, :2].abs().max() == 0


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_better_prediction_lowers_the_loss(name):
    logits, target = batch()
    labels = torch.where(target == IGNORE, 0, target)
    good = logits + 5 * F.one_hot(labels, 3).permute(0, 3, 1, 2)
    loss_fn = make(name)
    assert loss_fn(good, target) < loss_fn(logits, target)


def test_asl_sigmoid_neutral_is_binary_cross_entropy():
    logits, target = batch(num_classes=4)
    valid = target != IGNORE
    one_hot = F.one_hot(torch.where(valid, target, 0), 4).permute(0, 3, 1, 2).float()
    bce = F.binary_cross_entropy_with_logits(logits, one_hot, reduction="none").sum(1)[valid].mean()
    asl = AsymmetricLoss(gamma_pos=0, gamma_neg=0, clip=0, activation="sigmoid")(logits, target)
    torch.testing.assert_close(asl, bce, rtol=1e-5, atol=1e-6)


def test_asl_softmax_neutral_is_twice_cross_entropy_for_two_classes():
    logits, target = batch(num_classes=2)
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE)
    asl = AsymmetricLoss(gamma_pos=0, gamma_neg=0, clip=0, activation="softmax")(logits, target)
    torch.testing.assert_close(asl, 2 * ce, rtol=1e-5, atol=1e-6)


def test_asl_focusing_down_weights_easy_negatives():
    logits, target = batch(num_classes=2)
    neutral = AsymmetricLoss(gamma_pos=0, gamma_neg=0, clip=0)(logits, target)
    focused = AsymmetricLoss(gamma_pos=0, gamma_neg=4, clip=0.05)(logits, target)
    assert focused < neutral


def test_class_weights_reach_cross_entropy():
    logits, target = batch()
    weighted = build_loss("ce", class_weights=[1.0, 2.0, 0.5])(logits, target)
    expected = F.cross_entropy(logits, target, weight=torch.tensor([1.0, 2.0, 0.5]), ignore_index=IGNORE)
    torch.testing.assert_close(weighted, expected)


def test_bad_settings_raise():
    with pytest.raises(LossError, match="valid"):
        build_loss("focal")
    with pytest.raises(LossError, match="activation"):
        AsymmetricLoss(activation="tanh")
    with pytest.raises(LossError):
        AsymmetricLoss(clip=1.5)


def test_cascade_weights():
    icnet = {"sub16": 0.4, "sub8": 0.4, "sub4": 1.0}
    assert cascade_weights(icnet, (0.1, 0.2, 0.7)) == {"sub16": 0.1, "sub8": 0.2, "sub4": 0.7}
    assert cascade_weights({"out": 1.0, "aux": 0.5}, (0.1, 0.2, 0.7)) == {"out": 1.0, "aux": 0.5}
    with pytest.raises(LossError):
        cascade_weights(icnet, (1.0,))
