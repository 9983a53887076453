"""Training on demodulated holograms: recipe, background share, phase-sign augmentation, tiny run."""

from __future__ import annotations

import numpy as np
import pytest

from app.config import Config, replace
from app.pipeline.preprocess import PreprocessSettings
from app.training.datasets import Augmentation, SegmentationDataset, SyntheticFrames
from app.training.trainer import RunSpec, Trainer, TrainError, build_datasets, preprocess_settings
from models import load_checkpoint


def hologram_config(**train) -> Config:
    settings = {"width": 0.125, "epochs": 1, "steps_per_epoch": 2, "batch_size": 2, "crop_size": [48, 48],
                "synthetic_sequences": 4, "synthetic_val_sequences": 1, "max_val_frames": 1, "hologram": "offaxis",
                "in_channels": 3}
    settings.update(train)
    return replace(Config(), synth={"size": 64, "frames": 2, "randomize": True}, train=settings,
                   model={"device": "cpu"})


def test_hologram_recipe_needs_three_channels() -> None:
    with pytest.raises(TrainError, match="set train.in_channels=3"):
        preprocess_settings(hologram_config(in_channels=1))
    settings = preprocess_settings(hologram_config())
    assert settings.hologram == "offaxis" and settings.normalization_dict == {"mode": "none"}


def test_background_share_is_seeded_per_sequence() -> None:
    frames = SyntheticFrames(hologram_config().synth, list(range(40, 80)), cache=False)
    settings = PreprocessSettings(in_channels=3, hologram="offaxis", normalization=(("mode", "none"),))
    dataset = SegmentationDataset(frames, settings, 2, seed=0, background_fraction=0.5)
    chosen = [dataset.uses_background_hologram(f"seed{s}") for s in range(40, 80)]
    assert 10 < sum(chosen) < 30
    assert chosen == [dataset.uses_background_hologram(f"seed{s}") for s in range(40, 80)]
    none = SegmentationDataset(frames, settings, 2, seed=0, background_fraction=0.0)
    assert not any(none.uses_background_hologram(f"seed{s}") for s in range(40, 80))
    # A sequence drawn for it really gets its background hologram.
    sequence = f"seed{40 + chosen.index(True)}"
    assert dataset._preprocessors[sequence].demodulator.background is not None


def test_phase_sign_flip_negates_only_the_sine_channel() -> None:
    image = np.stack([np.full((4, 4), 0.5), np.full((4, 4), 0.2), np.full((4, 4), -0.3)]).astype(np.float32)
    mask = np.zeros((4, 4), np.uint8)
    flipped = [Augmentation(phase_sign_flip=True)(image, mask, np.random.default_rng(seed))[0] for seed in range(20)]
    signs = {float(f[0, 0, 0]) for f in flipped}
    assert signs == {0.5, -0.5}
    assert all(np.array_equal(f[1:], image[1:]) for f in flipped)
    assert image[0, 0, 0] == 0.5  # the input is not modified


def test_tiny_hologram_training_records_the_stage(tmp_path) -> None:
    cfg = hologram_config()
    train_set, _ = build_datasets(cfg, None)
    assert train_set.augmentation.phase_sign_flip
    tensor, _ = train_set[0]
    assert tensor.shape[0] == 3
    trainer = Trainer(cfg, RunSpec(None, str(tmp_path / "h.pt")))
    trainer.fit()
    _, meta = load_checkpoint(tmp_path / "h.pt")
    recorded = meta.train_config["preprocess"]
    assert meta.in_channels == 3 and recorded["hologram"] == "offaxis"
    assert recorded["hologram_background_fit"] is True and meta.normalization == {"mode": "none"}
