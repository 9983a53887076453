"""Export a checkpoint to ONNX and check it against PyTorch: ``python -m app.export --weights W.pt``.

Exit status: 0 when ONNX Runtime matches PyTorch at every checked size, 1 when the export fails or a
difference exceeds the tolerance (:func:`models.onnx_export.parity_tolerance`: 1e-4 of the logit scale
plus a resize-rounding term that grows with the side, 1e-2 of the scale for fp16), 2 for bad input (missing or unusable
weights, bad sizes). Progress goes to stderr (``-q``: none), the per-size results to stdout.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from app.cli import Parser, add_config_arguments, add_verbosity_arguments, config_from_args, main_of
from app.errors import EXIT_FAILURE, EXIT_OK, AppError, UsageError, first_line
from app.resources import in_package, weights_file
from models import load_checkpoint
from models.onnx_export import ExportError, check_parity, export_onnx

MIN_SIDE = 32

log = logging.getLogger("app.export")


def parse_size(text: str) -> tuple[int, int]:
    """"HxW" (or "H×W") -> (H, W), both at least 32."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        height, width = (int(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size '{text}' must look like HxW, e.g. 70x90") from None
    if min(height, width) < MIN_SIDE:
        raise argparse.ArgumentTypeError(f"size '{text}' is too small; both sides must be at least {MIN_SIDE}")
    return height, width


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m app.export",
        description="Export a checkpoint to ONNX (dynamic batch, height and width unless --static) and check "
                    "that ONNX Runtime gives the same logits as PyTorch on random inputs at two or more sizes.",
        epilog="Exit status: 0 parity within tolerance, 1 export failed or difference above tolerance "
               "(relative to the logit scale, see README), 2 bad input.")
    parser.add_argument("--weights", metavar="W.pt",
                        help="checkpoint written by training (default: model.weights, the shipped model)")
    parser.add_argument("--out", metavar="M.onnx", default=None,
                        help="ONNX file to write (default: the weights path with suffix .onnx; for the shipped "
                             "weights, NAME.onnx in the current folder)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version (default: 17)")
    parser.add_argument("--half", "--fp16", dest="fp16", action="store_true",
                        help="export a float16 graph, for GPU runtimes (also when model.precision is fp16)")
    parser.add_argument("--static", nargs=2, type=int, metavar=("H", "W"), default=None,
                        help="fix height and width to H×W instead of leaving them dynamic")
    parser.add_argument("--sizes", nargs="+", type=parse_size, metavar="HxW", default=None,
                        help="input sizes to check (default: the training size and a smaller one that is "
                             "not a multiple of 32)")
    add_config_arguments(parser)
    add_verbosity_arguments(parser)
    return parser


def default_sizes(input_size: tuple[int, int]) -> list[tuple[int, int]]:
    """The training size, a smaller odd one and 203×317 (odd sides, where resize rounding shows; they
    catch size bugs that multiples of 32 hide)."""
    height, width = input_size
    odd = (max(MIN_SIDE + 6, height // 2 + 6), max(MIN_SIDE + 10, width // 2 + 10))
    return [(max(MIN_SIDE, height), max(MIN_SIDE, width)), odd, (203, 317)]


class ParityError(AppError):
    """ONNX Runtime's output differs from PyTorch's by more than the tolerance (exit 1)."""

    exit_code = EXIT_FAILURE


def default_out(weights: Path) -> Path:
    """Beside the weights; NAME.onnx in the current folder for weights inside the installed package
    (the shipped ones), whose folder may be read-only."""
    out = weights.with_suffix(".onnx")
    return Path(out.name) if in_package(weights) else out


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    weights = weights_file(args.weights or config.model.weights)
    out = Path(args.out) if args.out else default_out(weights)
    fp16 = args.fp16 or config.model.precision == "fp16"
    static = tuple(args.static) if args.static else None
    if static is not None and min(static) < MIN_SIDE:
        raise UsageError(f"--static {static[0]} {static[1]}: both sides must be at least {MIN_SIDE}")
    model, meta = load_checkpoint(weights)
    log.info("loaded %s: %s, %d input channel(s), %d classes", weights, meta.arch, meta.in_channels,
             meta.num_classes)
    sizes = args.sizes or ([static] if static else default_sizes(meta.input_size))
    if static and any(size != static for size in sizes):
        raise UsageError(f"a graph exported with --static {static[0]} {static[1]} only runs at that size")
    mode = f"static {static[0]}×{static[1]}" if static else "dynamic H×W"
    log.info("exporting %s to %s (opset %d, %s, %s)", meta.arch, out, args.opset, mode, "fp16" if fp16 else "fp32")
    try:
        export_onnx(model, out, in_channels=meta.in_channels, opset=args.opset, static_hw=static,
                    fp16=fp16, sample_hw=sizes[0])
        log.info("checking with ONNX Runtime at %s", ", ".join(f"{h}x{w}" for h, w in sizes))
        results = [check_parity(model, out, sizes=[size], fp16=fp16)[0] for size in sizes]
    except ExportError as exc:  # the export itself failed: a runtime failure, not bad input
        raise ParityError(first_line(exc)) from exc
    for result in results:
        verdict = "ok" if result.ok else "ABOVE"
        print(f"{result.size[0]}x{result.size[1]}: max |onnx - torch| = {result.max_abs_diff:.3g}  "
              f"(tolerance {result.tolerance:.3g}, logits up to {result.logit_scale:.3g})  {verdict}")
    failed = [result for result in results if not result.ok]
    if failed:
        worst = max(failed, key=lambda result: result.max_abs_diff / result.tolerance)
        raise ParityError(f"ONNX output differs from PyTorch by {worst.max_abs_diff:.3g} at "
                          f"{worst.size[0]}x{worst.size[1]} (tolerance {worst.tolerance:.3g})")
    log.info("wrote %s", out)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return main_of("app.export", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
