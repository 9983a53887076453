"""Build step that puts config.yaml and the shipped weights into the wheel as ``app/_data/``.

They stay at the top level of the repository (one copy, in git); :mod:`app.resources` finds the
wheel's copy, or the checkout's. Everything else is in pyproject.toml.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = ("config.yaml", "weights/*.pt", "weights/*.md", "weights/*.csv")
NOT_SHIPPED = (".last.pt",)  # resumable training state


def shipped_files() -> list[Path]:
    """The top-level files copied into the wheel, relative to the repository root."""
    found = {path.relative_to(ROOT) for pattern in SHIPPED for path in ROOT.glob(pattern)}
    return sorted(path for path in found if not path.name.endswith(NOT_SHIPPED))


class BuildWithData(build_py):
    """``build_py``, plus the shipped files under ``app/_data`` (not for an editable install, which
    reads the checkout's own files)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for relative in shipped_files():
            target = Path(self.build_lib) / "app" / "_data" / relative
            self.mkpath(str(target.parent))
            self.copy_file(str(ROOT / relative), str(target))


if __name__ == "__main__":  # as pip's build backend runs it; importing it (tests) builds nothing
    setup(cmdclass={"build_py": BuildWithData})
