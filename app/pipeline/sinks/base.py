"""What every sink shares: the :class:`Rendered` item it writes, the :class:`Sink` protocol, the
:class:`SinkSpec` a sink module registers (with what its path may be, checked before the first frame),
and :class:`SinkError`."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from app.files import Output, OutputError, check_folder, check_output, require_space, write_error
from app.pipeline.frames import Frame

if TYPE_CHECKING:
    from app.config import OutputConfig


class SinkError(OutputError):
    """An output cannot be created or written (message is one line naming the file). Exit 2 when raised
    as the sink opens (before the first frame); a failure mid-run reaches the user as the pipeline's
    "sinks stage failed" (exit 1)."""


@dataclass(frozen=True)
class Rendered:
    """One finished frame: the source frame, its H×W uint8 labels, the BGR overlay, latency so far (ms)."""

    frame: Frame
    labels: np.ndarray
    overlay: np.ndarray
    latency_ms: float
    readout: Any = None  # app.pipeline.readout.FrameReadout when objects are measured, else None


class Sink(Protocol):
    path: Path

    def write(self, item: Rendered) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class SinkSpec:
    """How a sink plugs in: the ``output.<config_key>`` path that turns it on, its CLI flag, and
    ``open(path, output_config, class_names) -> Sink``. ``bench_name`` is the file the benchmark writes.

    What the path may be: a file with one of ``suffixes`` (lower case, empty = any); ``streams``: a FIFO
    or character device is written directly (else refused); ``folder``: a folder of files instead.
    :meth:`check` tests it before the first frame.
    """

    config_key: str
    flag: str
    metavar: str
    help: str
    open: Callable[[str | Path, OutputConfig, Sequence[str]], Sink]
    bench_name: str
    suffixes: tuple[str, ...] = ()
    streams: bool = False
    folder: bool = False
    readout: bool = False  # writes the object read-out (Rendered.readout): the run measures objects for it

    def check(self, path: str | Path) -> Output:
        """The checked output for ``path`` (a folder output: the folder as its own target); raises
        :class:`SinkError` (one line naming the path)."""
        with sink_errors():
            if not self.folder:
                return check_output(path, suffixes=self.suffixes, streams=self.streams)
            folder = Path(path)
            if os.path.lexists(folder) and not folder.is_dir():
                raise OutputError(f"cannot write {folder}: it is not a folder")
            require_space(check_folder(folder, name=folder), name=folder)
            return Output(folder, folder)


@contextmanager
def sink_errors(output: Output | None = None) -> Iterator[None]:
    """Re-raise :class:`~app.files.OutputError` (and, with ``output``, any OSError, as a failed write to
    it) as :class:`SinkError`, keeping its message and exit code."""
    try:
        yield
    except SinkError:
        raise
    except OutputError as exc:
        raise SinkError(str(exc), exc.exit_code) from exc
    except OSError as exc:
        if output is None:
            raise
        error = write_error(output, exc)
        raise SinkError(str(error), error.exit_code) from exc
