"""``cellseg info``: the model card a checkpoint carries, as text and JSON; bad files are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.info import main
from models import load_checkpoint
from tests.conftest import REPO_ROOT

SHIPPED = REPO_ROOT / "weights" / "icnet_interferogram.pt"


def test_the_shipped_model_card(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(SHIPPED)]) == 0
    card = {line.split("  ", 1)[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "icnet (backbone=resnet18, width=0.25), 0.84 M parameters" in card["architecture"]
    assert "0 background (0, 0, 0), 1 cell (0, 220, 0), 2 contact" in card["classes"]
    assert "3 channel(s), trained on 256×256" in card["input"]
    assert "hologram=offaxis" in card["preprocessing"] and "hologram_filter=smooth_disk" in card["preprocessing"]
    assert "epoch 1" in card["metrics"]
    assert card["training command"].split("  ", 1)[1].strip().startswith("python -m app.train --synthetic")


def test_json_holds_what_the_checkpoint_records(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(SHIPPED), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    model, meta = load_checkpoint(SHIPPED)
    assert card["arch"] == meta.arch and card["options"] == meta.options
    assert card["class_names"] == list(meta.class_names) and card["input_size"] == list(meta.input_size)
    assert card["parameters"] == sum(p.numel() for p in model.parameters())
    assert card["metrics"]["val"]["miou"] == pytest.approx(meta.metrics["val"]["miou"])
    assert card["preprocessing"] == meta.train_config["preprocess"]
    assert card["training_command"] == meta.train_config["command"] and card["training_data"] == "synthetic"


def test_without_a_file_it_describes_the_shipped_model_from_any_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--json"]) == 0
    assert Path(json.loads(capsys.readouterr().out)["file"]) == SHIPPED


def test_a_checkpoint_without_metrics_or_command_says_so(tiny_weights: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tiny_weights)]) == 0
    out = capsys.readouterr().out
    assert "metrics           none recorded" in out and "training command  not recorded" in out


@pytest.mark.parametrize("kind", ["missing", "not_a_checkpoint", "folder"])
def test_a_bad_file_is_one_line_and_exit_2(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "w.pt"
    if kind == "not_a_checkpoint":
        path.write_bytes(b"\x00" * 100)
    elif kind == "folder":
        path.mkdir()
    assert main([str(path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1 and lines[0].startswith("app.info: error: ") and str(path) in lines[0]
