"""``python -m app.batch``: segment many recorded sequences in parallel on Ray Data, locally or on a cluster.

Examples::

    python -m app.batch recordings/dish1/ recordings/dish2/ run3.avi stack.tif --out out/batch
    python -m app.batch archive.txt --out /nas/results --address auto --actors 8
    python -m app.batch "recordings/*/" --out out/batch --set batch.cpus_per_actor=2

SRC is a sequence folder, a glob, a video or a TIFF stack, or a listing (.txt/.lst: one SRC per line,
optionally a tab and its background hologram). Every SRC is checked before Ray starts (one line and
exit 2 for a bad one). Without --address an embedded local Ray runs on this machine; --address auto (or
ray://host:10001) joins a cluster. Each sequence is read and preprocessed in order by one Ray Data read
task (so per-sequence state, such as background models and the hologram carrier, is exactly what
app.replay computes) and segmented by an actor pool with one model per actor (one GPU each when the
cluster has GPUs). Outputs per sequence under DIR/NAME/: masks/*.png (the same files as app.replay
--masks), frames.csv and summary.json; DIR/summary.json covers the run (fps per sequence, frames per
node, failures). A sequence appears under its name only once it is complete; a rerun skips the
sequences DIR/manifest.json lists as finished. A corrupt frame is skipped and counted (with
--set source.strict=true it fails that sequence only: exit 1 at the end, the others written).
Needs the optional extra: pip install '.[batch]'.
"""

from __future__ import annotations

import argparse
import sys

from app.cli import (
    add_config_arguments,
    add_device_arguments,
    add_verbosity_arguments,
    config_from_args,
    doc_parser,
    main_of,
)
from app.config import replace
from app.errors import EXIT_OK

PROG = "app.batch"


def build_parser() -> argparse.ArgumentParser:
    parser = doc_parser(PROG, __doc__)
    parser.add_argument("sources", metavar="SRC", nargs="+",
                        help="sequence folder, glob (quote it), video, TIFF stack, or a .txt/.lst listing")
    parser.add_argument("--out", metavar="DIR", required=True, help="output folder (created if missing)")
    parser.add_argument("--address", metavar="ADDR",
                        help="Ray cluster to join: auto, ray://host:10001 or host:port (batch.address; "
                             "default: an embedded local Ray)")
    parser.add_argument("--actors", type=int, metavar="N",
                        help="model actors in the pool (batch.actors; default one per GPU, else as many "
                             "as the CPUs allow)")
    parser.add_argument("--weights", metavar="FILE", help="checkpoint (model.weights)")
    add_device_arguments(parser)
    parser.add_argument("--background", metavar="FILE",
                        help="background hologram for every sequence without its own (preprocess.background_file)")
    add_verbosity_arguments(parser)
    add_config_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from app.batching.engine import import_ray, quiet_ray_data_logs, run_batch
    from app.batching.sequences import expand_sources
    from app.run import ProgressLine

    config = config_from_args(args)
    changes = {"batch": {key: value for key, value in (("address", args.address), ("actors", args.actors))
                         if value is not None},
               "model": {"weights": args.weights} if args.weights else {},
               "preprocess": {"background_file": args.background} if args.background else {}}
    config = replace(config, **{section: values for section, values in changes.items() if values})
    specs = expand_sources(args.sources, config)  # bad input: one line, exit 2, before Ray starts
    import_ray()
    if not args.verbose:
        quiet_ray_data_logs()
    progress = None if args.quiet else ProgressLine()
    try:
        summary = run_batch(config, specs, args.out, progress=progress, verbose=args.verbose)
    finally:
        if progress is not None:
            progress.finish()
    counts = summary["counts"]
    print(f"{PROG}: {counts.get('done', 0)} sequence(s) done, {counts.get('skipped', 0)} skipped as finished, "
          f"{summary['frames']} frames in {summary['wall_s']:.1f} s on {len(summary['nodes'])} node(s); "
          f"wrote {args.out}/summary.json", file=sys.stderr)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return main_of(PROG, build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
