from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from app.training.metrics import METRIC_KEYS, ConfusionMatrix, MetricsError, json_safe

RNG = np.random.default_rng(0)


def reference_scores(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore: int = 255) -> dict:
    """Slow per-pixel reference: a Python loop over pixels, then the textbook formulas."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    for p, t in zip(pred.ravel().tolist(), target.ravel().tolist(), strict=True):
        if t != ignore:
            matrix[t, p] += 1
    iou, dice, acc = [], [], []
    for c in range(num_classes):
        tp = matrix[c, c]
        fp = matrix[:, c].sum() - tp
        fn = matrix[c, :].sum() - tp
        iou.append(tp / (tp + fp + fn) if tp + fp + fn else math.nan)
        dice.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan)
        acc.append(tp / (tp + fn) if tp + fn else math.nan)
    return {"iou": iou, "dice": dice, "miou": np.nanmean(iou), "mdice": np.nanmean(dice),
            "pixel_acc": np.trace(matrix) / matrix.sum(), "mean_acc": np.nanmean(acc)}


def random_pair(num_classes: int, shape=(2, 24, 20), ignore_fraction=0.15, dtype=np.uint8):
    target = RNG.integers(0, num_classes, shape).astype(dtype)
    target[RNG.random(shape) < ignore_fraction] = 255
    pred = np.where(RNG.random(shape) < 0.6, target, RNG.integers(0, num_classes, shape)).astype(dtype)
    pred[target == 255] = RNG.integers(0, num_classes, int((target == 255).sum()))
    return pred, target


def assert_scores_equal(got: dict, want: dict) -> None:
    assert set(got) == set(METRIC_KEYS)
    for key in METRIC_KEYS:
        np.testing.assert_allclose(np.asarray(got[key], float), np.asarray(want[key], float),
                                   rtol=1e-12, atol=0, equal_nan=True, err_msg=key)


@pytest.mark.parametrize("num_classes", [2, 37])
@pytest.mark.parametrize("dtype", [np.uint8, np.int64])
def test_matches_slow_reference_with_ignored_pixels(num_classes, dtype):
    pred, target = random_pair(num_classes, dtype=dtype)
    metric = ConfusionMatrix(num_classes)
    metric.update(pred, target)  # NumPy
    assert_scores_equal(metric.compute(), reference_scores(pred, target, num_classes))
    metric.reset()
    for i in range(pred.shape[0]):  # torch, one H×W image per update accumulates the same
        metric.update(torch.from_numpy(pred[i]), torch.from_numpy(target[i]))
    assert_scores_equal(metric.compute(), reference_scores(pred, target, num_classes))


def test_logits_are_reduced_with_argmax():
    num_classes = 5
    pred, target = random_pair(num_classes)
    logits = torch.randn(*pred.shape[:1], num_classes, *pred.shape[1:])
    logits.scatter_(1, torch.from_numpy(pred).long().unsqueeze(1), 10.0)
    from_logits = ConfusionMatrix(num_classes)
    from_logits.update(logits, torch.from_numpy(target))
    from_labels = ConfusionMatrix(num_classes)
    from_labels.update(pred, target)
    torch.testing.assert_close(from_logits.matrix, from_labels.matrix)
    single = ConfusionMatrix(num_classes)
    single.update(logits[0], target[0])  # C×H×W with H×W
    assert single.matrix.sum() == (target[0] != 255).sum()


def test_absent_class_is_nan_and_left_out_of_the_means():
    target = np.array([[0, 0, 1, 255]], np.uint8)
    pred = np.array([[0, 1, 1, 2]], np.uint8)  # class 2 predicted only on an ignored pixel; class 3 nowhere
    metric = ConfusionMatrix(4)
    metric.update(pred, target)
    scores = metric.compute()
    assert scores["iou"][:2] == [0.5, 0.5]
    assert math.isnan(scores["iou"][2]) and math.isnan(scores["iou"][3]) and math.isnan(scores["dice"][3])
    assert scores["miou"] == 0.5
    assert scores["mdice"] == pytest.approx(2 / 3)
    assert scores["pixel_acc"] == pytest.approx(2 / 3)
    text = json.dumps(json_safe(scores), allow_nan=False)
    assert json.loads(text)["iou"][3] is None


def test_bool_masks_and_custom_ignore_index():
    metric = ConfusionMatrix(2, ignore_index=-100)
    target = torch.tensor([[1, 0, -100]])
    metric.update(torch.tensor([[True, True, False]]), target)
    assert metric.matrix.tolist() == [[0, 1], [0, 1]]


def test_bad_input_raises():
    metric = ConfusionMatrix(2)
    with pytest.raises(MetricsError, match="outside"):
        metric.update(np.zeros((4, 4), np.uint8), np.full((4, 4), 3, np.uint8))
    with pytest.raises(MetricsError, match="outside"):
        metric.update(np.full((4, 4), 2, np.int64), np.zeros((4, 4), np.int64))
    with pytest.raises(MetricsError, match="shape"):
        metric.update(np.zeros((4, 4), np.uint8), np.zeros((4, 5), np.uint8))
    with pytest.raises(MetricsError, match="channels"):
        metric.update(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(MetricsError, match="merge"):
        metric.merge(ConfusionMatrix(3))


def test_merge_adds_matrices():
    pred, target = random_pair(3)
    total, parts = ConfusionMatrix(3), ConfusionMatrix(3)
    total.update(pred, target)
    for i in range(pred.shape[0]):
        part = ConfusionMatrix(3)
        part.update(pred[i], target[i])
        parts.merge(part)
    torch.testing.assert_close(parts.matrix, total.matrix)


@pytest.mark.gpu
def test_gpu_matches_cpu():
    pred, target = random_pair(37, shape=(2, 64, 64))
    cpu, gpu = ConfusionMatrix(37), ConfusionMatrix(37)
    cpu.update(pred, target)
    logits = torch.nn.functional.one_hot(torch.from_numpy(pred).long(), 37).permute(0, 3, 1, 2).float()
    gpu.update(logits.cuda(), target)  # NumPy target follows the prediction's device
    assert gpu.matrix.device.type == "cuda"
    torch.testing.assert_close(gpu.matrix.cpu(), cpu.matrix)
