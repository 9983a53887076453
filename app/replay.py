"""``python -m app.replay``: turn a recorded sequence (image folder, glob or video) into an overlay.

Examples::

    python -m app.replay recordings/dish3/ --weights weights/icnet_interferogram.pt
    python -m app.replay "recordings/dish3/*.tif" --gif dish3.gif --csv dish3.csv
    python -m app.replay run.avi --out run_overlay.mp4 --masks run_masks/

Frames are processed as fast as possible and none is dropped (file semantics). Without an output flag
the overlay GIF goes to out/<name>_overlay.gif (the GIF keeps every output.gif_stride-th frame at
output.gif_scale, at most output.gif_max_frames frames). A summary table of per-stage timings is
printed on stderr at the end; Ctrl-C stops with every output file finalised.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from app.cli import doc_parser, main_of
from app.run import (
    add_common_arguments,
    config_with_flags,
    outputs_of,
    run_app,
)

PROG = "app.replay"


def build_parser() -> argparse.ArgumentParser:
    parser = doc_parser(PROG, __doc__)
    parser.add_argument("source", metavar="SRC",
                        help="image folder, glob (quote it) or video file; 'synthetic' replays the "
                             "generator unpaced")
    parser.add_argument("--display", action="store_true", help="also show the overlay in a window")
    add_common_arguments(parser)
    return parser


def default_gif(source: str) -> Path:
    """out/<name>_overlay.gif, where name is the folder name or the file stem of ``source``."""
    path = Path(source.rstrip("/"))
    if any(ch in source for ch in "*?["):
        path = path.parent
    name = path.name if path.is_dir() or not path.suffix else path.stem
    return Path("out") / f"{name or 'replay'}_overlay.gif"


def run(args: argparse.Namespace) -> int:
    config = config_with_flags(args, source={"uri": args.source}, output={"display": args.display})
    if not outputs_of(config):
        config = config_with_flags(args, source={"uri": args.source},
                                   output={"display": args.display, "gif": str(default_gif(args.source))})
    return run_app(PROG, config, realtime=False, num_classes=args.num_classes, sequential=args.sequential)


def main(argv: list[str] | None = None) -> int:
    return main_of(PROG, build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
