"""``python -m app.live``: segment a camera, stream, video, image folder or the synthetic source live.

Examples::

    python -m app.live --weights weights/icnet_interferogram.pt              # synthetic source, window
    python -m app.live --source camera0 --out run.mp4 --csv run.csv
    python -m app.live --source rtsp://host/stream --no-display --gif run.gif --max-frames 500

Live sources (camera, stream, synthetic) keep only the newest frames when the model is slower than the
source and count the dropped ones; files and folders are processed completely. The synthetic source runs
until stopped, like a camera (its synth.frames frames over and over); --max-frames N stops it. The window (on when a
display exists and output.display is true) quits with q or Esc; Ctrl-C stops too, with every output file
finalised. A summary table of per-stage timings is printed on stderr at the end.
"""

from __future__ import annotations

import argparse
import sys

from app.cli import doc_parser, main_of
from app.config import replace
from app.run import add_common_arguments, config_with_flags, run_app

PROG = "app.live"


def build_parser() -> argparse.ArgumentParser:
    parser = doc_parser(PROG, __doc__)
    parser.add_argument("--source", metavar="SRC",
                        help="synthetic | camera0 | 0 | /dev/video0 | video file | image folder or glob | "
                             "rtsp://... | http://... (config source.uri, default synthetic)")
    parser.add_argument("--no-display", action="store_true", help="no window (also automatic without a display)")
    parser.add_argument("--serve", metavar="[HOST:]PORT",
                        help="browser preview: the overlay, fps, latency, dropped frames, class fractions and a "
                             "record button at http://HOST:PORT/ (HOST defaults to 127.0.0.1; preview.address)")
    parser.add_argument("--serve-public", action="store_true",
                        help="allow --serve on an address other machines can reach, e.g. 0.0.0.0:8080 "
                             "(preview.public)")
    add_common_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    extra: dict[str, dict] = {}
    if args.source is not None:
        extra["source"] = {"uri": args.source}
    if args.no_display:
        extra["output"] = {"display": False}
    if args.serve is not None:
        extra["preview"] = {"address": args.serve}
    if args.serve_public:
        extra.setdefault("preview", {})["public"] = True
    config = config_with_flags(args, **extra)
    if config.source.uri.strip() == "synthetic":  # runs like a camera until stopped (or --max-frames)
        config = replace(config, source={"loop": True})
    return run_app(PROG, config, realtime=True, num_classes=args.num_classes, sequential=args.sequential)


def main(argv: list[str] | None = None) -> int:
    return main_of(PROG, build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
