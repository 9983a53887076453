"""CLEAR-MOT on hand-made cases: perfect tracking, a swap, misses, false positives, masks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from app.training.metrics import MetricsError
from app.training.tracking_metrics import mask_ious, mot_from_centroids, mot_from_masks

# Two objects walking right, 50 px apart, over four frames.
TRUTH = [{1: (10.0 + 5 * t, 10.0), 2: (10.0 + 5 * t, 60.0)} for t in range(4)]


def relabelled(frames, mapping):
    return [{mapping[k]: xy for k, xy in frame.items()} for frame in frames]


def test_a_perfect_tracker_scores_one_whatever_its_ids():
    result = mot_from_centroids(TRUTH, relabelled(TRUTH, {1: 7, 2: 3}), max_distance_px=5)
    assert (result.mota, result.id_switches, result.false_negatives, result.false_positives) == (1.0, 0, 0, 0)
    assert result.ground_truth_objects == result.matches == 8


def test_a_swap_of_ids_counts_two_switches():
    tracked = relabelled(TRUTH[:2], {1: 1, 2: 2}) + relabelled(TRUTH[2:], {1: 2, 2: 1})
    result = mot_from_centroids(TRUTH, tracked, max_distance_px=5)
    assert result.id_switches == 2  # each ground-truth object now matches the other's id
    assert result.mota == pytest.approx(1 - 2 / 8)


def test_a_new_id_after_a_miss_is_a_switch_against_the_last_match():
    tracked = [TRUTH[0], {2: TRUTH[1][2]}, {9: TRUTH[2][1], 2: TRUTH[2][2]}, {9: TRUTH[3][1], 2: TRUTH[3][2]}]
    result = mot_from_centroids(TRUTH, tracked, max_distance_px=5)
    assert (result.false_negatives, result.false_positives, result.id_switches) == (1, 0, 1)
    assert result.mota == pytest.approx(1 - 2 / 8)


def test_misses_and_false_positives_are_counted():
    tracked = [dict(frame) for frame in TRUTH]
    del tracked[1][2]  # a miss
    tracked[2][5] = (200.0, 200.0)  # a false positive far from everything
    tracked[3][1] = (10.0 + 15 + 6, 10.0)  # beyond the distance: a miss and a false positive
    result = mot_from_centroids(TRUTH, tracked, max_distance_px=5)
    assert (result.false_negatives, result.false_positives, result.id_switches) == (2, 2, 0)
    assert result.mota == pytest.approx(1 - 4 / 8)


def test_a_previous_match_is_kept_while_it_is_within_the_distance():
    # Frame 1: hypothesis 8 is nearer to the object than its own track 7, which is still within reach.
    truth = [{1: (0.0, 0.0)}, {1: (0.0, 0.0)}]
    tracked = [{7: (0.0, 0.0)}, {7: (4.0, 0.0), 8: (1.0, 0.0)}]
    result = mot_from_centroids(truth, tracked, max_distance_px=5)
    assert (result.id_switches, result.false_positives) == (0, 1)


def test_no_ground_truth_gives_nan():
    result = mot_from_centroids([{}, {}], [{}, {1: (0.0, 0.0)}], max_distance_px=5)
    assert math.isnan(result.mota) and result.false_positives == 1


def squares(positions: dict[int, tuple[int, int]], size: int = 64, side: int = 10) -> np.ndarray:
    image = np.zeros((size, size), np.int32)
    for object_id, (x, y) in positions.items():
        image[y:y + side, x:x + side] = object_id
    return image


def test_masks_match_by_iou():
    truth = [squares({1: (5, 5), 2: (40, 40)}) for _ in range(3)]
    tracked = [squares({4: (5, 5), 5: (40, 40)}), squares({4: (40, 40), 5: (5, 5)}),
               squares({5: (5, 5), 6: (40, 48)})]  # swap; then 6 overlaps object 2 with IoU 2/18
    result = mot_from_masks(truth, tracked, min_iou=0.5)
    assert (result.id_switches, result.false_negatives, result.false_positives) == (2, 1, 1)
    assert result.mota == pytest.approx(1 - 4 / 6)


def test_mask_ious_by_hand():
    truth = squares({1: (0, 0)}, size=20)
    tracked = squares({3: (5, 0)}, size=20)
    truth_ids, tracked_ids, iou = mask_ious(truth, tracked)
    assert (truth_ids, tracked_ids) == ([1], [3])
    np.testing.assert_allclose(iou, [[50 / 150]])


def test_bad_inputs_are_refused():
    with pytest.raises(MetricsError, match="frames"):
        mot_from_centroids(TRUTH, TRUTH[:2], max_distance_px=5)
    with pytest.raises(MetricsError, match="differ in size"):
        mask_ious(np.zeros((4, 4), np.int32), np.zeros((4, 5), np.int32))
