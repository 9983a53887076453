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

This module imports nothing from the project, so every layer (models included) can use it.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

log = logging.getLogger("app")

PATH_ERRORS: tuple[type[OSError], ...] = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
"""OS errors about a path the user gave (missing, not a folder, not writable): bad input, exit 2."""


class AppError(Exception):
    """Base of every error the project raises on purpose; ``exit_code`` is what a CLI exits with."""

    exit_code = EXIT_USAGE


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


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def guarded_main(prog: str, body: Callable[[], int]) -> int:
    """Run ``body`` (returns an exit code) and map every failure to one stderr line and an exit code.

    Ctrl-C and ``kill`` (SIGTERM) both raise KeyboardInterrupt, even in a shell that ignores SIGINT for
    background jobs, so the body's ``finally`` blocks finalise outputs. The traceback is logged at
    debug level (``-v``).
    """
    if threading.current_thread() is threading.main_thread():  # signal handlers: main thread only
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return body()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit:
        raise
    except Exception as exc:  # the one place every failure becomes a line and a code
        log.debug("traceback", exc_info=exc)
        print(f"{prog}: error: {describe(exc)}", file=sys.stderr)
        return exit_code_for(exc)
