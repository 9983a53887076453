"""Training: datasets from the recipe, the :class:`Trainer` loop (AMP, schedulers, early stopping,
validation mIoU), checkpoints that carry their recipe, and exact resumption.

Resuming continues exactly: model, optimiser, scheduler, AMP scaler, epoch and step within it, best
metric, early-stopping count, history, the RNG states of python/numpy/torch and the data order (a
function of seed and epoch; augmentation draws depend on seed, epoch and sample index only). The
command line is :mod:`app.train`."""

from __future__ import annotations

import csv
import dataclasses
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from app.config import RECIPE_KEYS, Config, ConfigError, replace
from app.errors import AppError, first_line
from app.files import atomic_open
from app.pipeline.backends.torch_backend import resolve_torch_device
from app.pipeline.hologram import NUM_CHANNELS
from app.pipeline.preprocess import PreprocessSettings, recipe
from app.training.datasets import (
    Augmentation,
    FolderFrames,
    SegmentationDataset,
    SyntheticFrames,
    find_samples,
    make_loader,
    split_samples,
)
from app.training.losses import build_loss, cascade_weights
from app.training.metrics import ConfusionMatrix, json_safe
from models import build_model, list_models, model_options, save_checkpoint
from models.backbones import load_backbone_weights
from models.checkpoint import CONTACT_CLASS, CheckpointError, atomic_save, load_checkpoint
from models.losses import MultiOutputLoss

STATE_FORMAT = "cellseg-train-state"
STATE_VERSION = 1
OPTIMIZERS = ("adam", "sgd")
SCHEDULERS = ("onecycle", "poly", "none")
HISTORY_FIELDS = ("epoch", "train_loss", "val_miou", "val_mdice", "val_pixel_acc", "lr", "seconds", "best")


class TrainError(AppError, ValueError):
    """A training run cannot be set up or resumed (bad setting, unusable state file)."""


@dataclass(frozen=True)
class RunSpec:
    """What a run trains on and where it writes; with the :class:`Config` (whose ``train.model`` names the
    network) it defines the run completely."""

    data: str | None  # a dataset folder, or None for synthetic interferograms
    out: str  # best checkpoint; NAME.last.pt and NAME.history.csv are written beside it
    command: str = ""  # the command line, recorded in the checkpoint

    @property
    def last_path(self) -> Path:
        return Path(self.out).with_suffix(".last.pt")

    @property
    def history_path(self) -> Path:
        return Path(self.out).with_suffix(".history.csv")


@dataclass(frozen=True)
class Progress:
    """Reported after every optimisation step."""

    epoch: int  # 1-based
    epochs: int
    step: int  # 1-based, within the epoch
    steps: int
    loss: float  # running mean over the epoch so far
    lr: float
    seconds: float  # since the epoch started


@dataclass(frozen=True)
class EpochSummary:
    """Reported after every epoch (one row of the history CSV)."""

    epoch: int
    train_loss: float
    val: dict[str, Any] | None  # ConfusionMatrix.compute() on the validation set, None without one
    lr: float
    seconds: float
    best: bool


@dataclass(frozen=True)
class FitResult:
    epochs_done: int
    best_miou: float | None
    interrupted: bool  # stopped by the stop callback (Ctrl-C); the last state was saved
    stopped_early: bool  # no val mIoU improvement for ``patience`` epochs


def preprocess_settings(cfg: Config) -> PreprocessSettings:
    """The model-input recipe of a training run: channels, CLAHE and background from ``train``, their
    parameters from ``preprocess``, native resolution, standardisation or none."""
    train = cfg.train
    hologram = train.hologram != "none"
    if hologram and train.in_channels != NUM_CHANNELS:
        raise TrainError(f"train.hologram={train.hologram} feeds the model {NUM_CHANNELS} field channels; "
                         f"set train.in_channels={NUM_CHANNELS}")
    normalization = {"mode": "standardize" if train.standardize and not hologram else "none"}
    recipe = {key: getattr(cfg.preprocess, key) for key in RECIPE_KEYS}
    recipe.update(clahe=train.clahe, background=train.background, hologram=train.hologram)  # train's choices
    return PreprocessSettings(in_channels=train.in_channels, input_size=0,
                              normalization=tuple(sorted(normalization.items())), **recipe)


def synthetic_seeds(cfg: Config) -> tuple[list[int], list[int]]:
    """Training and validation sequence seeds of ``--synthetic`` runs (consecutive, never overlapping)."""
    first, count = cfg.train.synthetic_seed, cfg.train.synthetic_sequences
    if count < 1:
        raise TrainError("train.synthetic_sequences must be >= 1")
    train = list(range(first, first + count))
    return train, list(range(first + count, first + count + cfg.train.synthetic_val_sequences))


def build_datasets(cfg: Config, data: str | None) -> tuple[SegmentationDataset, Dataset | None]:
    """(training set with augmentation, validation set of whole frames or None)."""
    train = cfg.train
    settings = preprocess_settings(cfg)
    if data is None:
        train_seeds, val_seeds = synthetic_seeds(cfg)
        contact = {"contact_px": train.contact_px, "contact_class": train.num_classes - 1}
        train_frames = SyntheticFrames(cfg.synth, train_seeds, endless=train.synthetic_endless, **contact)
        val_frames = SyntheticFrames(cfg.synth, val_seeds, **contact) if val_seeds else None
    else:
        if train.contact_px:
            raise TrainError("train.contact_px needs the generator's instance maps: use --synthetic "
                             "(folders hold class masks only)")
        train_samples, val_samples = split_samples(find_samples(Path(data)), train.val_fraction, train.split,
                                                   train.seed)
        train_frames = FolderFrames(train_samples)
        val_frames = FolderFrames(val_samples) if val_samples else None
    augmentation = Augmentation(crop=tuple(train.crop_size) if train.augment_crop else None,
                                flip=train.augment_flip,
                                phase_sign_flip=train.phase_sign_flip and settings.hologram != "none")
    fraction = train.hologram_background_fraction
    train_set = SegmentationDataset(train_frames, settings, train.num_classes, augmentation, train.seed,
                                    background_fraction=fraction)
    if val_frames is None:
        return train_set, None
    val_set = SegmentationDataset(val_frames, settings, train.num_classes, background_fraction=fraction)
    if train.max_val_frames and len(val_set) > train.max_val_frames:
        picks = np.linspace(0, len(val_set) - 1, train.max_val_frames).round().astype(int)
        return train_set, Subset(val_set, sorted(set(picks.tolist())))
    return train_set, val_set


def model_options_for(cfg: Config, name: str) -> dict[str, Any]:
    """The ``train`` section's backbone/width, for the models that take them."""
    accepted = model_options(name)
    wanted = {"backbone": cfg.train.backbone, "width": cfg.train.width}
    return {key: value for key, value in wanted.items() if key in accepted}


def epoch_order(size: int, count: int, seed: int, epoch: int) -> list[int]:
    """``count`` sample indices for an epoch: seeded permutations of ``range(size)``, concatenated."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    permutations = [torch.randperm(size, generator=generator) for _ in range(math.ceil(count / size))]
    return torch.cat(permutations)[:count].tolist()


def _rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state(legacy=False)
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": {"bit_generator": numpy_state["bit_generator"],
                      "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                      "pos": int(numpy_state["state"]["pos"]),
                      "has_gauss": int(numpy_state["has_gauss"]), "gauss": float(numpy_state["gauss"])},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state({"bit_generator": numpy["bit_generator"],
                         "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]},
                         "has_gauss": numpy["has_gauss"], "gauss": numpy["gauss"]})
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """One training run: model, optimiser, scheduler, data, and the state needed to resume it.

    Seeds python, numpy and torch from ``cfg.train.seed`` (the global RNGs, restored on resume).
    """

    def __init__(self, cfg: Config, run: RunSpec, device: torch.device | None = None,
                 load_backbone: bool = True) -> None:
        train = cfg.train
        if train.optimizer not in OPTIMIZERS:
            raise TrainError(f"unknown optimizer '{train.optimizer}'; valid: {', '.join(OPTIMIZERS)}")
        if train.scheduler not in SCHEDULERS:
            raise TrainError(f"unknown scheduler '{train.scheduler}'; valid: {', '.join(SCHEDULERS)}")
        if train.epochs < 1 or train.batch_size < 1 or train.steps_per_epoch < 0:
            raise TrainError("epochs and batch_size must be >= 1, steps_per_epoch >= 0")
        if len(train.class_names) != train.num_classes:
            raise TrainError(f"{len(train.class_names)} class_names for num_classes={train.num_classes}")
        if train.contact_px < 0:
            raise TrainError(f"train.contact_px must be >= 0, got {train.contact_px}")
        if train.contact_px and (train.num_classes < 3 or train.class_names[-1] != CONTACT_CLASS):
            raise TrainError(f"train.contact_px needs a last class named '{CONTACT_CLASS}' after the object "
                             f"classes (e.g. num_classes=3, class_names=[background,cell,{CONTACT_CLASS}])")
        if train.model not in list_models():
            raise TrainError(f"unknown model '{train.model}'; valid models: {', '.join(list_models())}")
        self.cfg = cfg
        self.run = run
        self.device = device or resolve_torch_device(cfg.model.device)
        random.seed(train.seed)
        np.random.seed(train.seed)
        torch.manual_seed(train.seed)
        self.settings = preprocess_settings(cfg)
        self.train_set, self.val_set = build_datasets(cfg, run.data)
        self.steps_per_epoch = train.steps_per_epoch or math.ceil(len(self.train_set) / train.batch_size)
        self.options = model_options_for(cfg, train.model)
        self.model = build_model(train.model, num_classes=train.num_classes, in_channels=train.in_channels,
                                 **self.options)
        if train.backbone_weights and load_backbone:
            load_backbone_weights(self.model.backbone, train.backbone_weights)
        if train.init_weights and load_backbone:
            init_from_checkpoint(self.model, train.init_weights)
        self.model = self.model.to(self.device)
        base_loss = build_loss(train.loss, class_weights=train.class_weights or None,
                               asl_gamma_pos=train.asl_gamma_pos, asl_gamma_neg=train.asl_gamma_neg,
                               asl_clip=train.asl_clip, asl_activation=train.asl_activation)
        self.loss = MultiOutputLoss(base_loss, cascade_weights(self.model.default_loss_weights,
                                                               train.aux_weights)).to(self.device)
        self.optimizer = self._build_optimizer()
        self.scheduler = self._build_scheduler()
        self.amp = train.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.epoch = 0  # completed epochs
        self.step = 0  # completed steps of the current epoch
        self.loss_sum = 0.0  # over the current epoch's completed steps
        self.epoch_seconds = 0.0  # spent on the current epoch before an interruption
        self.best_miou: float | None = None
        self.stale_epochs = 0
        self.history: list[dict[str, Any]] = []

    def _build_optimizer(self) -> torch.optim.Optimizer:
        train = self.cfg.train
        params = self.model.parameters()
        if train.optimizer == "adam":
            return torch.optim.Adam(params, lr=train.lr, weight_decay=train.weight_decay)
        return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)

    def _build_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler | None:
        train = self.cfg.train
        total = train.epochs * self.steps_per_epoch
        if train.scheduler == "onecycle":
            # One spare step: the scheduler is stepped after the last optimiser step too.
            return torch.optim.lr_scheduler.OneCycleLR(self.optimizer, max_lr=train.lr, total_steps=total + 1)
        if train.scheduler == "poly":
            return torch.optim.lr_scheduler.PolynomialLR(self.optimizer, total_iters=total, power=train.poly_power)
        return None

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def fit(self, progress: Callable[[Progress], None] | None = None,
            summary: Callable[[EpochSummary], None] | None = None,
            stop: Callable[[], bool] | None = None) -> FitResult:
        """Train until ``epochs`` or early stopping. ``stop()`` is polled before every step; when true the
        last state is saved and fit returns (resume continues with that step)."""
        train = self.cfg.train
        while self.epoch < train.epochs:
            if train.patience and self.stale_epochs >= train.patience:
                return FitResult(self.epoch, self.best_miou, interrupted=False, stopped_early=True)
            if not self._train_epoch(progress, stop):
                self.save_last()
                return FitResult(self.epoch, self.best_miou, interrupted=True, stopped_early=False)
            record = self._end_epoch()
            if summary is not None:
                summary(record)
        stopped = bool(train.patience and self.stale_epochs >= train.patience)
        return FitResult(self.epoch, self.best_miou, interrupted=False, stopped_early=stopped)

    def _train_epoch(self, progress: Callable[[Progress], None] | None, stop: Callable[[], bool] | None) -> bool:
        """Run the rest of the current epoch; False when stopped before its end."""
        train = self.cfg.train
        started = time.perf_counter() - self.epoch_seconds
        self.train_set.set_epoch(self.epoch)
        order = epoch_order(len(self.train_set), self.steps_per_epoch * train.batch_size, train.seed, self.epoch)
        loader = make_loader(self.train_set, train.batch_size, sampler=order[self.step * train.batch_size:],
                             num_workers=train.num_workers, seed=train.seed)
        self.model.train()
        for images, targets in loader:
            if stop is not None and stop():
                self.epoch_seconds = time.perf_counter() - started
                return False
            self.loss_sum += self._train_step(images, targets)
            self.step += 1
            if progress is not None:
                progress(Progress(self.epoch + 1, train.epochs, self.step, self.steps_per_epoch,
                                  self.loss_sum / self.step, self.lr, time.perf_counter() - started))
        self.epoch_seconds = time.perf_counter() - started
        return True

    def _train_step(self, images: torch.Tensor, targets: torch.Tensor) -> float:
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            loss = self.loss(self.model(images), targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        return float(loss.detach())

    def validate(self) -> dict[str, Any] | None:
        """ConfusionMatrix scores of the model on the validation frames (whole frames), or None."""
        if self.val_set is None:
            return None
        metric = ConfusionMatrix(self.cfg.train.num_classes)
        self.model.eval()
        with torch.inference_mode():
            for images, targets in make_loader(self.val_set, 1, num_workers=self.cfg.train.num_workers):
                with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                    logits = self.model(images.to(self.device))
                metric.update(logits, targets)
        return metric.compute()

    def _end_epoch(self) -> EpochSummary:
        started = time.perf_counter()
        val = self.validate()
        seconds = self.epoch_seconds + time.perf_counter() - started  # training and validation
        train_loss = self.loss_sum / max(self.step, 1)
        # Without validation data every epoch counts as the best (the newest model is kept).
        miou = val["miou"] if val is not None else None
        improved = miou is None or (not math.isnan(miou) and (self.best_miou is None or miou > self.best_miou))
        self.epoch += 1
        self.step, self.loss_sum, self.epoch_seconds = 0, 0.0, 0.0
        if improved:
            self.best_miou, self.stale_epochs = miou, 0
        else:
            self.stale_epochs += 1
        record = EpochSummary(self.epoch, train_loss, val, self.lr, seconds, improved)
        self.history.append({
            "epoch": self.epoch, "train_loss": train_loss,
            "val_miou": "" if val is None else val["miou"], "val_mdice": "" if val is None else val["mdice"],
            "val_pixel_acc": "" if val is None else val["pixel_acc"], "lr": self.lr, "seconds": seconds,
            "best": improved,
        })
        if improved:
            self.save_best(record)
        self.save_last()
        self.write_history()
        return record

    def train_record(self) -> dict[str, Any]:
        """What the checkpoint's ``train_config`` records: the train section, the preprocessing recipe
        (read back by the live pipeline), the data and the command."""
        record: dict[str, Any] = {**dataclasses.asdict(self.cfg.train),
                                  "preprocess": recipe(self.settings), "command": self.run.command,
                                  "data": self.run.data or "synthetic"}
        if self.run.data is None:
            train_seeds, val_seeds = synthetic_seeds(self.cfg)
            record["synth"] = dataclasses.asdict(self.cfg.synth)
            record["synthetic_train_seeds"] = train_seeds
            record["synthetic_val_seeds"] = val_seeds
        return record

    def save_best(self, summary: EpochSummary) -> None:
        train = self.cfg.train
        metrics = {"epoch": summary.epoch, "train_loss": summary.train_loss,
                   "val": json_safe(summary.val) if summary.val is not None else None}
        save_checkpoint(self.run.out, self.model, arch=self.cfg.train.model, options=self.options,
                        class_names=train.class_names, palette=None, input_size=tuple(train.crop_size),
                        normalization=self.settings.normalization_dict, train_config=self.train_record(),
                        metrics=metrics)

    def save_last(self) -> None:
        """The complete training state (for ``--resume``), written atomically."""
        atomic_save({
            "format": STATE_FORMAT, "version": STATE_VERSION,
            "config": dataclasses.asdict(self.cfg), "run": dataclasses.asdict(self.run),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "scaler": self.scaler.state_dict(), "epoch": self.epoch, "step": self.step,
            "loss_sum": self.loss_sum, "epoch_seconds": self.epoch_seconds, "best_miou": self.best_miou,
            "stale_epochs": self.stale_epochs, "history": self.history, "rng": _rng_state(),
        }, self.run.last_path)

    def write_history(self) -> None:
        path = self.run.history_path
        with atomic_open(path, newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=HISTORY_FIELDS)
            writer.writeheader()
            writer.writerows(self.history)

    @classmethod
    def resume(cls, path: str | Path, device: torch.device | None = None) -> Trainer:
        """Rebuild a run from its ``NAME.last.pt`` and restore every piece of state."""
        state = load_state(path)
        try:
            cfg = replace(Config(), **state["config"])
            run = RunSpec(**state["run"])
        except (ConfigError, TypeError) as exc:
            raise TrainError(f"{path}: unusable training state ({exc})") from None
        trainer = cls(cfg, run, device, load_backbone=False)  # the state holds every weight
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        if trainer.scheduler is not None:
            trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.scaler.load_state_dict(state["scaler"])
        for key in ("epoch", "step", "loss_sum", "epoch_seconds", "best_miou", "stale_epochs", "history"):
            setattr(trainer, key, state[key])
        _set_rng_state(state["rng"])
        return trainer


def init_from_checkpoint(model: torch.nn.Module, path: str | Path) -> None:
    """Start ``model`` from the weights of a checkpoint of this project (fine-tuning), in place.

    Every tensor of equal shape is copied. A classifier with more classes than the checkpoint's (its
    output rows, dimension 0) keeps the checkpoint's rows and starts each new class as a copy of the
    checkpoint's last class, so the model begins by predicting what it did (ties go to the old class)
    and learns the new one from there. Another architecture or width -> :class:`TrainError`."""
    try:
        old, meta = load_checkpoint(path)
    except CheckpointError as exc:
        raise TrainError(f"train.init_weights: {exc}") from None
    own = model.state_dict()
    given = old.state_dict()
    if set(own) != set(given):
        raise TrainError(f"train.init_weights: {path} is a {meta.arch} with other layers than the model trained here")
    for name, tensor in given.items():
        target = own[name]
        if target.shape == tensor.shape:
            target.copy_(tensor)
        elif (target.dim() == tensor.dim() and target.shape[1:] == tensor.shape[1:]
              and target.shape[0] > tensor.shape[0] == meta.num_classes):
            target[: tensor.shape[0]].copy_(tensor)
            target[tensor.shape[0]:].copy_(tensor[-1:].expand_as(target[tensor.shape[0]:]))
        else:
            raise TrainError(f"train.init_weights: {name} is {tuple(tensor.shape)} in {path}, "
                             f"{tuple(target.shape)} here (another width or backbone?)")
    model.load_state_dict(own)


def load_state(path: str | Path) -> dict[str, Any]:
    """Read a ``NAME.last.pt`` training state; a missing or foreign file is a :class:`TrainError`."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{path}: training state not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for corrupt files
        raise TrainError(f"{path}: cannot read training state ({first_line(exc)})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainError(f"{path} is not a training state; resume from the NAME.last.pt written beside "
                         f"the checkpoint")
    return state
