"""One way to write a file: checked before anything is written, written under a temporary name beside
it, verified, flushed to disk and renamed into place only when complete.

A reader, or a crash, Ctrl-C or a full disk mid-write, never sees a half-written file under the real
name; on failure the temporary file is removed. Every output of the project goes through here:
checkpoints, ONNX graphs, JSON, CSV, PNGs, and media written by encoders that need a path (they choose
the format by the extension, which the temporary name keeps).

    with atomic_path("run.mp4", verify=probe) as partial:   # encoders: write to ``partial``
        encode(partial)
    with atomic_open("scores.csv", newline="") as handle:
        handle.write(...)
    write_text("stats.json", text)
    write_bytes("mask.png", png, fsync=False)

What an output path may name (:func:`check_output`, before the first byte):

* a regular file or a new name: written atomically; a folder that does not exist yet is created;
* a symbolic link: followed; its target is written atomically and the link stays;
* a FIFO, a character device (``/dev/null``, a terminal) or a descriptor (``/dev/stdout``): written
  directly, never replaced, for the outputs that can stream (``streams=True``: CSV, JSON lines, JSON);
  refused with one line for the formats that need a regular file (MP4, GIF, PNG);
* a folder, a block device, a socket: refused.

OpenCV's encoders do not report a full disk (``VideoWriter.release``, ``imwrite`` and
``imwriteanimation`` return normally and leave a truncated file), so every output is checked here:
free space when it is opened (:func:`require_space`; less than :data:`MIN_FREE_BYTES` is a full disk),
the file's size and an optional ``verify`` probe (the MP4 reopened, the GIF's trailer) before the
rename, and ``fsync``. Failures raise :class:`OutputError`, one line naming the file.

Imports nothing from the project but :mod:`app.errors`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from app.errors import EXIT_FAILURE, EXIT_USAGE, AppError

MIN_FREE_BYTES = 64 * 1024
"""Less free space than this in an output's folder is a full disk: refused when an output is opened,
and writers stop (leaving a complete file) before they reach it."""

STREAM_OPEN_TIMEOUT_S = 5.0
"""How long opening a FIFO waits for a process to read it."""

_DESCRIPTOR = re.compile(r"/dev/(?P<name>stdout|stderr)|/dev/fd/(?P<fd>\d+)|/proc/self/fd/(?P<proc_fd>\d+)")
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EPIPE, errno.EROFS}

Verify = Callable[[Path], "str | None"]
"""A probe of a finished temporary file: what is wrong with it, or None when it is complete."""


class OutputError(AppError, OSError):
    """An output cannot be written, or was not written completely; the message is one line naming it.

    ``exit_code`` is 2 (bad input) when found before anything was written (a bad path, extension or
    folder, a full disk), 1 when a write failed.
    """

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Output:
    """A checked output: ``name`` as given (for messages), ``target`` the file the bytes end up in (a
    symbolic link resolved), ``stream`` for a FIFO, character device or descriptor (written directly);
    ``descriptor`` the number of this process's descriptor the name stands for (``/dev/stdout``: 1)."""

    name: Path
    target: Path
    stream: bool = False
    descriptor: int | None = None

    @property
    def partial(self) -> Path:
        """The temporary file written until :func:`commit` (regular files only)."""
        return partial_path(self.target)


def partial_path(path: str | Path) -> Path:
    """The temporary name beside ``path`` (``.NAME.partial.EXT``: hidden, same extension)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def descriptor_of(path: str | Path) -> int | None:
    """The descriptor number ``path`` names (``/dev/stdout``, ``/dev/stderr``, ``/dev/fd/N``,
    ``/proc/self/fd/N``, or a symbolic link to one of them), else None."""
    name = str(path)
    for _ in range(40):  # the kernel's own limit on links followed
        match = _DESCRIPTOR.fullmatch(os.path.normpath(name))
        if match:
            return {"stdout": 1, "stderr": 2}[match["name"]] if match["name"] else int(match["fd"] or match["proc_fd"])
        if not os.path.islink(name):
            return None
        name = os.path.join(os.path.dirname(name), os.readlink(name))
    return None


def check_output(path: str | Path, *, suffixes: tuple[str, ...] = (), streams: bool = False) -> Output:
    """Check that ``path`` can be written, before anything is: what it names (see the module
    docstring), its extension (one of ``suffixes``, lower case with the dot; empty = any; not checked
    for streams), its folder (exists or can be created, writable) and the free space there.
    Raises :class:`OutputError` (exit 2)."""
    name = Path(path)
    if not str(path):
        raise OutputError("an output path is empty")
    descriptor = descriptor_of(name)
    try:
        mode: int | None = os.stat(name).st_mode
    except (FileNotFoundError, NotADirectoryError):
        mode = None
    except OSError as exc:
        raise OutputError(f"cannot write {name}: {exc.strerror or exc}") from exc
    if mode is not None and stat.S_ISDIR(mode):
        raise OutputError(f"cannot write {name}: it is a folder, not a file")
    if descriptor is not None or (mode is not None and (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode))):
        kind = "a descriptor" if descriptor is not None else _kind(mode or 0)
        if not streams:
            raise OutputError(f"cannot write {name}: it is {kind}, and this format needs a regular file "
                              f"(written whole, then renamed into place)")
        if not (_writable_descriptor(descriptor) if descriptor is not None else os.access(name, os.W_OK)):
            raise OutputError(f"cannot write {name}: {kind} that is not open for writing")
        return Output(name, name, stream=True, descriptor=descriptor)
    if mode is not None and not stat.S_ISREG(mode):
        raise OutputError(f"cannot write {name}: it is {_kind(mode)}")
    target = Path(os.path.realpath(name)) if name.is_symlink() else name
    if suffixes and target.suffix.lower() not in suffixes:
        shown = f"{name} (a link to {target})" if target != name else str(name)
        raise OutputError(f"cannot write {shown}: the extension must be {' or '.join(suffixes)}, "
                          f"not '{target.suffix}'")
    require_space(check_folder(target.parent, name=name), name=name)
    return Output(name, target)


def _writable_descriptor(descriptor: int) -> bool:
    try:
        flags = fcntl.fcntl(descriptor, fcntl.F_GETFL)
    except OSError:
        return False
    return flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)


def check_folder(folder: str | Path, *, name: str | Path | None = None) -> Path:
    """Check that ``folder`` is a writable folder or can be created (its nearest existing parent is a
    writable folder); returns that existing folder. ``name`` is the output named in the message.
    Raises :class:`OutputError` (exit 2)."""
    folder = Path(folder)
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    for_name = f" for {name}" if name is not None else ""
    if not existing.is_dir():
        raise OutputError(f"cannot create folder {folder}{for_name}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        reason = "read-only file system" if _read_only(existing) else "permission denied"
        raise OutputError(f"cannot write to folder {existing}{for_name}: {reason}")
    return existing


def _read_only(folder: Path) -> bool:
    return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)


def free_bytes(folder: str | Path) -> int:
    """Bytes an unprivileged writer may still use in ``folder``'s file system."""
    info = os.statvfs(folder)
    return info.f_bavail * info.f_frsize


def require_space(folder: str | Path, needed: int = 0, *, name: str | Path, exit_code: int = EXIT_USAGE) -> None:
    """Raise :class:`OutputError` naming ``name`` unless ``needed`` bytes plus :data:`MIN_FREE_BYTES`
    are free in ``folder``. Writers call it before each chunk (``exit_code`` 1 then: the disk filled
    during the run), so they stop with a complete file rather than a truncated one."""
    free = free_bytes(folder)
    if free < needed + MIN_FREE_BYTES:
        raise OutputError(f"cannot write {name}: no space left on the disk ({free // 1024} KiB free in {folder})",
                          exit_code)


def _full_disk(folder: Path) -> str:
    """"; the disk is full (N KiB free)" when it is, the likely reason a finished file is incomplete."""
    free = free_bytes(folder)
    return f"; the disk is full ({free // 1024} KiB free)" if free < MIN_FREE_BYTES else ""


def prepare(output: Output) -> None:
    """Create the folder a regular output goes in."""
    if output.stream:
        return
    try:
        output.target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create folder {output.target.parent}: {exc.strerror or exc}") from exc


def open_output(output: Output, mode: str = "w", newline: str | None = None) -> IO:
    """Open a checked output for writing: its temporary file, or the stream itself (a FIFO waits up to
    :data:`STREAM_OPEN_TIMEOUT_S` for a reader; text streams are line buffered)."""
    if not output.stream:
        prepare(output)
        try:
            return open(output.partial, mode, newline=newline)
        except OSError as exc:
            raise OutputError(f"cannot write {output.name}: {exc.strerror or exc}") from exc
    buffering = -1 if "b" in mode else 1
    return os.fdopen(_stream_descriptor(output), mode, buffering=buffering, newline=newline)


def _stream_descriptor(output: Output) -> int:
    name = output.name
    if output.descriptor is not None:  # this process's own stdout/fd N: a duplicate, whatever it is (pipe, file, socket)
        try:
            return os.dup(output.descriptor)
        except OSError as exc:
            raise OutputError(f"cannot write {name}: {exc.strerror or exc}") from exc
    deadline = time.monotonic() + STREAM_OPEN_TIMEOUT_S
    while True:
        try:
            fd = os.open(name, os.O_WRONLY | os.O_NONBLOCK)  # never blocks on a FIFO without reader
        except OSError as exc:
            if exc.errno == errno.ENXIO and time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            if exc.errno == errno.ENXIO:
                raise OutputError(f"cannot write {name}: no process read the FIFO within "
                                  f"{STREAM_OPEN_TIMEOUT_S:g} s") from exc
            raise OutputError(f"cannot write {name}: {exc.strerror or exc}") from exc
        os.set_blocking(fd, True)  # a slow reader holds the writer back, as a pipe should
        return fd


def write_error(output: Output | str | Path, exc: BaseException) -> OutputError:
    """The :class:`OutputError` (exit 1) for a write to ``output`` that failed with ``exc``."""
    if isinstance(exc, OutputError):
        return exc
    name = output.name if isinstance(output, Output) else output
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
    return OutputError(f"cannot write {name}: {reason}", EXIT_FAILURE)


def commit(output: Output, handle: IO | None = None, verify: Verify | None = None) -> None:
    """Finish a regular output: flush and close ``handle`` (if it was written through one), ``fsync``,
    check it is not empty and passes ``verify``, rename it into place and ``fsync`` the folder. A stream
    is only flushed and closed. On failure the temporary file is removed and :class:`OutputError`
    (exit 1) raised."""
    try:
        if handle is not None:
            handle.flush()
            if not output.stream:
                os.fsync(handle.fileno())
            handle.close()
        if output.stream:
            return
        if handle is None:
            _fsync_path(output.partial)
        problem = "the file came out empty" if os.stat(output.partial).st_size == 0 else None
        if problem is None and verify is not None:
            problem = verify(output.partial)
        if problem:
            raise OutputError(f"cannot write {output.name}: {problem}{_full_disk(output.target.parent)}",
                              EXIT_FAILURE)
        os.replace(output.partial, output.target)
        _fsync_path(output.target.parent)
    except BaseException as exc:
        discard(output, handle)
        if isinstance(exc, Exception):
            raise write_error(output, exc) from exc
        raise


def discard(output: Output, handle: IO | None = None) -> None:
    """Give up on an output: close ``handle`` (errors ignored) and remove the temporary file."""
    if handle is not None:
        try:
            handle.close()
        except OSError:
            pass
    if not output.stream:
        output.partial.unlink(missing_ok=True)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL or not path.is_dir():  # some file systems cannot sync a folder
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path, *, suffixes: tuple[str, ...] = (), verify: Verify | None = None) -> Iterator[Path]:
    """Yield the temporary path to write ``path`` through (checked with :func:`check_output`, its folder
    created); when the block ends without an exception it is verified and renamed into place (see
    :func:`commit`), otherwise removed."""
    output = check_output(path, suffixes=suffixes)
    prepare(output)
    try:
        yield output.partial
    except BaseException:
        discard(output)
        raise
    commit(output, verify=verify)


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", newline: str | None = None, *,
                suffixes: tuple[str, ...] = ()) -> Iterator[IO]:
    """``open`` for writing through a temporary name (see :func:`atomic_path`), flushed to disk before
    the rename; a FIFO or device is written directly. A write that fails for lack of space (or a
    vanished reader) raises :class:`OutputError` naming the file."""
    output = check_output(path, suffixes=suffixes, streams=True)
    handle = open_output(output, mode, newline)
    try:
        yield handle
    except BaseException as exc:
        discard(output, handle)
        if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
            raise write_error(output, exc) from exc
        raise
    commit(output, handle)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (or straight into a FIFO or device)."""
    with atomic_open(path) as handle:
        handle.write(text)


def write_bytes(path: str | Path, data: bytes, *, suffixes: tuple[str, ...] = (), fsync: bool = True) -> None:
    """Write ``data`` to the regular file ``path`` atomically, after checking there is room for it; the
    size on disk is checked before the rename. ``fsync=False`` skips flushing to the device (a folder of
    many small files, where the rename still keeps every name complete)."""
    output = check_output(path, suffixes=suffixes)
    prepare(output)
    require_space(output.target.parent, len(data), name=output.name, exit_code=EXIT_FAILURE)
    handle = open_output(output, "wb")
    try:
        handle.write(data)
        handle.flush()
        if fsync:
            os.fsync(handle.fileno())
        handle.close()
        size = os.stat(output.partial).st_size
        if size != len(data):
            raise OutputError(f"cannot write {output.name}: {size} of {len(data)} bytes reached the disk",
                              EXIT_FAILURE)
        os.replace(output.partial, output.target)
    except BaseException as exc:
        discard(output, handle)
        if isinstance(exc, Exception):
            raise write_error(output, exc) from exc
        raise
