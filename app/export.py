"""Export a checkpoint to ONNX and check it against PyTorch: ``python -m app.export --weights W.pt``.

Exit status: 0 when ONNX Runtime matches PyTorch at every checked size, 1 when the export fails or a
difference exceeds the tolerance (1e-4 for fp32, 1e-2 for fp16), 2 for bad input (missing or unusable
weights, bad sizes). Progress goes to stderr, the per-size results to stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models import CheckpointError, load_checkpoint
from models.onnx_export import ExportError, export_onnx, verify_onnx

TOLERANCE = {False: 1e-4, True: 1e-2}  # keyed by fp16
MIN_SIDE = 32


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
    parser = argparse.ArgumentParser(
        prog="python -m app.export",
        description="Export a checkpoint to ONNX (dynamic batch, height and width unless --static) and check "
                    "that ONNX Runtime gives the same logits as PyTorch on random inputs at two or more sizes.",
        epilog="Exit status: 0 parity within tolerance, 1 export failed or difference above tolerance "
               "(1e-4 fp32, 1e-2 fp16), 2 bad input.")
    parser.add_argument("--weights", required=True, metavar="W.pt", help="checkpoint written by training")
    parser.add_argument("--out", metavar="M.onnx", default=None,
                        help="ONNX file to write (default: the weights path with suffix .onnx)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version (default: 17)")
    parser.add_argument("--fp16", action="store_true", help="export a float16 graph (for GPU runtimes)")
    parser.add_argument("--static", nargs=2, type=int, metavar=("H", "W"), default=None,
                        help="fix height and width to H×W instead of leaving them dynamic")
    parser.add_argument("--sizes", nargs="+", type=parse_size, metavar="HxW", default=None,
                        help="input sizes to check (default: the training size and a smaller one that is "
                             "not a multiple of 32)")
    return parser


def default_sizes(input_size: tuple[int, int]) -> list[tuple[int, int]]:
    """The training size and a smaller, odd one (catches size-rounding bugs that multiples of 32 hide)."""
    height, width = input_size
    odd = (max(MIN_SIDE + 6, height // 2 + 6), max(MIN_SIDE + 10, width // 2 + 10))
    return [(max(MIN_SIDE, height), max(MIN_SIDE, width)), odd]


def _fail(message: str, status: int) -> int:
    print(f"app.export: error: {message}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    weights = Path(args.weights)
    out = Path(args.out) if args.out else weights.with_suffix(".onnx")
    static = tuple(args.static) if args.static else None
    if static is not None and min(static) < MIN_SIDE:
        return _fail(f"--static {static[0]} {static[1]}: both sides must be at least {MIN_SIDE}", 2)
    try:
        model, meta = load_checkpoint(weights)
    except CheckpointError as exc:
        return _fail(str(exc), 2)
    print(f"loaded {weights}: {meta.arch}, {meta.in_channels} input channel(s), {meta.num_classes} classes",
          file=sys.stderr)
    sizes = args.sizes or ([static] if static else default_sizes(meta.input_size))
    if static and any(size != static for size in sizes):
        return _fail(f"a graph exported with --static {static[0]} {static[1]} only runs at that size", 2)
    mode = f"static {static[0]}×{static[1]}" if static else "dynamic H×W"
    print(f"exporting {meta.arch} to {out} (opset {args.opset}, {mode}, {'fp16' if args.fp16 else 'fp32'})",
          file=sys.stderr)
    tolerance = TOLERANCE[args.fp16]
    try:
        export_onnx(model, out, in_channels=meta.in_channels, opset=args.opset, static_hw=static,
                    fp16=args.fp16, sample_hw=sizes[0])
        print(f"checking with ONNX Runtime at {', '.join(f'{h}x{w}' for h, w in sizes)}", file=sys.stderr)
        diffs = [(size, verify_onnx(model, out, sizes=[size], fp16=args.fp16)) for size in sizes]
    except ExportError as exc:
        return _fail(str(exc), 1)
    for (height, width), diff in diffs:
        verdict = "ok" if diff <= tolerance else f"ABOVE {tolerance:g}"
        print(f"{height}x{width}: max |onnx - torch| = {diff:.3g}  {verdict}")
    worst = max(diff for _, diff in diffs)
    if worst > tolerance:
        return _fail(f"ONNX output differs from PyTorch by {worst:.3g} (tolerance {tolerance:g})", 1)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
