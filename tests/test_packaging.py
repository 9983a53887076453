"""Packaging: the wheel carries config.yaml and the weights, ``cellseg`` works from any directory in a
fresh venv, the shipped files resolve whatever the current directory, and ONNX Runtime's variant
follows the platform."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

from app import resources
from app.config import load_config
from tests.conftest import REPO_ROOT

SHIPPED_WEIGHTS = "weights/icnet_interferogram.pt"


@pytest.mark.parametrize(("system", "machine", "expected"), [
    ("Linux", "x86_64", "onnxruntime-gpu"), ("Linux", "aarch64", "onnxruntime-gpu"),
    ("Windows", "AMD64", "onnxruntime-gpu"), ("Darwin", "arm64", "onnxruntime"),
    ("Darwin", "x86_64", "onnxruntime"), ("Windows", "ARM64", "onnxruntime"), ("Linux", "ppc64le", "onnxruntime"),
])
def test_exactly_one_onnx_runtime_per_platform(system: str, machine: str, expected: str) -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    environment = {"platform_system": system, "platform_machine": machine}
    chosen = [requirement.name for requirement in map(Requirement, project["dependencies"])
              if requirement.name.startswith("onnxruntime")
              and (requirement.marker is None or requirement.marker.evaluate(environment))]
    assert chosen == [expected]


def test_console_script_and_shipped_files_are_declared() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == {"cellseg": "app.main:main"}
    sys.path.insert(0, str(REPO_ROOT))
    try:
        import setup  # the build step that copies the shipped files into the wheel
    finally:
        sys.path.remove(str(REPO_ROOT))
    files = [path.as_posix() for path in setup.shipped_files()]
    assert "config.yaml" in files and SHIPPED_WEIGHTS in files and "weights/README.md" in files
    assert not any(name.endswith(".last.pt") for name in files)


def test_shipped_files_resolve_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resources.config_file() == REPO_ROOT / "config.yaml"
    assert resources.weights_file(SHIPPED_WEIGHTS) == REPO_ROOT / SHIPPED_WEIGHTS
    assert resources.weights_file("icnet_interferogram.pt") == REPO_ROOT / SHIPPED_WEIGHTS
    assert resources.weights_file("elsewhere/none.pt") == Path("elsewhere/none.pt")  # not found: left to say so
    config = load_config()
    assert Path(config.model.weights) == REPO_ROOT / SHIPPED_WEIGHTS
    assert config.model == load_config(REPO_ROOT / "config.yaml").model


def test_a_file_of_that_name_in_the_current_directory_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    (tmp_path / SHIPPED_WEIGHTS).write_bytes(b"mine")
    assert resources.weights_file(SHIPPED_WEIGHTS) == Path(SHIPPED_WEIGHTS)


def test_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert resources.cache_dir() == tmp_path / "cellseg"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert resources.cache_dir() == Path.home() / ".cache" / "cellseg"


def _checkout_copy(target: Path) -> Path:
    """What a fresh clone holds (tracked and not-ignored files), so the build leaves the checkout alone."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO_ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pip_install_gives_a_working_cellseg_in_a_fresh_venv(tmp_path: Path) -> None:
    """``pip install CHECKOUT`` into a fresh venv, then ``cellseg synth`` and ``cellseg replay --gif`` from
    another directory. The venv gets its own copy of the project from the wheel; only the third-party
    dependencies (torch, OpenCV, ...) and the build backend are borrowed from this venv, through a .pth
    line, so nothing is downloaded."""
    if shutil.which("git") is None:
        pytest.skip("git is needed to list the checkout's files")
    checkout = _checkout_copy(tmp_path / "checkout")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    (purelib / "borrowed_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-build-isolation", "--quiet", str(checkout)],
                             capture_output=True, text=True, env=env, timeout=240)
    assert install.returncode == 0, install.stderr[-3000:]

    data = purelib / "app" / "_data"
    assert (data / "config.yaml").read_bytes() == (REPO_ROOT / "config.yaml").read_bytes()
    assert (data / SHIPPED_WEIGHTS).read_bytes() == (REPO_ROOT / SHIPPED_WEIGHTS).read_bytes()
    cellseg = python.parent / ("cellseg.exe" if os.name == "nt" else "cellseg")
    assert cellseg.is_file()

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([str(python), "-c", "import app; print(app.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(purelib), where  # the wheel's copy, not this checkout
    synth = subprocess.run([str(cellseg), "synth", "--out", "seq", "--frames", "3", "--size", "96", "-q"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert synth.returncode == 0, synth.stderr
    replay = subprocess.run([str(cellseg), "replay", "seq", "--gif", "x.gif", "--set", "model.device=cpu"],
                            cwd=work, env=env, capture_output=True, text=True, timeout=180)
    assert replay.returncode == 0, replay.stderr
    gif = work / "x.gif"
    assert gif.read_bytes()[:6] in (b"GIF87a", b"GIF89a") and gif.read_bytes()[-1:] == b";"
    assert str(data / SHIPPED_WEIGHTS) in replay.stderr  # the default weights came from the package
    assert not list((work).glob("*.onnx")) and not (data / "weights" / "icnet_interferogram.onnx").exists()
