from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest
import torch

from app.evaluate import main
from app.pipeline.preprocess import Preprocessor, PreprocessSettings
from app.training.evaluation import EvalFrame, Evaluator
from app.training.metrics import METRIC_KEYS, ConfusionMatrix
from models import build_model, save_checkpoint

RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "tiny.pt"
    model = build_model("icnet", num_classes=2, in_channels=1, backbone="resnet18", width=0.125).eval()
    save_checkpoint(path, model, arch="icnet", options={"backbone": "resnet18", "width": 0.125},
                    class_names=("background", "cell"), palette=None, input_size=64,
                    normalization={"mode": "standardize"},
                    train_config={"preprocess": {"clahe": True, "background": "none"}})
    return path


def write_dataset(root, count=3, size=64, masks=True):
    (root / "images").mkdir(parents=True)
    for index in range(count):
        image = RNG.integers(0, 255, (size, size), dtype=np.uint8)
        cv2.imwrite(str(root / "images" / f"f_{index:03d}.png"), image)
        if masks:
            (root / "masks").mkdir(exist_ok=True)
            cv2.imwrite(str(root / "masks" / f"f_{index:03d}.png"), (image > 128).astype(np.uint8))
    return root


class OracleBackend:
    """Predicts the labels it was told about for each input (keyed by the input's bytes)."""

    def __init__(self) -> None:
        self.answers: dict[bytes, np.ndarray] = {}
        self.seen: list[np.ndarray] = []

    def warmup(self, shape, iters=2):
        pass

    def predict(self, batch):
        self.seen.append(batch[0])
        return self.answers[batch[0].tobytes()][None]


def test_evaluator_scores_with_the_recorded_preprocessing():
    settings = PreprocessSettings(clahe=True)
    preprocess = Preprocessor(settings)
    backend = OracleBackend()
    frames = []
    for index in range(3):
        image = RNG.integers(0, 255, (32, 40), dtype=np.uint8)
        mask = (image > 100).astype(np.uint8)
        mask[0] = 255
        backend.answers[preprocess(image).tobytes()] = mask.clip(0, 1) if index else 1 - mask.clip(0, 1)
        frames.append(EvalFrame(f"f{index}", "", image, mask))
    written = []
    result = Evaluator(backend, settings, num_classes=2).run(frames, lambda f, labels: written.append(f.name))
    assert written == ["f0", "f1", "f2"] and result.frames == result.labelled_frames == 3
    assert result.per_image[0]["miou"] == 0.0 and result.per_image[1]["miou"] == 1.0
    expected = ConfusionMatrix(2)
    for frame in frames:
        expected.update(backend.answers[preprocess(frame.image).tobytes()], frame.mask)
    assert result.scores == expected.compute()
    assert set(result.scores) == set(METRIC_KEYS)
    np.testing.assert_array_equal(backend.seen[0], preprocess(frames[0].image))  # CLAHE was applied


def test_cli_labelled_folder_writes_json_and_per_image_csv(tmp_path, weights, capsys):
    data = write_dataset(tmp_path / "data")
    out_json, out_csv = tmp_path / "r" / "scores.json", tmp_path / "r" / "per_image.csv"
    assert main(["--weights", str(weights), "--data", str(data), "--json", str(out_json),
                 "--per-image", str(out_csv), "--set", "model.device=cpu"]) == 0
    table = capsys.readouterr().out
    assert "background" in table and "cell" in table and "mean" in table
    report = json.loads(out_json.read_text())
    assert set(METRIC_KEYS) <= set(report) and len(report["iou"]) == 2 and report["frames"] == 3
    with out_csv.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["name"] for row in rows] == ["f_000", "f_001", "f_002"] and "iou_1" in rows[0]


def test_cli_synthetic_sequence(tmp_path, weights, capsys):
    out_json = tmp_path / "s.json"
    assert main(["--weights", str(weights), "--synthetic", "--seed", "3", "--frames", "2", "--size", "64",
                 "--json", str(out_json), "--set", "model.device=cpu"]) == 0
    report = json.loads(out_json.read_text())
    assert report["labelled_frames"] == 2 and "seed 3" in report["data"]
    assert 0 <= report["pixel_acc"] <= 1


def test_cli_prediction_only_writes_masks(tmp_path, weights, capsys):
    data = write_dataset(tmp_path / "data", masks=False)
    assert main(["--weights", str(weights), "--data", str(data), "--masks", str(tmp_path / "pred"),
                 "--json", str(tmp_path / "p.json"), "--set", "model.device=cpu"]) == 0
    out = capsys.readouterr().out
    assert "fps" in out and "n/a" in out
    masks = sorted((tmp_path / "pred").glob("*.png"))
    assert len(masks) == 3 and cv2.imread(str(masks[0]), cv2.IMREAD_UNCHANGED).shape == (64, 64)
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["miou"] is None and sum(report["fractions"]) == pytest.approx(1.0)


def test_cli_video_is_prediction_only(tmp_path, weights, capsys):
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 25, (64, 48))
    assert writer.isOpened()
    for _ in range(4):
        writer.write(RNG.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    writer.release()
    assert main(["--weights", str(weights), "--data", str(video), "--json", str(tmp_path / "v.json"),
                 "--set", "model.device=cpu"]) == 0
    assert "no labels: prediction only" in capsys.readouterr().err
    report = json.loads((tmp_path / "v.json").read_text())
    assert (report["frames"], report["labelled_frames"], report["miou"]) == (4, 0, None)


def test_cli_dataset_with_a_missing_mask_is_exit_2(tmp_path, weights, capsys):
    data = write_dataset(tmp_path / "data")
    (data / "masks" / "f_001.png").unlink()
    assert main(["--weights", str(weights), "--data", str(data), "--set", "model.device=cpu"]) == 2
    err = capsys.readouterr().err
    assert "have no mask" in err and "f_001.png" in err and "Traceback" not in err


@pytest.mark.parametrize("args,message", [
    (["--weights", "/nonexistent.pt", "--synthetic"], "not found"),
    (["--weights", "W", "--data", "/nonexistent/dir"], "no such file"),
    (["--weights", "W", "--data", "D", "--seed", "3"], "--synthetic"),
])
def test_cli_bad_input_is_exit_2(args, message, weights, tmp_path, capsys):
    args = [str(weights) if a == "W" else str(write_dataset(tmp_path / "d")) if a == "D" else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
