"""The files the package ships, config.yaml and the weights, found wherever it is installed.

A wheel carries them inside the package as ``app/_data/`` (copied there at build time by setup.py);
a source checkout, editable install or not, keeps them at its top level, where git tracks them. Both
are found through :mod:`importlib.resources`, never through the current directory. Exported ONNX
graphs go to the user's cache folder (:func:`cache_dir`), never into the package.
"""

from __future__ import annotations

import hashlib
import os
from importlib import resources
from pathlib import Path

DATA_DIR = "_data"
WEIGHTS_DIR = "weights"


def shipped(name: str) -> Path | None:
    """The shipped file ``name`` (``"config.yaml"``, ``"weights/icnet_interferogram.pt"``): the wheel's
    copy, else the checkout's; None when neither exists."""
    package = resources.files("app")
    for candidate in (package.joinpath(DATA_DIR, name), package.joinpath("..", name)):
        path = Path(str(candidate)).resolve()
        if path.is_file():
            return path
    return None


def config_file() -> Path:
    """The shipped config.yaml (the checkout's path, even if missing, when no copy is found)."""
    return shipped("config.yaml") or Path(str(resources.files("app").joinpath("..", "config.yaml"))).resolve()


def weights_file(path: str | Path) -> Path:
    """``path`` when it exists (or is absolute); else the shipped weights it names, as
    ``weights/NAME.pt`` or ``NAME.pt``, when there is one; else ``path`` unchanged."""
    given = Path(path)
    if given.exists() or given.is_absolute() or not given.parts:
        return given
    if given.parts[0] == WEIGHTS_DIR and len(given.parts) == 2:
        given_name = given.parts[1]
    elif len(given.parts) == 1:
        given_name = given.name
    else:
        return given
    return shipped(f"{WEIGHTS_DIR}/{given_name}") or given


def in_package(path: str | Path) -> bool:
    """Whether ``path`` is one of the installed package's own files (a folder that may be read-only)."""
    return Path(path).resolve().is_relative_to(Path(str(resources.files("app"))).resolve())


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/cellseg``, else ``~/.cache/cellseg`` (not created here)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cellseg"


def content_key(path: str | Path, length: int = 16) -> str:
    """The first ``length`` hex digits of the SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]
