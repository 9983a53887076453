"""What every command line shares: the parser, ``--config``/``--set``, ``--device``/``--half``,
``-v``/``-q`` logging, and the one guarded main (:func:`app.errors.guarded_main`) that turns failures
into one line and an exit code.

Each CLI module (live, replay, export, train, evaluate, synth, info, benchmarks.fps; ``cellseg`` runs
them all, :mod:`app.main`) is thin: it builds a :class:`Parser`, calls the library, and runs its body
through :func:`main_of`.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from app.config import Config, load_config
from app.errors import EXIT_USAGE, UsageError, display_prog, guarded_main

__all__ = ["Parser", "add_config_arguments", "add_device_arguments", "add_verbosity_arguments", "config_from_args",
           "guarded_main", "setup_logging"]

log = logging.getLogger("app")


class Parser(argparse.ArgumentParser):
    """``argparse`` with the project's error path: a bad argument is one line on stderr,
    ``PROG: error: MESSAGE (see --help)``, and exit code 2 (argparse prints the whole usage first)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if isinstance(kwargs.get("prog"), str):
            kwargs["prog"] = display_prog(kwargs["prog"])
        super().__init__(*args, **kwargs)

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
                        help="configuration file (default: the shipped config.yaml, found from any directory)")
    parser.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[], dest="overrides",
                        help="override one config value, e.g. --set preprocess.clahe=false (repeatable)")


def config_from_args(args: argparse.Namespace, defaults: Sequence[str] = ()) -> Config:
    """The Config from ``--config``, then ``defaults`` (``section.key=value``), ``--set``, and ``--device``/
    ``--half`` (:func:`add_device_arguments`) when the parser has them, each winning over the one before."""
    device = getattr(args, "device", None)
    half = getattr(args, "half", False)
    flags = [*([f"model.device={device}"] if device else []), *(["model.precision=fp16"] if half else [])]
    config = load_config(args.config, [*defaults, *args.overrides, *flags])
    if half:
        _check_half(config.model.device)
    return config


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def device_name(text: str) -> str:
    """An argparse type: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"unknown device '{text}'; use auto, cpu, cuda or cuda:N")
    return text


def add_device_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, half: bool = True) -> None:
    """``--device auto|cpu|cuda|cuda:N`` (``model.device``) and, with ``half``, ``--half``
    (``model.precision=fp16``)."""
    parser.add_argument("--device", type=device_name, metavar="auto|cpu|cuda|cuda:N",
                        help="where the model runs (model.device; auto = CUDA when present)")
    if half:
        parser.add_argument("--half", action="store_true",
                            help="fp16 on CUDA (model.precision=fp16); an error with --device cpu, a warning "
                                 "when auto finds no GPU")


def _check_half(device: str) -> None:
    if device == "cpu":
        raise UsageError("--half runs fp16 on CUDA; the CPU runs fp32 (drop --half, or use --device cuda)")
    if device == "auto":
        import torch

        if not torch.cuda.is_available():
            log.warning("--half: no CUDA device found, running fp32 on the CPU")


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
