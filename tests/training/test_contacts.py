"""The contact class: seams between touching objects as training targets, fine-tuning a two-class
checkpoint into a three-class one, and the label maps the pipeline hands on."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from app.config import Config, replace
from app.pipeline.inference import InferenceWorker, split_contacts
from app.training.datasets import SyntheticFrames, with_contacts
from app.training.trainer import RunSpec, Trainer, TrainError, init_from_checkpoint
from models import build_model, load_checkpoint, save_checkpoint


def two_touching_discs() -> tuple[np.ndarray, np.ndarray]:
    instances = np.zeros((40, 60), np.int32)
    cv2.circle(instances, (18, 20), 10, 1, -1)
    cv2.circle(instances, (38, 20), 10, 2, -1)  # centres 20 px apart: they touch along x = 28
    cv2.circle(instances, (52, 6), 3, 3, -1)  # a small one alone
    return instances, (instances > 0).astype(np.uint8)


def test_with_contacts_marks_the_seam_only() -> None:
    instances, mask = two_touching_discs()
    marked = with_contacts(mask, instances, contact_px=2, contact_class=2)
    seam = marked == 2
    assert seam.any()
    ys, xs = np.nonzero(seam)
    assert abs(xs - 28).max() <= 3  # within the contact distance of the line where the discs meet
    assert not seam[instances == 3].any()  # an object alone has no seam
    assert not seam[:, :15].any()  # nor does the outer border of the touching pair
    assert ((marked > 0) == (mask > 0)).all()  # the objects keep their pixels
    assert (with_contacts(mask, instances, 0, 2) == mask).all()
    ignore = mask.copy()
    ignore[:, 26:31] = 255
    assert not (with_contacts(ignore, instances, 2, 2)[:, 26:31] == 2).any()  # ignore stays ignore


def test_synthetic_frames_with_contacts_have_seams_in_clusters() -> None:
    cfg = replace(Config(), synth={"size": 96, "frames": 1, "num_cells": 12, "object_radius_px": [9, 12]}).synth
    plain = SyntheticFrames(cfg, [3], cache=False)
    seams = SyntheticFrames(cfg, [3], cache=False, contact_px=2, contact_class=2)
    image, mask = plain.load(0)
    same_image, marked = seams.load(0)
    assert (image == same_image).all()
    assert (marked == 2).any() and set(np.unique(marked)) <= {0, 1, 2, 255}
    assert ((marked == 2) <= (mask == 1)).all()


def _tiny(num_classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("icnet", num_classes=num_classes, in_channels=3, width=0.125).eval()


def test_init_from_checkpoint_adds_a_class_that_starts_as_the_last_one(tmp_path) -> None:
    old = _tiny(2)
    path = tmp_path / "two.pt"
    save_checkpoint(path, old, arch="icnet", options={"width": 0.125}, class_names=["background", "cell"],
                    palette=None, input_size=(64, 64), normalization={"mode": "none"})
    old, _ = load_checkpoint(path)
    new = _tiny(3)
    init_from_checkpoint(new, path)
    new.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before, after = old(x), new(x)
    before = before[0] if isinstance(before, (tuple, list)) else before
    after = after[0] if isinstance(after, (tuple, list)) else after
    assert torch.allclose(after[:, :2], before, atol=1e-5)
    assert torch.allclose(after[:, 2], before[:, 1], atol=1e-5)  # the new class is a copy of "cell"
    assert (after.argmax(1) == before.argmax(1)).all()  # ties go to the old class
    wider = build_model("icnet", num_classes=3, in_channels=3, width=0.25)
    with pytest.raises(TrainError, match="init_weights"):
        init_from_checkpoint(wider, path)
    with pytest.raises(TrainError, match="init_weights"):
        init_from_checkpoint(new, tmp_path / "missing.pt")


def test_contact_settings_are_checked(tmp_path) -> None:
    settings = {"width": 0.125, "epochs": 1, "steps_per_epoch": 1, "batch_size": 1, "crop_size": [48, 48],
                "synthetic_sequences": 1, "synthetic_val_sequences": 0, "contact_px": 2}
    cfg = replace(Config(), synth={"size": 64, "frames": 1, "num_cells": 2}, train=settings, model={"device": "cpu"})
    with pytest.raises(TrainError, match="contact"):
        Trainer(cfg, RunSpec(None, str(tmp_path / "m.pt")))  # two classes: no contact class to train
    three = replace(cfg, train={"num_classes": 3, "class_names": ["background", "cell", "contact"]})
    trainer = Trainer(three, RunSpec(None, str(tmp_path / "m.pt")))
    _, target = trainer.train_set[0]
    assert set(torch.unique(target).tolist()) <= {0, 1, 2, 255}


class _ThreeClassBackend:
    name, device = "fake", "cpu"

    def predict(self, batch: np.ndarray) -> np.ndarray:
        labels = np.zeros((len(batch), *batch.shape[2:]), np.uint8)
        labels[:, 2:8, 2:8] = 1
        labels[:, 2:8, 5] = 2
        return labels

    def warmup(self, shape: tuple[int, ...], iters: int = 2) -> None:
        pass


def test_worker_hands_on_objects_and_the_seams_beside_them() -> None:
    tensors = [np.zeros((3, 10, 10), np.float32)]
    worker = InferenceWorker(_ThreeClassBackend(), contact_class=2)
    (labels, seams), = worker.predict_with_contacts(tensors, [(10, 10)])
    assert set(np.unique(labels)) == {0, 1} and (labels[2:8, 2:8] == 1).all()
    assert seams.dtype == bool and seams.sum() == 6 and seams[2:8, 5].all()
    assert (worker.predict(tensors, [(10, 10)])[0] == labels).all()
    raw, none = InferenceWorker(_ThreeClassBackend()).predict_with_contacts(tensors, [(10, 10)])[0]
    assert none is None and (raw == 2).sum() == 6  # a model without a contact class: as it is
    merged, empty = split_contacts(np.ones((4, 4), np.uint8), 2)
    assert not empty.any() and (merged == 1).all()
