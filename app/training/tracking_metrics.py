"""CLEAR-MOT tracking accuracy (Bernardin & Stiefelhagen 2008): MOTA and identity switches.

Per frame, ground-truth objects are matched one to one with tracked objects: first, a pair matched in
the previous frame stays matched while it is still within the threshold (the metric's correspondence
persistence); the rest by linear assignment on the distance (``1 − IoU`` for masks) among pairs
within the threshold. Then

- a ground-truth object left unmatched is a miss (FN), a tracked object left unmatched a false
  positive (FP);
- a match whose tracked id differs from the one the same ground-truth object had at its previous
  match (however many frames ago) is an identity switch (IDSW);
- MOTA = 1 − (FN + FP + IDSW) / GT, GT the ground-truth objects over all frames (NaN when there are none).

Two ways to say which objects match: centroids within ``max_distance_px`` (:func:`mot_from_centroids`)
or masks with IoU ≥ ``min_iou`` (:func:`mot_from_masks`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from app.training.metrics import MetricsError

_NO_MATCH = 1e9


@dataclass(frozen=True)
class MotResult:
    """CLEAR-MOT counts over a sequence; ``mota`` in (−∞, 1], NaN without ground truth."""

    mota: float
    id_switches: int
    false_negatives: int
    false_positives: int
    ground_truth_objects: int
    matches: int


class _Accumulator:
    """The running CLEAR-MOT counts, fed one frame at a time with a cost matrix between ids."""

    def __init__(self) -> None:
        self.last_match: dict[int, int] = {}  # ground-truth id -> tracked id at its latest match
        self.previous_pairs: dict[int, int] = {}  # matches of the previous frame
        self.id_switches = self.false_negatives = self.false_positives = self.ground_truth = self.matches = 0

    def frame(self, truth_ids: Sequence[int], tracked_ids: Sequence[int], cost: np.ndarray, feasible: np.ndarray) -> None:
        """``cost``/``feasible``: (len(truth_ids), len(tracked_ids)); only feasible pairs may match."""
        truth_index = {t: i for i, t in enumerate(truth_ids)}
        tracked_index = {h: j for j, h in enumerate(tracked_ids)}
        pairs: dict[int, int] = {}
        for truth, tracked in self.previous_pairs.items():
            i, j = truth_index.get(truth), tracked_index.get(tracked)
            if i is not None and j is not None and feasible[i, j]:
                pairs[truth] = tracked
        free_rows = [i for i, t in enumerate(truth_ids) if t not in pairs]
        taken = set(pairs.values())
        free_cols = [j for j, h in enumerate(tracked_ids) if h not in taken]
        if free_rows and free_cols:
            sub = np.where(feasible[np.ix_(free_rows, free_cols)], cost[np.ix_(free_rows, free_cols)], _NO_MATCH)
            for r, c in zip(*linear_sum_assignment(sub), strict=True):
                if sub[r, c] < _NO_MATCH:
                    pairs[truth_ids[free_rows[r]]] = tracked_ids[free_cols[c]]
        for truth, tracked in pairs.items():
            if self.last_match.get(truth, tracked) != tracked:
                self.id_switches += 1
            self.last_match[truth] = tracked
        self.ground_truth += len(truth_ids)
        self.matches += len(pairs)
        self.false_negatives += len(truth_ids) - len(pairs)
        self.false_positives += len(tracked_ids) - len(pairs)
        self.previous_pairs = pairs

    def result(self) -> MotResult:
        errors = self.false_negatives + self.false_positives + self.id_switches
        mota = 1.0 - errors / self.ground_truth if self.ground_truth else float("nan")
        return MotResult(mota, self.id_switches, self.false_negatives, self.false_positives, self.ground_truth,
                         self.matches)


def _check_lengths(ground_truth: Sequence[object], tracked: Sequence[object]) -> None:
    if len(ground_truth) != len(tracked):
        raise MetricsError(f"ground truth has {len(ground_truth)} frames, the tracking {len(tracked)}")


def mot_from_centroids(ground_truth: Sequence[Mapping[int, Sequence[float]]],
                       tracked: Sequence[Mapping[int, Sequence[float]]], max_distance_px: float) -> MotResult:
    """CLEAR-MOT over frames of ``{id: (x, y)}`` (px); a pair matches within ``max_distance_px``."""
    _check_lengths(ground_truth, tracked)
    counts = _Accumulator()
    for truth, hypotheses in zip(ground_truth, tracked, strict=True):
        truth_xy = np.array([truth[k] for k in truth], np.float64).reshape(-1, 2)
        tracked_xy = np.array([hypotheses[k] for k in hypotheses], np.float64).reshape(-1, 2)
        distance = np.linalg.norm(truth_xy[:, None, :] - tracked_xy[None, :, :], axis=-1)
        counts.frame(list(truth), list(hypotheses), distance, distance <= max_distance_px)
    return counts.result()


def mask_ious(truth: np.ndarray, tracked: np.ndarray) -> tuple[list[int], list[int], np.ndarray]:
    """IoU between the objects of two H×W id images (0 = background): their ids and the (g, h) IoUs."""
    if truth.shape != tracked.shape:
        raise MetricsError(f"id images differ in size: {truth.shape} and {tracked.shape}")
    truth_ids, truth_flat = np.unique(truth, return_inverse=True)
    tracked_ids, tracked_flat = np.unique(tracked, return_inverse=True)
    joint = np.bincount(truth_flat.ravel() * len(tracked_ids) + tracked_flat.ravel(),
                        minlength=len(truth_ids) * len(tracked_ids)).reshape(len(truth_ids), len(tracked_ids))
    truth_keep, tracked_keep = truth_ids != 0, tracked_ids != 0
    inter = joint[np.ix_(truth_keep, tracked_keep)]
    union = joint.sum(axis=1)[truth_keep][:, None] + joint.sum(axis=0)[tracked_keep][None, :] - inter
    return truth_ids[truth_keep].tolist(), tracked_ids[tracked_keep].tolist(), inter / np.maximum(union, 1)


def mot_from_masks(ground_truth: Sequence[np.ndarray], tracked: Sequence[np.ndarray], min_iou: float = 0.5) -> MotResult:
    """CLEAR-MOT over frames of H×W id images (pixel = object id, 0 = background); a pair matches with
    IoU ≥ ``min_iou``."""
    _check_lengths(ground_truth, tracked)
    counts = _Accumulator()
    for truth, hypotheses in zip(ground_truth, tracked, strict=True):
        truth_ids, tracked_ids, iou = mask_ious(truth, hypotheses)
        counts.frame(truth_ids, tracked_ids, 1.0 - iou, (iou >= min_iou) & (iou > 0))
    return counts.result()
