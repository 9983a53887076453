"""Training data: folder datasets, bounding-box annotations, synthetic interferograms, augmentation.

A sample is a raw frame (H×W or H×W×3 BGR, uint8 or uint16, decoded with ``cv2.IMREAD_UNCHANGED``)
and a mask (H×W uint8 class ids, 255 = ignore). :class:`SegmentationDataset` turns it into the model
input with the live pipeline's own :class:`app.pipeline.preprocess.Preprocessor` (channels, CLAHE, background
subtraction, normalisation, over the whole frame as at inference), then takes a random crop and flips:
``(float32 C×h×w tensor, int64 h×w tensor)``.

Folder layout (``DIR``)::

    DIR/images/<name>.png            frames; subfolders are sequences (images/seqA/000001.png)
    DIR/masks/<name>.png             class ids with the same relative name (any image extension)
    DIR/boxes.csv | DIR/boxes.json   instead of masks/: rectangles per image (see read_boxes)

A frame's sequence is its subfolder under ``images/``, or else its file name without the trailing
frame number (``seqA_000123.png`` -> ``seqA``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import random
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from app.config import SynthConfig
from app.errors import AppError
from app.pipeline.preprocess import Preprocessor, PreprocessSettings
from app.synthesis import make_sequence
from app.synthesis.generator import InterferogramSequence

IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
BOX_FILES = ("boxes.csv", "boxes.json")
IGNORE_INDEX = 255
SPLITS = ("file", "sequence")
TRAIN_BACKGROUNDS = ("none", "first_n_mean")
_FRAME_NUMBER = re.compile(r"^(.*?)[_\-. ]*\d+$")


class DatasetError(AppError, ValueError):
    """A dataset folder, annotation file or sample is missing or malformed."""


@dataclass(frozen=True)
class Box:
    """An axis-aligned rectangle in pixels (x, y = top-left corner) labelled with a class id."""

    x: int
    y: int
    w: int
    h: int
    label: int = 1


@dataclass(frozen=True)
class Sample:
    """One labelled frame on disk: a mask file, or boxes to rasterise (an empty tuple = all background)."""

    image: Path
    mask: Path | None
    boxes: tuple[Box, ...]
    sequence: str


def read_image(path: Path) -> np.ndarray:
    """Decode a frame as stored (8/16-bit, gray or BGR) with ``cv2.IMREAD_UNCHANGED``."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DatasetError(f"cannot read image {path}")
    return image


def read_mask(path: Path) -> np.ndarray:
    """Decode a label image as H×W uint8 class ids (a gray PNG; equal-channel colour PNGs are accepted)."""
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise DatasetError(f"cannot read mask {path}")
    if mask.ndim == 3:
        if not (mask == mask[:, :, :1]).all():
            raise DatasetError(f"mask {path} is a colour image; store class ids as a single-channel PNG")
        mask = mask[:, :, 0]
    if mask.dtype != np.uint8:
        if mask.max() > IGNORE_INDEX:
            raise DatasetError(f"mask {path} has values above {IGNORE_INDEX}")
        mask = mask.astype(np.uint8)
    return mask


def boxes_to_mask(shape: tuple[int, int], boxes: Sequence[Box]) -> np.ndarray:
    """Rasterise boxes into an H×W uint8 mask: 0 = background, box interiors = their class (later wins).

    Boxes are clipped to the frame, so a box partly outside still labels its visible part.
    """
    height, width = shape
    mask = np.zeros((height, width), np.uint8)
    for box in boxes:
        x0, y0 = max(box.x, 0), max(box.y, 0)
        x1, y1 = min(box.x + box.w, width), min(box.y + box.h, height)
        if x1 > x0 and y1 > y0:
            mask[y0:y1, x0:x1] = box.label
    return mask


def _box_from(values: Sequence[Any], where: str) -> Box:
    try:
        numbers = [int(round(float(v))) for v in values]
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: box values must be numbers, got {list(values)}") from None
    if len(numbers) not in (4, 5):
        raise DatasetError(f"{where}: a box is x, y, w, h[, class]; got {len(numbers)} values")
    if numbers[2] <= 0 or numbers[3] <= 0:
        raise DatasetError(f"{where}: box width and height must be positive, got {numbers}")
    return Box(*numbers)


def read_boxes(path: Path) -> dict[str, list[Box]]:
    """Read rectangles per image file name from CSV or JSON.

    CSV: a header ``filename,x,y,w,h`` with an optional ``class`` column (default 1 = cell).
    JSON: ``{"name.png": [[x, y, w, h], [x, y, w, h, class], ...]}`` or a list of objects with the
    CSV's keys. File names are relative to ``images/``.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"box file not found: {path}")
    boxes: dict[str, list[Box]] = {}
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            missing = {"filename", "x", "y", "w", "h"} - set(reader.fieldnames or ())
            if missing:
                raise DatasetError(f"{path}: CSV header lacks {', '.join(sorted(missing))}")
            for line, row in enumerate(reader, start=2):
                values = [row["x"], row["y"], row["w"], row["h"]] + ([row["class"]] if row.get("class") else [])
                boxes.setdefault(row["filename"], []).append(_box_from(values, f"{path}:{line}"))
        return boxes
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: invalid JSON: {exc}") from None
    if isinstance(data, dict):
        for name, items in data.items():
            boxes[name] = [_box_from(item, f"{path}: {name}") for item in items]
    elif isinstance(data, list):
        for item in data:
            if not isinstance(item, dict) or "filename" not in item:
                raise DatasetError(f"{path}: list entries must be objects with filename, x, y, w, h[, class]")
            values = [item.get(key) for key in ("x", "y", "w", "h")] + ([item["class"]] if "class" in item else [])
            boxes.setdefault(item["filename"], []).append(_box_from(values, f"{path}: {item['filename']}"))
    else:
        raise DatasetError(f"{path}: expected a JSON object or list")
    return boxes


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def sequence_of(relative: Path) -> str:
    """The sequence a frame belongs to: its folder under images/, or its name without the frame number."""
    if len(relative.parts) > 1:
        return relative.parent.as_posix()
    match = _FRAME_NUMBER.match(relative.stem)
    return match.group(1) if match else relative.stem


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted); DIR/images is used when DIR has one."""
    folder = Path(folder)
    if (folder / "images").is_dir():
        folder = folder / "images"
    if not folder.is_dir():
        raise DatasetError(f"data folder not found: {folder}")
    images = _images_under(folder)
    if not images:
        raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return images


def find_samples(root: Path) -> list[Sample]:
    """Pair DIR/images with DIR/masks (same relative name, any extension) or with DIR/boxes.csv|json.

    Every image needs a mask; with a box file, an image without boxes is all background.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data folder not found: {root}")
    image_dir = root / "images"
    if not image_dir.is_dir():
        raise DatasetError(f"{root} has no images/ folder")
    images = list_images(image_dir)
    mask_dir = root / "masks"
    if mask_dir.is_dir():
        masks = {p.relative_to(mask_dir).with_suffix(""): p for p in _images_under(mask_dir)}
        samples, missing = [], []
        for image in images:
            relative = image.relative_to(image_dir)
            mask = masks.get(relative.with_suffix(""))
            if mask is None:
                missing.append(relative.as_posix())
            samples.append(Sample(image, mask, (), sequence_of(relative)))
        if missing:
            raise DatasetError(f"{len(missing)} image(s) in {image_dir} have no mask in {mask_dir}, "
                               f"e.g. {missing[0]}")
        return samples
    box_files = [root / name for name in BOX_FILES if (root / name).is_file()]
    if not box_files:
        raise DatasetError(f"{root} has neither a masks/ folder nor {' / '.join(BOX_FILES)}")
    boxes = read_boxes(box_files[0])
    names = {image.relative_to(image_dir).as_posix() for image in images}
    unknown = sorted(set(boxes) - names)
    if unknown:
        raise DatasetError(f"{box_files[0]} names {len(unknown)} image(s) not in {image_dir}, e.g. {unknown[0]}")
    return [Sample(image, None, tuple(boxes.get(image.relative_to(image_dir).as_posix(), ())),
                   sequence_of(image.relative_to(image_dir))) for image in images]


def split_samples(samples: Sequence[Sample], val_fraction: float, by: str = "file",
                  seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Shuffle (seeded) and split into (train, val) by file or by whole sequence.

    At least one file (sequence) goes to validation when ``val_fraction > 0`` and there are two or more.
    """
    if by not in SPLITS:
        raise DatasetError(f"unknown split '{by}'; valid: {', '.join(SPLITS)}")
    if not 0 <= val_fraction < 1:
        raise DatasetError(f"val_fraction must be in [0, 1), got {val_fraction}")
    keys = sorted({s.sequence for s in samples}) if by == "sequence" else sorted({str(s.image) for s in samples})
    if by == "sequence" and val_fraction > 0 and len(keys) < 2:
        raise DatasetError(f"split by sequence needs at least 2 sequences, found {len(keys)}; use split=file")
    random.Random(seed).shuffle(keys)
    count = min(max(round(val_fraction * len(keys)), 1), len(keys) - 1) if val_fraction > 0 and len(keys) > 1 else 0
    held_out = set(keys[:count])
    key = (lambda s: s.sequence) if by == "sequence" else (lambda s: str(s.image))
    return [s for s in samples if key(s) not in held_out], [s for s in samples if key(s) in held_out]


@dataclass(frozen=True)
class Augmentation:
    """Random geometry applied after preprocessing: a crop of ``crop`` (H, W) or none, and flips."""

    crop: tuple[int, int] | None = None
    flip: bool = False
    phase_sign_flip: bool = False  # hologram channels: negate sin φ (channel 0) half of the time

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
        """C×H×W float image and H×W mask -> cropped/flipped views (frames smaller than the crop are
        padded with zeros and ignore labels)."""
        if self.crop is not None:
            image, mask = _pad_to(image, mask, self.crop)
            height, width = mask.shape
            top = int(rng.integers(0, height - self.crop[0] + 1))
            left = int(rng.integers(0, width - self.crop[1] + 1))
            image = image[:, top : top + self.crop[0], left : left + self.crop[1]]
            mask = mask[top : top + self.crop[0], left : left + self.crop[1]]
        if self.flip:
            if rng.random() < 0.5:
                image, mask = image[:, :, ::-1], mask[:, ::-1]
            if rng.random() < 0.5:
                image, mask = image[:, ::-1], mask[::-1]
        if self.phase_sign_flip and rng.random() < 0.5:
            image = image.copy()
            image[0] *= -1.0
        return image, mask


def _pad_to(image: np.ndarray, mask: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    pad_h, pad_w = max(size[0] - mask.shape[0], 0), max(size[1] - mask.shape[1], 0)
    if not pad_h and not pad_w:
        return image, mask
    image = np.pad(image, ((0, 0), (0, pad_h), (0, pad_w)))
    mask = np.pad(mask, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_INDEX)
    return image, mask


class FrameSource(Protocol):
    """Random access to raw labelled frames, grouped into sequences."""

    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw frame and its H×W uint8 mask."""
        ...

    def sequence(self, index: int) -> str: ...


class FolderFrames:
    """Frames and masks (or boxes) of :class:`Sample` s, decoded from disk on every access."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        sample = self.samples[index]
        image = read_image(sample.image)
        mask = read_mask(sample.mask) if sample.mask is not None else boxes_to_mask(image.shape[:2], sample.boxes)
        if mask.shape != image.shape[:2]:
            raise DatasetError(f"mask of {sample.image} is {mask.shape[1]}×{mask.shape[0]}, "
                               f"the image {image.shape[1]}×{image.shape[0]}")
        return image, mask

    def sequence(self, index: int) -> str:
        return self.samples[index].sequence


def with_contacts(mask: np.ndarray, instances: np.ndarray, contact_px: int, contact_class: int,
                  object_class: int = 1) -> np.ndarray:
    """A copy of ``mask`` whose ``object_class`` pixels within ``contact_px`` px (a disc) of a pixel of
    another object (``instances``: H×W object ids, 0 = none) are ``contact_class``: the seam between
    touching or overlapping objects, which a model then learns to draw so that they can be told apart
    (the three-class target of nucleus segmentation: background, object, object contact)."""
    if contact_px < 1:
        return mask
    ids = instances.astype(np.float32)  # exact below 2^24 ids
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * contact_px + 1,) * 2)
    higher = cv2.dilate(ids, disc)  # a larger id nearby
    lower = cv2.erode(np.where(instances > 0, ids, np.float32(np.inf)), disc)  # a smaller nonzero id nearby
    contact = (instances > 0) & ((higher != ids) | (lower != ids)) & (mask == object_class)
    out = mask.copy()
    out[contact] = contact_class
    return out


class SyntheticFrames:
    """Synthetic interferogram sequences (app.synth), one per seed, ``cfg.frames`` frames each.

    Deterministic: the same seeds give the same frames. With ``cache`` every frame is rendered once and
    kept in memory (about 2 bytes per pixel); without, it is rendered on each access (about 10 ms for
    512×512), so many seeds cost no memory.

    ``endless`` makes an unbounded, seeded stream: :meth:`set_epoch` moves to new sequences every epoch
    (seed ``s + epoch * ENDLESS_SEED_STRIDE`` for each given seed ``s``; epoch 0 is the seeds given), so
    no frame is seen twice. Frames are then rendered on access, never cached.

    ``contact_px`` > 0 marks the seams between touching objects as ``contact_class`` in the masks
    (:func:`with_contacts`, from the generator's instance maps).
    """

    ENDLESS_SEED_STRIDE = 1_000_003  # epochs never reach the small seeds used for held-out evaluation

    def __init__(self, cfg: SynthConfig, seeds: Sequence[int], cache: bool = True, endless: bool = False,
                 contact_px: int = 0, contact_class: int = 2) -> None:
        if not seeds:
            raise DatasetError("synthetic data needs at least one seed")
        self.cfg = cfg
        self.contact_px = contact_px
        self.contact_class = contact_class
        self.base_seeds = list(seeds)
        self.seeds = list(seeds)
        self.endless = endless
        self._sequences: dict[int, InterferogramSequence] = {}
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cache and not endless else None
        if self._cache is not None:
            for index in range(len(self)):
                self._cache[index] = self._render(index)

    def __len__(self) -> int:
        return len(self.seeds) * self.cfg.frames

    def set_epoch(self, epoch: int) -> None:
        """Endless streams: use this epoch's sequences (no-op for a fixed set of seeds)."""
        if not self.endless:
            return
        seeds = [seed + epoch * self.ENDLESS_SEED_STRIDE for seed in self.base_seeds]
        if seeds != self.seeds:
            self.seeds = seeds
            self._sequences.clear()

    def _render(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        seed = self.seeds[index // self.cfg.frames]
        if seed not in self._sequences:
            self._sequences[seed] = make_sequence(dataclasses.replace(self.cfg, seed=seed))
        frame = self._sequences[seed].frame(index % self.cfg.frames)
        if self.contact_px:
            return frame.image, with_contacts(frame.mask, frame.instances, self.contact_px, self.contact_class)
        return frame.image, frame.mask

    def background(self, sequence: str) -> np.ndarray | None:
        """The background hologram of ``sequence`` (a name from :meth:`sequence`), None for the classic
        generator, which has none."""
        seed = int(sequence.removeprefix("seed"))
        if seed not in self._sequences:
            self._sequences[seed] = make_sequence(dataclasses.replace(self.cfg, seed=seed))
        background = getattr(self._sequences[seed], "background", None)
        return background() if background is not None else None

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        if self._cache is not None:
            return self._cache[index]
        return self._render(index)

    def sequence(self, index: int) -> str:
        return f"seed{self.seeds[index // self.cfg.frames]}"


class SegmentationDataset(Dataset):
    """Map-style dataset: index -> (float32 C×h×w input, int64 h×w target).

    Preprocessing is the live pipeline's :class:`Preprocessor` on the whole frame. With
    ``first_n_mean`` background subtraction each sequence gets its own preprocessor whose background is
    the mean of that sequence's first ``background_frames`` frames (as the live pipeline's estimate
    after that many frames). Augmentation randomness comes from ``(seed, epoch, index)`` only, so a
    sample is the same whatever the worker count or process; call :meth:`set_epoch` before each epoch.
    Masks must hold ids below ``num_classes`` or 255 (ignore).
    """

    def __init__(self, frames: FrameSource, settings: PreprocessSettings, num_classes: int,
                 augmentation: Augmentation | None = None, seed: int = 0, background_fraction: float = 0.5) -> None:
        if settings.background not in TRAIN_BACKGROUNDS:
            raise DatasetError(f"training supports background {' or '.join(TRAIN_BACKGROUNDS)}, "
                               f"not '{settings.background}'")
        if settings.input_size:
            raise DatasetError("training runs at native resolution; input_size must be 0")
        self.frames = frames
        self.settings = settings
        self.num_classes = num_classes
        self.augmentation = augmentation or Augmentation()
        self.seed = seed
        self.epoch = 0
        self.background_fraction = background_fraction
        self._preprocessors = self._build_preprocessors()

    @property
    def _per_sequence(self) -> bool:
        return self.settings.background != "none" or self.settings.hologram != "none"

    def uses_background_hologram(self, sequence: str) -> bool:
        """Whether ``sequence`` is demodulated with its background hologram (a seeded draw per sequence,
        ``background_fraction`` of them) or with the stand-in fitted to its first frame."""
        draw = np.random.default_rng([self.seed, zlib.crc32(sequence.encode())]).random()
        return draw < self.background_fraction

    def _build_preprocessors(self) -> dict[str, Preprocessor]:
        if not self._per_sequence:
            return {"": Preprocessor(self.settings)}
        members: dict[str, list[int]] = {}
        for index in range(len(self.frames)):
            members.setdefault(self.frames.sequence(index), []).append(index)
        preprocessors = {}
        for sequence, indices in members.items():
            if self.settings.hologram != "none":
                background = getattr(self.frames, "background", None)
                hologram = (background(sequence) if background is not None and self.uses_background_hologram(sequence)
                            else None)
                preprocessors[sequence] = Preprocessor(self.settings, hologram)
                continue
            first = indices[: self.settings.background_frames]
            # Background frames = what the sequence has, so the estimate is frozen after priming.
            preprocessor = Preprocessor(dataclasses.replace(self.settings, background_frames=len(first)))
            for index in first:
                preprocessor(self.frames.load(index)[0])
            preprocessors[sequence] = preprocessor
        return preprocessors

    def __getstate__(self) -> dict[str, Any]:
        # OpenCV's CLAHE object cannot be pickled (spawned workers): rebuild the preprocessors there.
        return {key: value for key, value in self.__dict__.items() if key != "_preprocessors"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._preprocessors = self._build_preprocessors()

    def set_epoch(self, epoch: int) -> None:
        """Choose the augmentation draw of this epoch (deterministic per seed, epoch and index); an
        endless synthetic source also moves to this epoch's sequences."""
        self.epoch = epoch
        set_frames_epoch = getattr(self.frames, "set_epoch", None)
        if set_frames_epoch is not None:
            first_sequence = self.frames.sequence(0)
            set_frames_epoch(epoch)
            if self._per_sequence and self.frames.sequence(0) != first_sequence:
                self._preprocessors = self._build_preprocessors()

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.frames.load(index)
        key = self.frames.sequence(index) if self._per_sequence else ""
        tensor = self._preprocessors[key](image)
        if mask.max() >= self.num_classes and not np.isin(mask, (*range(self.num_classes), IGNORE_INDEX)).all():
            raise DatasetError(f"sample {index} ({self.frames.sequence(index)}) has mask values "
                               f"{sorted(set(np.unique(mask).tolist()) - {IGNORE_INDEX})}; expected ids below "
                               f"{self.num_classes} or {IGNORE_INDEX} = ignore")
        rng = np.random.default_rng((self.seed, self.epoch, index))
        tensor, mask = self.augmentation(tensor, mask, rng)
        return (torch.from_numpy(np.ascontiguousarray(tensor)),
                torch.from_numpy(np.ascontiguousarray(mask)).long())


def worker_init(worker_id: int) -> None:
    """DataLoader worker set-up: one OpenCV thread per worker (the workers are the parallelism)."""
    cv2.setNumThreads(1)


def make_loader(dataset: Dataset, batch_size: int, *, sampler: Sampler | None = None, num_workers: int = 0,
                drop_last: bool = False, seed: int = 0) -> DataLoader:
    """A DataLoader whose workers decode with OpenCV in parallel.

    Workers start with ``forkserver``, not ``fork``: a process forked after OpenMP or OpenCV thread
    pools ran in the parent (any torch or cv2 call) can deadlock on its first parallel call.
    Every iteration draws the workers' base seed from a generator seeded with ``seed``, never from the
    global torch RNG: starting an epoch leaves the global RNG (dropout draws) as it was, so a resumed
    run, which starts its loader mid-epoch, continues exactly.
    """
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=drop_last, worker_init_fn=worker_init if num_workers else None,
                      multiprocessing_context="forkserver" if num_workers else None,
                      persistent_workers=False, generator=torch.Generator().manual_seed(seed))
