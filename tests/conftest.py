"""Shared fixtures: the repository root and a quiet, single-threaded torch for fast, stable tests."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Exported ONNX graphs (the user cache, see app.pipeline.backends.onnx_backend) go to a temporary
    folder, not the real ~/.cache, for this process and the CLIs it starts."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True, scope="session")
def _torch_threads() -> None:
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip GPU-marked tests with a reason when no CUDA device is present."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none present)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained, tiny ICNet checkpoint (1 channel, classes background/cell) for CLI and pipeline runs."""
    from models import build_model, save_checkpoint

    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    model = build_model("icnet", num_classes=2, in_channels=1, backbone="resnet18", width=0.25)
    save_checkpoint(path, model, arch="icnet", options={"backbone": "resnet18", "width": 0.25},
                    class_names=["background", "cell"], palette=None, input_size=64,
                    normalization={"mode": "standardize"})
    return path


@pytest.fixture
def restore_signals():
    """Put back the SIGINT/SIGTERM handlers a CLI's guarded main installed in this process."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
