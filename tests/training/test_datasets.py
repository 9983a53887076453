from __future__ import annotations

import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from app.config import SynthConfig
from app.pipeline.preprocess import Preprocessor, PreprocessSettings
from app.training.datasets import (
    Augmentation,
    Box,
    DatasetError,
    FolderFrames,
    SegmentationDataset,
    SyntheticFrames,
    boxes_to_mask,
    find_samples,
    list_images,
    make_loader,
    read_boxes,
    split_samples,
)

RNG = np.random.default_rng(0)
TINY_SYNTH = SynthConfig(size=64, frames=3, num_cells=2)


def write_folder(root: Path, names: list[str], size=(20, 24), dtype=np.uint8, masks=True) -> Path:
    top = np.iinfo(dtype).max
    for name in names:
        image = RNG.integers(0, top, size, dtype=dtype, endpoint=True)
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "images" / name), image)
        if masks:
            mask = (image > top // 2).astype(np.uint8)
            mask[0] = 255
            (root / "masks" / name).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str((root / "masks" / name).with_suffix(".png")), mask)
    return root


def test_boxes_to_mask_clips_and_labels():
    mask = boxes_to_mask((6, 8), [Box(1, 1, 3, 2), Box(6, 4, 5, 5, label=2)])
    expected = np.zeros((6, 8), np.uint8)
    expected[1:3, 1:4] = 1
    expected[4:6, 6:8] = 2  # clipped at the frame border
    np.testing.assert_array_equal(mask, expected)


def test_read_boxes_csv_and_json(tmp_path):
    (tmp_path / "b.csv").write_text("filename,x,y,w,h,class\na.png,1,2,3,4,1\na.png,0,0,2,2,2\nb.png,5,5,1,1,\n")
    boxes = read_boxes(tmp_path / "b.csv")
    assert boxes == {"a.png": [Box(1, 2, 3, 4, 1), Box(0, 0, 2, 2, 2)], "b.png": [Box(5, 5, 1, 1, 1)]}
    (tmp_path / "b.json").write_text(json.dumps({"a.png": [[1, 2, 3, 4], [0, 0, 2, 2, 2]]}))
    assert read_boxes(tmp_path / "b.json") == {"a.png": [Box(1, 2, 3, 4, 1), Box(0, 0, 2, 2, 2)]}
    (tmp_path / "l.json").write_text(json.dumps([{"filename": "a.png", "x": 1, "y": 2, "w": 3, "h": 4}]))
    assert read_boxes(tmp_path / "l.json") == {"a.png": [Box(1, 2, 3, 4, 1)]}
    (tmp_path / "bad.csv").write_text("filename,x,y\na.png,1,2\n")
    with pytest.raises(DatasetError, match="lacks h, w"):
        read_boxes(tmp_path / "bad.csv")
    (tmp_path / "neg.json").write_text(json.dumps({"a.png": [[1, 2, 0, 4]]}))
    with pytest.raises(DatasetError, match="positive"):
        read_boxes(tmp_path / "neg.json")


def test_box_dataset_renders_masks(tmp_path):
    write_folder(tmp_path, ["f_001.png", "f_002.png"], masks=False)
    (tmp_path / "boxes.csv").write_text("filename,x,y,w,h\nf_001.png,2,3,4,5\n")
    frames = FolderFrames(find_samples(tmp_path))
    _, mask = frames.load(0)
    assert mask.sum() == 20 and mask[3:8, 2:6].all()
    assert frames.load(1)[1].max() == 0  # no boxes = all background
    (tmp_path / "boxes.csv").write_text("filename,x,y,w,h\nnope.png,2,3,4,5\n")
    with pytest.raises(DatasetError, match="nope.png"):
        find_samples(tmp_path)


def test_missing_mask_is_a_clear_error(tmp_path):
    write_folder(tmp_path, ["a.png", "b.png"])
    (tmp_path / "masks" / "b.png").unlink()
    with pytest.raises(DatasetError, match=r"1 image\(s\) .* have no mask .* e\.g\. b\.png"):
        find_samples(tmp_path)
    with pytest.raises(DatasetError, match="not found"):
        find_samples(tmp_path / "nowhere")
    (tmp_path / "masks" / "a.png").unlink()
    (tmp_path / "masks").rmdir()
    with pytest.raises(DatasetError, match="neither a masks/ folder"):
        find_samples(tmp_path)


def test_sequences_and_splits(tmp_path):
    names = [f"seqA/{i:03d}.png" for i in range(3)] + [f"seqB/{i:03d}.png" for i in range(3)]
    names += [f"cellsC_{i:04d}.png" for i in range(4)]
    samples = find_samples(write_folder(tmp_path, names))
    assert sorted({s.sequence for s in samples}) == ["cellsC", "seqA", "seqB"]
    train, val = split_samples(samples, 0.34, by="sequence", seed=1)
    assert len({s.sequence for s in val}) == 1
    assert not {s.sequence for s in train} & {s.sequence for s in val}
    assert len(train) + len(val) == len(samples)
    train, val = split_samples(samples, 0.2, by="file", seed=1)
    assert len(val) == 2 and not {s.image for s in train} & {s.image for s in val}
    assert split_samples(samples, 0.2, by="file", seed=1) == (train, val)  # seeded
    with pytest.raises(DatasetError, match="at least 2 sequences"):
        split_samples([s for s in samples if s.sequence == "seqA"], 0.5, by="sequence")


def test_sixteen_bit_frames_decode_unchanged(tmp_path):
    write_folder(tmp_path, ["a.png"], dtype=np.uint16)
    image, mask = FolderFrames(find_samples(tmp_path)).load(0)
    assert image.dtype == np.uint16 and image.max() > 255 and mask.dtype == np.uint8
    assert list_images(tmp_path) == [tmp_path / "images" / "a.png"]


def test_dataset_uses_the_live_preprocessing_and_augments_deterministically(tmp_path):
    write_folder(tmp_path, ["a.png", "b.png"], size=(40, 48))
    frames = FolderFrames(find_samples(tmp_path))
    settings = PreprocessSettings(in_channels=1, clahe=True)
    plain = SegmentationDataset(frames, settings, num_classes=2)
    image, mask = plain[0]
    raw_image, raw_mask = frames.load(0)
    np.testing.assert_array_equal(image.numpy(), Preprocessor(settings)(raw_image))
    np.testing.assert_array_equal(mask.numpy(), raw_mask)
    assert mask.dtype == torch.int64

    augmented = SegmentationDataset(frames, settings, 2, Augmentation(crop=(16, 32), flip=True), seed=3)
    first = augmented[1]
    assert first[0].shape == (1, 16, 32) and first[1].shape == (16, 32)
    torch.testing.assert_close(augmented[1], first)  # same seed, epoch and index
    draws = []
    for epoch in range(4):
        augmented.set_epoch(epoch)
        draws.append(augmented[1][0])
    assert any(not torch.equal(draws[0], other) for other in draws[1:])
    # The crop is a window of the preprocessed full frame (possibly flipped).
    full = plain[1][0].numpy()[0]
    window = draws[0].numpy()[0]
    variants = [window, window[:, ::-1], window[::-1], window[::-1, ::-1]]
    found = [cv2.matchTemplate(full, np.ascontiguousarray(v), cv2.TM_SQDIFF).min() for v in variants]
    assert min(found) < 1e-3 < max(found)

    restored = pickle.loads(pickle.dumps(augmented))  # CLAHE objects are rebuilt, not pickled
    restored.set_epoch(0)
    torch.testing.assert_close(restored[1], (draws[0], restored[1][1]))


def test_small_frames_are_padded_with_ignore(tmp_path):
    write_folder(tmp_path, ["a.png"], size=(10, 12))
    dataset = SegmentationDataset(FolderFrames(find_samples(tmp_path)), PreprocessSettings(), 2,
                                  Augmentation(crop=(16, 16)))
    image, mask = dataset[0]
    assert image.shape == (1, 16, 16) and (mask[10:] == 255).all() and (mask[:, 12:] == 255).all()


def test_first_n_mean_background_per_sequence():
    frames = SyntheticFrames(TINY_SYNTH, seeds=[1, 2])
    settings = PreprocessSettings(background="first_n_mean", background_frames=2,
                                  normalization=(("mode", "none"),))
    dataset = SegmentationDataset(frames, settings, num_classes=2)
    for index in (2, 4):
        seq_start = index - index % TINY_SYNTH.frames
        background = np.mean([frames.load(seq_start + i)[0] / 255.0 for i in range(2)], axis=0)
        expected = frames.load(index)[0] / 255.0 - background
        np.testing.assert_allclose(dataset[index][0][0].numpy(), expected, atol=1e-6)
    with pytest.raises(DatasetError, match="first_n_mean"):
        SegmentationDataset(frames, PreprocessSettings(background="mog2"), 2)


def test_bad_mask_values_are_reported(tmp_path):
    write_folder(tmp_path, ["a.png"])
    cv2.imwrite(str(tmp_path / "masks" / "a.png"), np.full((20, 24), 7, np.uint8))
    dataset = SegmentationDataset(FolderFrames(find_samples(tmp_path)), PreprocessSettings(), 2)
    with pytest.raises(DatasetError, match=r"mask values \[7\]"):
        dataset[0]


def test_synthetic_frames_are_deterministic_and_cacheable():
    cached = SyntheticFrames(TINY_SYNTH, seeds=[5, 6])
    lazy = SyntheticFrames(TINY_SYNTH, seeds=[5, 6], cache=False)
    assert len(cached) == 6 and cached.sequence(4) == "seed6"
    for index in (0, 4):
        for a, b in zip(cached.load(index), lazy.load(index), strict=True):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(cached.load(0)[0], cached.load(3)[0])  # other seed, other frames
    with pytest.raises(IndexError):
        cached.load(6)


def test_endless_synthetic_stream_moves_to_new_sequences_every_epoch():
    endless = SyntheticFrames(TINY_SYNTH, seeds=[5, 6], endless=True)
    fixed = SyntheticFrames(TINY_SYNTH, seeds=[5, 6])
    np.testing.assert_array_equal(endless.load(1)[0], fixed.load(1)[0])  # epoch 0 = the given seeds
    settings = PreprocessSettings(background="first_n_mean", background_frames=2,
                                  normalization=(("mode", "none"),))
    dataset = SegmentationDataset(endless, settings, num_classes=2)
    dataset.set_epoch(3)
    stride = SyntheticFrames.ENDLESS_SEED_STRIDE
    assert endless.sequence(4) == f"seed{6 + 3 * stride}"
    epoch3 = SyntheticFrames(TINY_SYNTH, seeds=[5 + 3 * stride, 6 + 3 * stride])
    np.testing.assert_array_equal(endless.load(1)[0], epoch3.load(1)[0])
    assert not np.array_equal(endless.load(1)[0], fixed.load(1)[0])
    # background estimate follows the new sequences, not the ones of epoch 0
    background = np.mean([epoch3.load(i)[0] / 255.0 for i in range(2)], axis=0)
    np.testing.assert_allclose(dataset[1][0][0].numpy(), epoch3.load(1)[0] / 255.0 - background, atol=1e-6)
    fixed.set_epoch(3)
    assert fixed.sequence(0) == "seed5"


def test_workers_give_the_same_batches():
    dataset = SegmentationDataset(SyntheticFrames(TINY_SYNTH, seeds=[1]), PreprocessSettings(), 2,
                                  Augmentation(crop=(32, 32), flip=True), seed=7)
    serial = list(make_loader(dataset, batch_size=2))
    parallel = list(make_loader(dataset, batch_size=2, num_workers=1))
    torch.testing.assert_close(serial, parallel)


def test_loader_leaves_the_global_torch_rng_alone():
    dataset = SegmentationDataset(SyntheticFrames(TINY_SYNTH, seeds=[1]), PreprocessSettings(), 2)
    before = torch.get_rng_state()
    next(iter(make_loader(dataset, batch_size=1, sampler=[2, 0])))
    torch.testing.assert_close(torch.get_rng_state(), before, rtol=0, atol=0)
