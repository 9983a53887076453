from __future__ import annotations

import csv
import math
import random

import cv2
import numpy as np
import pytest
import torch

from app.config import Config, replace
from app.train import _StopFlag, main
from app.training.datasets import SyntheticFrames
from app.training.trainer import RunSpec, Trainer, TrainError, epoch_order
from models import load_checkpoint
from models.backbones import build_resnet

RNG = np.random.default_rng(0)


def tiny_config(**train) -> Config:
    """64×64 synthetic frames, a 1/8-width ICNet, a few steps: seconds on one core."""
    settings = {"width": 0.125, "epochs": 2, "steps_per_epoch": 3, "batch_size": 2, "crop_size": [48, 48],
                "synthetic_sequences": 1, "synthetic_val_sequences": 1, "max_val_frames": 2, "lr": 3e-3}
    settings.update(train)
    return replace(Config(), synth={"size": 64, "frames": 4, "num_cells": 2}, train=settings,
                   model={"device": "cpu"})


def write_dataset(root, count=4, size=64):
    """A learnable folder dataset: bright squares (class 1) on a noisy background, 8-bit PNGs."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for index in range(count):
        mask = np.zeros((size, size), np.uint8)
        y, x = RNG.integers(0, size - 20, 2)
        mask[y : y + 20, x : x + 20] = 1
        image = (60 + 120 * mask + RNG.normal(0, 10, mask.shape)).clip(0, 255).astype(np.uint8)
        cv2.imwrite(str(root / "images" / f"seq_{index:03d}.png"), image)
        cv2.imwrite(str(root / "masks" / f"seq_{index:03d}.png"), mask)
    return root


def test_epoch_order_is_seeded_and_covers_the_data():
    order = epoch_order(5, 12, seed=1, epoch=0)
    assert len(order) == 12 and sorted(order[:5]) == list(range(5))
    assert order == epoch_order(5, 12, seed=1, epoch=0)
    assert order != epoch_order(5, 12, seed=1, epoch=1)


def test_tiny_training_lowers_the_loss(tmp_path):
    cfg = tiny_config(epochs=4, steps_per_epoch=3, scheduler="none", max_val_frames=1)
    trainer = Trainer(cfg, RunSpec(str(write_dataset(tmp_path / "data")), str(tmp_path / "m.pt")))
    trainer.fit()
    losses = [row["train_loss"] for row in trainer.history]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0]


def test_endless_synthetic_training_sees_new_sequences_each_epoch(tmp_path):
    cfg = tiny_config(epochs=2, synthetic_endless=True)
    trainer = Trainer(cfg, RunSpec(None, str(tmp_path / "m.pt")))
    trainer.fit()
    train_frames = trainer.train_set.frames
    assert train_frames.endless and train_frames.sequence(0) == f"seed{1000 + SyntheticFrames.ENDLESS_SEED_STRIDE}"
    assert trainer.val_set.dataset.frames.sequence(0) == "seed1001"  # validation stays fixed
    assert len(trainer.history) == 2


def global_rng_states() -> tuple:
    """The global python, NumPy and torch RNG states (what dropout and user code draw from)."""
    return random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state().tolist()


# fcn_resnet18's head has dropout: its weights depend on the global torch RNG at every step.
@pytest.mark.parametrize("model", ["icnet", "fcn_resnet18"])
def test_resume_after_k_steps_matches_an_uninterrupted_run(tmp_path, model):
    cfg = tiny_config(model=model)
    straight = Trainer(cfg, RunSpec(None, str(tmp_path / "a" / "m.pt")))
    straight.fit()

    calls = []

    def stop_after_four_steps() -> bool:
        calls.append(1)
        return len(calls) > 4  # polled before each step: stops in epoch 2, after its first step

    first = Trainer(cfg, RunSpec(None, str(tmp_path / "b" / "m.pt")))
    result = first.fit(stop=stop_after_four_steps)
    assert result.interrupted and (first.epoch, first.step) == (1, 1)
    states_at_stop = global_rng_states()
    del first
    torch.manual_seed(12345)  # whatever happened in between must not matter
    np.random.seed(12345)
    resumed = Trainer.resume(tmp_path / "b" / "m.last.pt")
    assert (resumed.epoch, resumed.step) == (1, 1)
    assert global_rng_states() == states_at_stop
    resumed.fit()
    torch.testing.assert_close(resumed.model.state_dict(), straight.model.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(resumed.optimizer.state_dict()["state"], straight.optimizer.state_dict()["state"],
                               rtol=0, atol=0)
    assert resumed.lr == straight.lr and resumed.best_miou == straight.best_miou
    without_time = [{k: v for k, v in row.items() if k != "seconds"} for row in straight.history]
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in resumed.history] == without_time


@pytest.mark.parametrize("optimizer,scheduler,loss", [("sgd", "poly", "asl"), ("adam", "onecycle", "ce+dice")])
def test_optimizers_schedulers_and_losses_run(tmp_path, optimizer, scheduler, loss):
    cfg = tiny_config(epochs=1, steps_per_epoch=2, optimizer=optimizer, scheduler=scheduler, loss=loss,
                      synthetic_val_sequences=0)
    trainer = Trainer(cfg, RunSpec(None, str(tmp_path / "m.pt")))
    result = trainer.fit()
    assert result.epochs_done == 1 and result.best_miou is None  # no validation data
    assert isinstance(trainer.optimizer, {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[optimizer])
    schedulers = {"poly": torch.optim.lr_scheduler.PolynomialLR, "onecycle": torch.optim.lr_scheduler.OneCycleLR}
    assert isinstance(trainer.scheduler, schedulers[scheduler])
    assert trainer.lr < cfg.train.lr  # the schedule decays towards its end
    assert (tmp_path / "m.pt").is_file()


def test_early_stopping(tmp_path):
    cfg = tiny_config(epochs=5, steps_per_epoch=1, patience=1, lr=0.0, scheduler="none")
    trainer = Trainer(cfg, RunSpec(None, str(tmp_path / "m.pt")))
    result = trainer.fit()  # lr 0: the val mIoU never improves after the first epoch
    assert result.stopped_early and result.epochs_done == 2


def test_bad_settings_raise(tmp_path):
    with pytest.raises(TrainError, match="valid models"):
        Trainer(tiny_config(model="unet"), RunSpec(None, str(tmp_path / "m.pt")))
    with pytest.raises(TrainError, match="optimizer"):
        Trainer(tiny_config(optimizer="lamb"), RunSpec(None, str(tmp_path / "m.pt")))
    with pytest.raises(TrainError, match="not a training state"):
        torch.save({"weights": 1}, tmp_path / "x.pt")
        Trainer.resume(tmp_path / "x.pt")


def test_stop_flag_second_signal_interrupts_at_once():
    flag = _StopFlag()
    assert not flag()
    flag.handle(2, None)
    assert flag()
    with pytest.raises(KeyboardInterrupt):
        flag.handle(2, None)


TINY_FLAGS = ["--model", "icnet", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2",
              "--set", "train.width=0.125", "--set", "train.crop_size=[48,48]", "--set", "model.device=cpu"]


def test_cli_writes_checkpoint_history_and_state(tmp_path, capsys):
    data = write_dataset(tmp_path / "data")
    out = tmp_path / "w" / "tiny.pt"
    assert main(["--data", str(data), "--out", str(out), *TINY_FLAGS]) == 0
    captured = capsys.readouterr()
    assert "epoch 1: loss" in captured.out and "val mIoU" in captured.out
    with (tmp_path / "w" / "tiny.history.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and float(rows[0]["train_loss"]) > 0 and rows[0]["val_miou"]
    model, meta = load_checkpoint(out)
    assert meta.arch == "icnet" and meta.in_channels == 1 and meta.class_names == ("background", "cell")
    assert meta.train_config["preprocess"]["clahe"] is False and meta.normalization == {"mode": "standardize"}
    assert meta.metrics["epoch"] == 1 and 0 <= meta.metrics["val"]["miou"] <= 1
    assert (tmp_path / "w" / "tiny.last.pt").is_file()
    assert main(["--resume", str(tmp_path / "w" / "tiny.last.pt")]) == 0  # already complete: nothing to do


@pytest.mark.parametrize("args,message", [
    (["--data", "/nonexistent/folder"], "data folder not found"),
    (["--model", "unet"], "unknown model 'unet'"),
    (["--resume", "/nonexistent/x.last.pt"], "training state not found"),
    (["--resume", "x.last.pt", "--epochs", "3"], "drop --epochs"),
    (["--set", "train.optimiser=sgd"], "did you mean 'train.optimizer'"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def _torchvision_resnet18_file(path):
    """A stand-in for torchvision's resnet18 ImageNet file: torchvision key names, RGB conv1, fc."""
    state = {k: v for k, v in build_resnet("resnet18", in_channels=3).state_dict().items()
             if not k.endswith("num_batches_tracked")}
    state.update({"fc.weight": torch.randn(1000, 512), "fc.bias": torch.zeros(1000)})
    torch.save(state, path)
    return state


def test_backbone_weights_start_training_and_are_not_needed_to_resume(tmp_path):
    torch.manual_seed(3)
    path = tmp_path / "resnet18-imagenet.pth"
    state = _torchvision_resnet18_file(path)
    cfg = tiny_config(width=1.0, epochs=1, steps_per_epoch=1, max_val_frames=1, backbone_weights=str(path))
    trainer = Trainer(cfg, RunSpec(None, str(tmp_path / "m.pt")))
    loaded = trainer.model.backbone.state_dict()
    torch.testing.assert_close(loaded["layer2.0.conv1.weight"], state["layer2.0.conv1.weight"])
    torch.testing.assert_close(loaded["conv1.weight"], state["conv1.weight"].sum(dim=1, keepdim=True))
    trainer.fit()
    path.unlink()
    resumed = Trainer.resume(tmp_path / "m.last.pt")
    torch.testing.assert_close(resumed.model.state_dict(), trainer.model.state_dict())


def test_cli_backbone_weights_for_another_width_is_one_line(tmp_path, capsys):
    path = tmp_path / "resnet18-imagenet.pth"
    _torchvision_resnet18_file(path)
    assert main(["--synthetic", *TINY_FLAGS, "--backbone-weights", str(path)]) == 2
    err = capsys.readouterr().err
    assert "width=1" in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2


def test_cli_missing_mask_is_exit_2(tmp_path, capsys):
    data = write_dataset(tmp_path / "data")
    (data / "masks" / "seq_001.png").unlink()
    assert main(["--data", str(data), *TINY_FLAGS]) == 2
    assert "have no mask" in capsys.readouterr().err
