"""Scoring a checkpoint: frames from a labelled folder, synthetic sequences or any source, run through
the live pipeline's preprocessing (one preprocessor per sequence, in frame order) and a backend into a
:class:`~app.training.metrics.ConfusionMatrix`. The command line is :mod:`app.evaluate`."""

from __future__ import annotations

import csv
import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.config import Config
from app.errors import AppError
from app.files import atomic_open
from app.pipeline.inference import Backend, resize_labels, split_contacts
from app.pipeline.preprocess import Preprocessor, PreprocessSettings
from app.training.datasets import FolderFrames, find_samples
from app.training.metrics import ConfusionMatrix, json_safe


class EvaluateError(AppError, ValueError):
    """Evaluation cannot run as asked (e.g. a mask that does not fit its frame)."""


@dataclass(frozen=True)
class EvalFrame:
    """A frame to score: ``image`` as decoded (H×W or H×W×3 BGR, 8/16-bit), ``mask`` H×W uint8 or None."""

    name: str
    sequence: str
    image: np.ndarray
    mask: np.ndarray | None
    background: np.ndarray | None = None  # the sequence's background hologram, if the hologram stage uses one


@dataclass
class EvaluationResult:
    """Scores (None without labels), predicted pixel fraction per class, per-image rows and speed."""

    scores: dict[str, Any] | None
    fractions: list[float]
    frames: int
    labelled_frames: int
    seconds: float  # preprocessing + inference, summed over frames (decoding excluded)
    per_image: list[dict[str, Any]] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def folder_frames(root: Path) -> Iterator[EvalFrame]:
    """Labelled frames of a dataset folder (images/ with masks/ or boxes), in file order."""
    frames = FolderFrames(find_samples(root))
    image_dir = root / "images"
    for index, sample in enumerate(frames.samples):
        image, mask = frames.load(index)
        yield EvalFrame(sample.image.relative_to(image_dir).with_suffix("").as_posix(), sample.sequence, image, mask)


def synthetic_frames(cfg: Config, sequences: int = 1, with_background: bool = False) -> Iterator[EvalFrame]:
    """The sequences ``cfg.synth`` describes (seeds seed … seed+sequences-1, frames, size) with their exact
    ground truth; ``with_background`` hands each sequence's background hologram to the hologram stage."""
    from app.synthesis import make_sequence

    for seed in range(cfg.synth.seed, cfg.synth.seed + sequences):
        seq = make_sequence(dataclasses.replace(cfg.synth, seed=seed))
        background = getattr(seq, "background", None)
        if with_background and background is None:
            raise EvaluateError("--with-background needs the propagated generator (synth.generator=propagated "
                                "or synth.randomize=true): the classic one records no background hologram")
        hologram = background() if with_background else None
        for frame in seq:
            yield EvalFrame(f"seed{seed}_{frame.index:06d}", f"seed{seed}", frame.image, frame.mask, hologram)


def unlabelled_frames(uri: str, cfg: Config) -> Iterator[EvalFrame]:
    """Frames of a video, image folder or glob (through app.pipeline.sources, unpaced), without labels."""
    from app.pipeline.sources import open_source

    with open_source(uri, cfg, realtime=False) as source:
        for frame in source:
            yield EvalFrame(f"{frame.index:06d}", "", frame.image, None)


def has_labels(path: Path) -> bool:
    """Whether ``path`` is a dataset folder with masks/ or a box file (else: prediction only)."""
    return path.is_dir() and (path / "images").is_dir() and (
        (path / "masks").is_dir() or any((path / name).is_file() for name in ("boxes.csv", "boxes.json")))


class Evaluator:
    """Preprocess, predict and score frames one at a time (frames may differ in size)."""

    def __init__(self, backend: Backend, settings: PreprocessSettings, num_classes: int,
                 contact_class: int | None = None) -> None:
        self.backend = backend
        self.contact_class = contact_class  # a model's contact class is scored as class 1
        self.settings = settings
        self.num_classes = num_classes

    def run(self, frames: Iterable[EvalFrame],
            on_prediction: Callable[[EvalFrame, np.ndarray], None] | None = None) -> EvaluationResult:
        """Score every frame; ``on_prediction(frame, labels)`` sees each H×W uint8 prediction."""
        total = ConfusionMatrix(self.num_classes)
        counts = np.zeros(self.num_classes, np.int64)
        preprocessors: dict[str, Preprocessor] = {}
        per_image: list[dict[str, Any]] = []
        seconds, count, labelled = 0.0, 0, 0
        for frame in frames:
            if frame.sequence not in preprocessors:
                preprocessors[frame.sequence] = Preprocessor(self.settings, frame.background)
            started = time.perf_counter()
            tensor = preprocessors[frame.sequence](frame.image)
            if count == 0:  # the first prediction is slow (allocations, lazy init): warm up off the clock
                paused = time.perf_counter()
                self.backend.warmup((1, *tensor.shape))
                started += time.perf_counter() - paused
            labels = self.backend.predict(tensor[None])[0]
            labels = split_contacts(resize_labels(labels, frame.image.shape[:2]), self.contact_class)[0]
            seconds += time.perf_counter() - started
            count += 1
            counts += np.bincount(labels.ravel(), minlength=self.num_classes)[: self.num_classes]
            row: dict[str, Any] = {"name": frame.name}
            if frame.mask is not None:
                if frame.mask.shape != labels.shape:
                    raise EvaluateError(f"{frame.name}: mask {frame.mask.shape} does not match the frame "
                                        f"{labels.shape}")
                image_matrix = ConfusionMatrix(self.num_classes)
                image_matrix.update(labels, frame.mask)
                total.merge(image_matrix)
                labelled += 1
                scores = image_matrix.compute()
                row.update({key: scores[key] for key in ("miou", "mdice", "pixel_acc")})
                row.update({f"iou_{c}": value for c, value in enumerate(scores["iou"])})
            pixels = labels.size
            row.update({f"fraction_{c}": float(n) / pixels
                        for c, n in enumerate(np.bincount(labels.ravel(), minlength=self.num_classes))})
            per_image.append(row)
            if on_prediction is not None:
                on_prediction(frame, labels)
        if count == 0:
            raise EvaluateError("no frames to evaluate")
        return EvaluationResult(total.compute() if labelled else None, (counts / counts.sum()).tolist(), count,
                                labelled, seconds, per_image)


def format_scores(result: EvaluationResult, class_names: list[str] | tuple[str, ...]) -> str:
    """A per-class table (IoU, Dice, predicted fraction) and the means, as text."""
    width = max(12, *(len(name) for name in class_names))
    lines = [f"{'class':<{width}}  {'IoU':>7}  {'Dice':>7}  {'predicted':>9}"]

    def number(value: float | None) -> str:
        return "    n/a" if value is None or np.isnan(value) else f"{value:7.4f}"

    for index, name in enumerate(class_names):
        iou = result.scores["iou"][index] if result.scores else None
        dice = result.scores["dice"][index] if result.scores else None
        lines.append(f"{name:<{width}}  {number(iou)}  {number(dice)}  {100 * result.fractions[index]:8.2f}%")
    if result.scores:
        scores = result.scores
        lines.append(f"{'mean':<{width}}  {number(scores['miou'])}  {number(scores['mdice'])}")
        lines.append(f"pixel accuracy {scores['pixel_acc']:.4f}, mean class accuracy {scores['mean_acc']:.4f}")
    lines.append(f"{result.frames} frames ({result.labelled_frames} labelled), {result.fps:.1f} fps "
                 f"(preprocessing + inference)")
    return "\n".join(lines)


def write_per_image(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_open(path, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(json_safe(rows))
