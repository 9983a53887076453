"""The export CLI: ONNX parity for every registered model, exit codes, and one-line errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import app.export
from models import build_model, list_models, model_options, save_checkpoint


def tiny_checkpoint(path: Path, name: str, in_channels: int = 1) -> Path:
    """Save a freshly initialised, tiny version of model ``name`` (width 0.125, ResNet-18, aux head on)."""
    valid = model_options(name)
    options: dict[str, object] = {"width": 0.125}
    if "backbone" in valid:
        options["backbone"] = "resnet18"
    if "aux" in valid:
        options["aux"] = True
    torch.manual_seed(0)
    model = build_model(name, num_classes=3, in_channels=in_channels, **options)
    save_checkpoint(path, model, arch=name, options=options, class_names=("background", "cell", "debris"),
                    palette=None, input_size=(64, 64), normalization={"mode": "standardize"})
    return path


def _diffs(stdout: str) -> dict[str, float]:
    return {m[0]: float(m[1]) for m in re.findall(r"^(\d+x\d+): max \|onnx - torch\| = (\S+)", stdout, re.M)}


@pytest.mark.parametrize("name", list_models())
def test_every_model_exports_with_parity(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = tiny_checkpoint(tmp_path / f"{name}.pt", name, in_channels=3 if name == "fcn8s" else 1)
    out = tmp_path / f"{name}.onnx"
    sizes = ["64x64", "70x90", "97x33", "203x317"]  # odd sides and aspect ratios, batches of two
    status = app.export.main(["--weights", str(weights), "--out", str(out), "--sizes", *sizes])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    diffs = _diffs(captured.out)
    assert set(diffs) == set(sizes)
    assert max(diffs.values()) <= 1e-4
    assert out.is_file()


def test_default_sizes_include_one_that_is_not_a_multiple_of_32(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    weights = tiny_checkpoint(tmp_path / "icnet.pt", "icnet")
    assert app.export.main(["--weights", str(weights)]) == 0
    sizes = [tuple(map(int, key.split("x"))) for key in _diffs(capsys.readouterr().out)]
    assert (64, 64) in sizes and any(h % 32 or w % 32 for h, w in sizes)
    assert weights.with_suffix(".onnx").is_file()


def test_static_and_fp16_exports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = tiny_checkpoint(tmp_path / "icnet.pt", "icnet")
    assert app.export.main(["--weights", str(weights), "--out", str(tmp_path / "s.onnx"), "--static", "64", "96"]) == 0
    assert set(_diffs(capsys.readouterr().out)) == {"64x96"}
    assert app.export.main(["--weights", str(weights), "--out", str(tmp_path / "h.onnx"), "--fp16",
                            "--sizes", "64x64", "70x90"]) == 0
    assert max(_diffs(capsys.readouterr().out).values()) <= 1e-2


def test_parity_failure_exits_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    weights = tiny_checkpoint(tmp_path / "icnet.pt", "icnet")
    from models.onnx_export import Parity

    monkeypatch.setattr(app.export, "check_parity",
                        lambda model, path, sizes, fp16: [Parity(sizes[0], 0.5, 5.0, 1e-3)])
    assert app.export.main(["--weights", str(weights)]) == 1
    assert "differs from PyTorch" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["missing", "random_bytes", "plain_state_dict"])
def test_bad_weights_exit_2_with_one_line(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "w.pt"
    if kind == "random_bytes":
        weights.write_bytes(np.random.default_rng(0).bytes(1000))
    elif kind == "plain_state_dict":
        torch.save(build_model("fcn_resnet18", width=0.125).state_dict(), weights)
    assert app.export.main(["--weights", str(weights), "--out", str(tmp_path / "m.onnx")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("app.export: error:") and str(weights) in lines[0]
    assert not (tmp_path / "m.onnx").exists()


def test_static_size_conflicting_with_sizes_exits_2(tmp_path: Path) -> None:
    weights = tiny_checkpoint(tmp_path / "icnet.pt", "icnet")
    assert app.export.main(["--weights", str(weights), "--static", "64", "64", "--sizes", "70x90"]) == 2


def test_cli_process_reports_missing_weights_without_traceback(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "app.export", "--weights", str(tmp_path / "none.pt")],
                            capture_output=True, text=True, timeout=120, cwd=Path(app.export.__file__).parent.parent)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("app.export: error:") and "not found" in lines[0]


def test_help_explains_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        app.export.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--weights", "--out", "--opset", "--fp16", "--static", "--sizes"))
