"""One error path for every command: the error base, :func:`first_line`, exit codes and the guarded main.

Library code raises a subclass of :class:`AppError` (``SourceError``, ``CheckpointError``, ...; each
keeps its builtin base too, e.g. ``ValueError``) whose ``exit_code`` says what kind of failure it is.
Every CLI runs its body through :func:`guarded_main`, which turns any exception into one line on
stderr, ``PROG: error: MESSAGE``, and the exit code:

* :data:`EXIT_USAGE` (2): bad input (arguments, config, files, weights) — an :class:`AppError` by default,
  and the :data:`PATH_ERRORS` (a missing, unwritable or wrong kind of path);
* :data:`EXIT_FAILURE` (1): a runtime failure (a stage failed mid-run, a bug); unexpected exceptions
  add their type name to the line;
* :data:`EXIT_INTERRUPTED` (130): Ctrl-C or SIGTERM, with outputs finalised.

Ctrl-C (and SIGTERM): under :func:`guarded_main`, the first press of a command raises
KeyboardInterrupt, except inside :func:`deferred_interrupts` (a pipeline running or finishing its
outputs), where it only calls the holder back (sets a stop event), so nothing is cut off half-written.
From then on the command is shutting down: a second press is absorbed with one line, a third within
:data:`ABORT_WINDOW_S` of the second aborts at once with one line naming what is left unfinished (exit
130, through ``os._exit``: no C++ destructor runs under threads still busy in native code, which would
abort the process with "terminate called ..."). An error whose ``left_running`` names threads that
could not be stopped ends the process the same way once its line is printed.

This module imports nothing from the project, so every layer (models included) can use it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

ABORT_WINDOW_S = 2.0
"""While outputs are being finished, a third Ctrl-C this soon (seconds) after the second aborts."""

log = logging.getLogger("app")

PATH_ERRORS: tuple[type[OSError], ...] = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
"""OS errors about a path the user gave (missing, not a folder, not writable): bad input, exit 2."""


class AppError(Exception):
    """Base of every error the project raises on purpose; ``exit_code`` is what a CLI exits with."""

    exit_code = EXIT_USAGE
    left_running: tuple[str, ...] = ()
    """Threads this error leaves behind because they could not be stopped (e.g. a stage stuck in a
    model call); :func:`guarded_main` then ends the process with ``os._exit`` after its line."""


class UsageError(AppError):
    """A problem with what the user asked for, found by a CLI itself (exit 2)."""


def first_line(error: BaseException | str | None) -> str:
    """The first non-empty line of an exception's (or a text's) message; the exception's type name when
    it has no message, "" for an empty text."""
    text = error if isinstance(error, str) or error is None else str(error)
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__ if isinstance(error, BaseException) else ""


def exit_code_for(error: BaseException) -> int:
    """The exit code a CLI returns for ``error`` (see the module docstring)."""
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, AppError):
        return int(error.exit_code)
    if isinstance(error, PATH_ERRORS):
        return EXIT_USAGE
    return EXIT_FAILURE


def describe(error: BaseException) -> str:
    """One line for the user: the message of an :class:`AppError` (or FileNotFoundError); the type name
    and message of anything unexpected."""
    if isinstance(error, (AppError, *PATH_ERRORS)):
        return first_line(error)
    text = first_line(error)
    name = type(error).__name__
    return name if text == name else f"{name}: {text}"


class Interrupts:
    """What :func:`deferred_interrupts` yields: ``interrupted`` turns True at the first Ctrl-C (or
    SIGTERM) inside it; ``presses`` counts them."""

    def __init__(self, on_interrupt: Callable[[], None], unfinished: Callable[[], list[str]]) -> None:
        self.on_interrupt = on_interrupt
        self.unfinished = unfinished
        self.presses = 0

    @property
    def interrupted(self) -> bool:
        return self.presses > 0


class _Signals:
    """The command's Ctrl-C record, read and written by :func:`_on_signal` in the main thread."""

    def __init__(self) -> None:
        self.prog = ""  # the command guarded_main runs ("" outside one)
        self.presses: list[float] = []  # time.monotonic() of each press since the command started
        self.holders: list[Interrupts] = []  # open deferred_interrupts() blocks, innermost last


_signals = _Signals()


def _say(line: str) -> None:
    """One line on stderr from a signal handler: straight to the file descriptor, since the handler may
    have interrupted a write to ``sys.stderr`` (writing there again would raise a reentrancy error)."""
    try:
        sys.stderr.flush()
    except (OSError, RuntimeError, ValueError):
        pass
    os.write(2, (line + "\n").encode(errors="replace"))


def _exit_now(code: int) -> None:
    """Leave at once with ``code``: stdout/stderr flushed, but no interpreter shutdown (threads stuck in
    native code would meet C++ destructors there and abort the process: "terminate called ...")."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, RuntimeError, ValueError):
            pass
    os._exit(code)


def _on_signal(signum: int, frame: Any) -> None:
    """SIGINT/SIGTERM, in the main thread: see the module docstring."""
    now = time.monotonic()
    presses = _signals.presses
    presses.append(now)
    holders = _signals.holders
    if len(presses) == 1 and not holders:
        raise KeyboardInterrupt
    prog = _signals.prog or os.path.basename(sys.argv[0]) or "python"
    if len(presses) >= 3 and now - presses[-2] <= ABORT_WINDOW_S:
        left = [item for holder in holders for item in holder.unfinished()]
        _say(f"{prog}: aborted by a third Ctrl-C" + (f"; left unfinished: {', '.join(left)}" if left else ""))
        _exit_now(EXIT_INTERRUPTED)
    if len(presses) >= 2:
        _say(f"{prog}: still finishing the outputs; Ctrl-C again within {ABORT_WINDOW_S:g} s aborts")
    for holder in holders:
        holder.presses += 1
        holder.on_interrupt()


@contextmanager
def deferred_interrupts(on_interrupt: Callable[[], None] = lambda: None,
                        unfinished: Callable[[], list[str]] = list) -> Iterator[Interrupts]:
    """Inside this block Ctrl-C and SIGTERM do not raise: each press calls ``on_interrupt()`` (e.g. set a
    stop event) and counts in the yielded :class:`Interrupts`; the second press of the command is
    absorbed with one line, a third within :data:`ABORT_WINDOW_S` of it aborts, naming
    ``unfinished()`` (what would be lost, e.g. ``["sinks (run.gif)"]``). Handlers are swapped only in
    the main thread (the one signals reach) and restored on exit; outside :func:`guarded_main` the
    presses are counted from the start of the block."""
    holder = Interrupts(on_interrupt, unfinished)
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    outermost = not _signals.prog and not _signals.holders  # not under guarded_main: count afresh
    if outermost:
        _signals.presses = []
    _signals.holders.append(holder)
    try:
        yield holder
    finally:
        _signals.holders.remove(holder)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if outermost:
            _signals.presses = []


_INVOKED_AS: dict[str, str] = {}  # module name (app.replay) -> what the user typed (cellseg replay)


@contextmanager
def invoked_as(module: str, name: str) -> Iterator[None]:
    """While it lasts, name ``module``'s command ``name`` in its error lines, usage and help
    (``cellseg replay`` instead of ``app.replay`` when run through the ``cellseg`` dispatcher)."""
    _INVOKED_AS[module] = name
    try:
        yield
    finally:
        _INVOKED_AS.pop(module, None)


def display_prog(prog: str) -> str:
    """What to call ``prog`` (a module name, or ``python -m MODULE``) in messages to the user."""
    module = prog.removeprefix("python -m ")
    return _INVOKED_AS.get(module, prog)


def guarded_main(prog: str, body: Callable[[], int]) -> int:
    """Run ``body`` (returns an exit code) and map every failure to one stderr line and an exit code.

    The first Ctrl-C or ``kill`` (SIGTERM) raises KeyboardInterrupt (outside
    :func:`deferred_interrupts`), even in a shell that ignores SIGINT for background jobs, so the body's
    ``finally`` blocks finalise outputs; later ones are absorbed, or abort (see the module docstring).
    The traceback is logged at debug level (``-v``). An error with exit code 130 (a stage that would not
    stop after Ctrl-C) reads ``PROG: interrupted: MESSAGE``; one that ``left_running`` threads ends the
    process right after its line. After an interrupted command, both signals stay ignored: what is left
    is the interpreter's exit, and a press there would kill the process instead of letting it exit 130.
    """
    prog = display_prog(prog)
    _signals.prog, _signals.presses = prog, []
    main = threading.current_thread() is threading.main_thread()
    if main:  # signal handlers: main thread only
        signal.signal(signal.SIGINT, _on_signal)
        signal.signal(signal.SIGTERM, _on_signal)
    try:
        return body()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit:
        raise
    except Exception as exc:  # the one place every failure becomes a line and a code
        log.debug("traceback", exc_info=exc)
        code = exit_code_for(exc)
        print(f"{prog}: {'interrupted' if code == EXIT_INTERRUPTED else 'error'}: {describe(exc)}", file=sys.stderr)
        if getattr(exc, "left_running", ()):
            _exit_now(code)
        return code
    finally:
        if main and _signals.presses:  # interrupted, all finished: only the interpreter's exit is left,
            for sig in (signal.SIGINT, signal.SIGTERM):  # which would put the default (kill) handler back
                signal.signal(sig, signal.SIG_IGN)
        _signals.prog = ""
