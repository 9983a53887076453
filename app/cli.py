"""What every command line shares: the parser, ``--config``/``--set``, ``-v``/``-q`` logging, and the one
guarded main (:func:`app.errors.guarded_main`) that turns failures into one line and an exit code.

Each CLI module (live, replay, export, train, evaluate, synth, benchmarks.fps) is thin: it builds a
:class:`Parser`, calls the library, and runs its body through :func:`main_of`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from app.config import Config, load_config
from app.errors import EXIT_USAGE, guarded_main

__all__ = ["Parser", "add_config_arguments", "add_verbosity_arguments", "config_from_args", "guarded_main",
           "setup_logging"]


class Parser(argparse.ArgumentParser):
    """``argparse`` with the project's error path: a bad argument is one line on stderr,
    ``PROG: error: MESSAGE (see --help)``, and exit code 2 (argparse prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def doc_parser(prog: str, doc: str) -> Parser:
    """A :class:`Parser` whose description is the first paragraph of a CLI module's docstring and whose
    epilog is the rest (examples, policies)."""
    paragraphs = doc.split("\n\n")
    return Parser(prog=f"python -m {prog}", description=paragraphs[0].replace("``", ""),
                  formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n\n".join(paragraphs[1:]))


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config PATH`` and repeatable ``--set section.key=value`` to a CLI parser."""
    parser.add_argument("--config", metavar="PATH", default=None,
                        help="configuration file (default: config.yaml in the repository)")
    parser.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[], dest="overrides",
                        help="override one config value, e.g. --set preprocess.clahe=false (repeatable)")


def config_from_args(args: argparse.Namespace) -> Config:
    """Build the Config from the ``--config``/``--set`` arguments added by :func:`add_config_arguments`."""
    return load_config(args.config, args.overrides)


def add_verbosity_arguments(parser: argparse.ArgumentParser) -> None:
    """``-v`` (debug logging and tracebacks) and ``-q`` (warnings and errors only)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    group.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Plain ``level: message`` lines on stderr. OpenCV's and FFmpeg's own log lines are silenced unless
    ``verbose``: every failure they report also reaches us as a return value or exception and is
    reported once, in our words ("skipping unreadable image ...", "stream ... could not be opened")."""
    import cv2

    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(stream=sys.stderr, level=level, format="%(levelname)s: %(message)s")
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_INFO if verbose
                                  else cv2.utils.logging.LOG_LEVEL_SILENT)
    if not verbose:
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")


def main_of(prog: str, parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int],
            argv: list[str] | None = None) -> int:
    """Parse ``argv``, set up logging from ``-v``/``-q`` when the parser has them, and run
    ``run(args)`` through :func:`~app.errors.guarded_main`."""
    args = parser.parse_args(argv)
    if hasattr(args, "verbose"):
        setup_logging(args.verbose, getattr(args, "quiet", False))
    return guarded_main(prog, lambda: run(args))
