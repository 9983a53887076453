"""``python -m app.synth``: write synthetic off-axis hologram sequences with exact masks (see
:mod:`app.synthesis.generator`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from app.cli import Parser, add_config_arguments, add_verbosity_arguments, config_from_args, main_of
from app.config import replace
from app.errors import EXIT_OK
from app.synthesis import make_sequence
from app.synthesis.generator import MIN_SIZE, SynthError
from app.synthesis.writer import write_sequence


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m app.synth",
        description="Write a synthetic off-axis interferogram sequence of moving cells with exact masks: "
                    "DIR/images/NNNNNN.png, DIR/masks/NNNNNN.png (0 = background, 1 = cell, 255 = ignore) "
                    "and DIR/meta.json (propagated generator: also DIR/background.png, the hologram without "
                    "objects). Flags override the synth section of the config.",
        epilog="Example: python -m app.synth --out data/seq0 --frames 100 --size 512 --seed 7 --video seq0.mp4. "
               "Fringe period and angle, cell count, noise, blur and the other physical settings are "
               "synth.* keys in config.yaml (change them with --set, e.g. --set synth.fringe_period_px=5). "
               "The same frames in memory: app.synthesis.make_sequence(load_config().synth).frame(i).",
    )
    parser.add_argument("--out", metavar="DIR", required=True, type=Path, help="output folder (created if missing)")
    parser.add_argument("--frames", metavar="N", type=int, help="number of frames (default: synth.frames)")
    parser.add_argument("--size", metavar="S", type=int, help=f"frame side in pixels, >= {MIN_SIZE} (default: synth.size)")
    parser.add_argument("--seed", metavar="K", type=int, help="random seed; same seed, same sequence (default: synth.seed)")
    parser.add_argument("--bit-depth", metavar="8|10|12|16", type=int,
                        help="bits per pixel of the PNG images; 10-16 are stored in 16-bit PNGs (default: synth.bit_depth)")
    parser.add_argument("--video", metavar="FILE.mp4", type=Path, help="also write the frames as a video (.mp4 with mp4v, or .avi; 8-bit)")
    parser.add_argument("--fps", metavar="F", type=float, help="frame rate stored in the MP4 (default: output.video_fps)")
    parser.add_argument("--randomize", action="store_true",
                        help="realistic holograms with every optical setting drawn per sequence (fringe period "
                             "2.2-10 px at any angle, defocus, beads, organisms, clusters, speckle, dust, 8-16 bit); "
                             "same as --set synth.randomize=true")
    parser.add_argument("--like", metavar="HOLOGRAM", type=Path,
                        help="measure fringe period and angle, visibility, noise and bit depth of one real hologram "
                             "and write randomised sequences with those kept: training data for that microscope")
    parser.add_argument("--sequences", metavar="N", type=int, default=1,
                        help="write N sequences (seeds seed, seed+1, ...) as DIR/seq000, DIR/seq001, ... (default 1: DIR)")
    add_config_arguments(parser)
    add_verbosity_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    flags = {"frames": args.frames, "size": args.size, "seed": args.seed, "bit_depth": args.bit_depth}
    cfg = config_from_args(args)
    cfg = replace(cfg, synth={k: v for k, v in flags.items() if v is not None})
    fps = args.fps if args.fps is not None else cfg.output.video_fps
    if fps <= 0:
        raise SynthError(f"--fps must be > 0, got {fps}")
    synth = cfg.synth
    if args.randomize:
        synth = dataclasses.replace(synth, randomize=True)
    if args.like is not None:
        from app.synthesis.like import like

        measured = like(args.like)
        if not args.quiet:
            print(f"app.synth: {args.like}: " + ", ".join(f"{k} {v:.3g}" for k, v in measured.items()),
                  file=sys.stderr)
        synth = dataclasses.replace(synth, randomize=True, keep=tuple(sorted(set(synth.keep) | set(measured))),
                                    **measured)
    if args.sequences < 1:
        raise SynthError(f"--sequences must be >= 1, got {args.sequences}")
    for k in range(args.sequences):
        out = args.out if args.sequences == 1 else args.out / f"seq{k:03d}"
        video = args.video if args.sequences == 1 or args.video is None else \
            args.video.with_name(f"{args.video.stem}_{k:03d}{args.video.suffix}")
        seq = make_sequence(dataclasses.replace(synth, seed=synth.seed + k))
        write_sequence(seq, out, video, fps, progress=sys.stderr.isatty() and not args.quiet)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return main_of("app.synth", _parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
