"""Checkpoints: round trip, recorded recipe, and one clear error per kind of bad file."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from models import (
    CheckpointError,
    CheckpointMeta,
    build_model,
    default_palette,
    load_checkpoint,
    save_checkpoint,
)

OPTIONS = {"backbone": "resnet18", "width": 0.125}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = build_model("icnet", num_classes=3, in_channels=1, **OPTIONS)
    # Non-trivial BatchNorm statistics, so the round trip also covers buffers.
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 1, 64, 64))
    path = tmp_path_factory.mktemp("ckpt") / "icnet.pt"
    save_checkpoint(path, model, arch="icnet", options=OPTIONS, class_names=("background", "cell", "debris"),
                    palette=None, input_size=(64, 80), normalization={"mode": "standardize"},
                    train_config={"epochs": 3, "weights": Path("x.pt")}, metrics={"mIoU": np.float32(0.5)})
    return path, model.eval()


def test_round_trip_gives_identical_outputs(saved: tuple[Path, torch.nn.Module]) -> None:
    path, model = saved
    loaded, meta = load_checkpoint(path)
    assert not loaded.training
    x = torch.randn(2, 1, 70, 90)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_meta_carries_the_recipe(saved: tuple[Path, torch.nn.Module]) -> None:
    _, meta = load_checkpoint(saved[0], num_classes=3)
    assert isinstance(meta, CheckpointMeta)
    assert meta.arch == "icnet"
    assert meta.options == {**OPTIONS, "num_classes": 3, "in_channels": 1}
    assert (meta.num_classes, meta.in_channels) == (3, 1)
    assert meta.class_names == ("background", "cell", "debris")
    assert meta.palette == default_palette(3) and meta.palette[0] == (0, 0, 0)
    assert meta.input_size == (64, 80)
    assert meta.normalization == {"mode": "standardize"}
    assert meta.train_config == {"epochs": 3, "weights": "x.pt"}
    assert meta.metrics["mIoU"] == pytest.approx(0.5)
    assert CheckpointMeta.from_dict(json.loads(json.dumps(meta.to_dict()))) == meta


def test_no_temporary_file_is_left(saved: tuple[Path, torch.nn.Module]) -> None:
    assert [p.name for p in saved[0].parent.iterdir()] == [saved[0].name]


def _write_truncated(path: Path, source: Path) -> None:
    path.write_bytes(source.read_bytes()[: source.stat().st_size // 2])


@pytest.mark.parametrize("kind", ["missing", "truncated", "random_bytes", "plain_state_dict", "empty"])
def test_bad_files_raise_checkpoint_error(kind: str, tmp_path: Path, saved: tuple[Path, torch.nn.Module]) -> None:
    path = tmp_path / f"{kind}.pt"
    if kind == "truncated":
        _write_truncated(path, saved[0])
    elif kind == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "plain_state_dict":
        torch.save(saved[1].state_dict(), path)
    elif kind == "empty":
        path.write_bytes(b"")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message


@pytest.mark.parametrize("kind", ["pickled_model", "plain_pickle"])
def test_foreign_pickles_are_refused_with_the_reason_and_no_warning(
        kind: str, tmp_path: Path, saved: tuple[Path, torch.nn.Module], recwarn: pytest.WarningsRecorder) -> None:
    path = tmp_path / f"{kind}.pt"
    if kind == "pickled_model":
        torch.save(saved[1], path)  # a whole model: loading it would run arbitrary code, so it is refused
    else:
        path.write_bytes(pickle.dumps({"epoch": 3}, protocol=pickle.HIGHEST_PROTOCOL))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert "not a cellseg-checkpoint file" in message and "\n" not in message and len(message) < 300
    if kind == "pickled_model":
        assert "models.icnet.ICNet" in message
    assert not recwarn.list


def test_weights_that_do_not_fit_the_recorded_options_name_the_tensor(
        tmp_path: Path, saved: tuple[Path, torch.nn.Module]) -> None:
    payload = torch.load(saved[0], weights_only=True)
    payload["meta"]["options"]["width"] = 0.25
    path = tmp_path / "edited.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"weights do not fit 'icnet' .*size mismatch for backbone\."):
        load_checkpoint(path)


def test_wrong_class_count_is_named(saved: tuple[Path, torch.nn.Module]) -> None:
    with pytest.raises(CheckpointError, match="3 classes.*expected 2"):
        load_checkpoint(saved[0], num_classes=2)


def test_save_rejects_a_recipe_that_does_not_match_the_model(tmp_path: Path) -> None:
    model = build_model("icnet", num_classes=2, in_channels=1, **OPTIONS)
    common = {"class_names": ("a", "b"), "palette": None, "input_size": 64, "normalization": {"mode": "standardize"}}
    with pytest.raises(CheckpointError):
        save_checkpoint(tmp_path / "a.pt", model, arch="icnet", options={**OPTIONS, "width": 0.25}, **common)
    with pytest.raises(CheckpointError):
        save_checkpoint(tmp_path / "b.pt", model, arch="icnet", options=OPTIONS,
                        **{**common, "class_names": ("only one",)})
    with pytest.raises(CheckpointError):
        save_checkpoint(tmp_path / "c.pt", model, arch="icnet", options=OPTIONS,
                        **{**common, "normalization": {"mode": "mean_std", "mean": [0.5, 0.5], "std": [1, 1]}})
    assert not list(tmp_path.iterdir())


def test_default_palette_has_distinct_colours() -> None:
    palette = default_palette(40)
    assert len(set(palette)) == 40
    assert all(0 <= c <= 255 for colour in palette for c in colour)


@pytest.mark.parametrize("kind, message", [("folder", "is a folder"), ("device", "not a regular file"),
                                           ("empty", "is empty"), ("onnx", "is an ONNX graph")])
def test_what_cannot_be_a_checkpoint_is_named(kind, message, tmp_path):
    from models import load_checkpoint

    if kind == "folder":
        path = tmp_path
    elif kind == "device":
        path = Path("/dev/null")
    elif kind == "empty":
        path = tmp_path / "empty.pt"
        path.write_bytes(b"")
    else:
        from models import build_model
        from models.onnx_export import export_onnx

        path = export_onnx(build_model("fcn_resnet18", width=0.125, num_classes=2).eval(), tmp_path / "m.onnx",
                           in_channels=1)
        renamed = path.with_suffix(".pt")  # the content, not the name, gives it away
        path.rename(renamed)
        path = renamed
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)
