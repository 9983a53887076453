"""Score a checkpoint: ``python -m app.evaluate --weights W.pt (--data DIR | --synthetic ...)``.

With labels (a folder with masks/ or boxes.csv|json, or ``--synthetic``) it prints a per-class table
(IoU, Dice) with the means and writes the :meth:`app.training.metrics.ConfusionMatrix.compute` scores as JSON
(``--json``; NaN, a class absent from predictions and labels, becomes null) and one row per image as CSV
(``--per-image``). Without labels (a video, or a folder of images only) it predicts, prints the
fraction of pixels per class and the speed, and can write the predicted masks (``--masks``).

Frames go through the live pipeline's preprocessing with the recipe recorded in the checkpoint, one
preprocessor per sequence in frame order (as a live stream would see them), and through the configured
backend (``model.backend``, ``model.device``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from app.cli import (
    Parser,
    add_config_arguments,
    add_device_arguments,
    add_verbosity_arguments,
    config_from_args,
    main_of,
)
from app.config import Config, replace
from app.errors import EXIT_OK
from app.files import write_text
from app.pipeline.inference import Backend
from app.pipeline.preprocess import PreprocessSettings, settings_from
from app.resources import weights_file
from app.training.evaluation import (
    EvalFrame,
    EvaluateError,
    Evaluator,
    folder_frames,
    format_scores,
    has_labels,
    synthetic_frames,
    unlabelled_frames,
    write_per_image,
)
from app.training.metrics import METRIC_KEYS, json_safe


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m app.evaluate",
        description="Score a checkpoint on labelled data (per-class IoU and Dice), or predict on unlabelled "
                    "frames (class fractions and speed).",
        epilog="Exit status: 0 done, 1 failure during evaluation, 2 bad input.")
    parser.add_argument("--weights", metavar="W.pt",
                        help="checkpoint written by app.train (default: model.weights, the shipped model)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", metavar="DIR|VIDEO",
                        help="folder with images/ and masks/ (or boxes.csv|json); a video, image folder or "
                             "glob without labels is predicted only")
    source.add_argument("--synthetic", action="store_true", help="a synthetic interferogram sequence")
    parser.add_argument("--seed", type=int, help="--synthetic: sequence seed (synth.seed)")
    parser.add_argument("--frames", type=int, help="--synthetic: number of frames (synth.frames)")
    parser.add_argument("--size", type=int, help="--synthetic: frame side in pixels (synth.size)")
    parser.add_argument("--sequences", type=int, default=1, metavar="N",
                        help="--synthetic: N sequences, seeds seed … seed+N-1 (default 1)")
    parser.add_argument("--with-background", action="store_true",
                        help="--synthetic: give the hologram stage each sequence's background hologram")
    parser.add_argument("--background", metavar="FILE",
                        help="--data: background hologram for the hologram stage (preprocess.background_file)")
    parser.add_argument("--sweep", metavar="KEY=V1,V2,...",
                        help="--synthetic: score once per value of one synth setting, kept fixed while the rest "
                             "is randomised (synth.randomize), e.g. fringe_period_px=2.2,3,5,8 or "
                             "defocus_px=0,10,20,40; prints a table")
    parser.add_argument("--json", metavar="FILE", help="write the scores (compute() keys) and run details")
    parser.add_argument("--per-image", metavar="FILE.csv", help="write one row of scores per image")
    parser.add_argument("--masks", metavar="DIR", help="write the predicted label maps as DIR/NAME.png")
    add_device_arguments(parser)
    add_config_arguments(parser)
    add_verbosity_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return main_of("python -m app.evaluate", build_parser(), _run, argv)


def _run(args: argparse.Namespace) -> int:
    from app.pipeline.backends import create_backend
    from models import load_checkpoint

    cfg = config_from_args(args)
    synth = {key: value for key, value in (("seed", args.seed), ("frames", args.frames), ("size", args.size))
             if value is not None}
    if (synth or args.sweep or args.with_background or args.sequences != 1) and not args.synthetic:
        raise EvaluateError("--seed/--frames/--size/--sequences/--sweep/--with-background describe --synthetic data")
    if args.background:
        if args.synthetic:
            raise EvaluateError("--background is for --data; --synthetic sequences bring their own (--with-background)")
        cfg = replace(cfg, preprocess={"background_file": args.background})
    if args.sequences < 1:
        raise EvaluateError(f"--sequences must be >= 1, got {args.sequences}")
    cfg = replace(cfg, synth=synth)
    sweep = parse_sweep(args.sweep, cfg) if args.sweep else None
    args.weights = str(weights_file(args.weights or cfg.model.weights))
    model, meta = load_checkpoint(args.weights)
    settings = settings_from(cfg.preprocess, meta.in_channels, meta.normalization,
                             meta.train_config.get("preprocess"))
    backend = create_backend(cfg.model, model, meta.in_channels, args.weights, concurrent=False)
    if sweep is not None:
        return run_sweep(sweep, cfg, args, backend, settings, meta)
    if args.synthetic:
        frames = synthetic_frames(cfg, args.sequences, args.with_background)
        seeds = (f"sequence seed {cfg.synth.seed}" if args.sequences == 1 else
                 f"sequences seeds {cfg.synth.seed}-{cfg.synth.seed + args.sequences - 1}")
        what = (f"synthetic {cfg.synth.generator}{' randomised' if cfg.synth.randomize else ''} {seeds}, "
                f"{cfg.synth.frames} frames each of "
                f"{cfg.synth.size}×{cfg.synth.size}{', with background' if args.with_background else ''}")
    elif has_labels(Path(args.data)):
        frames, what = folder_frames(Path(args.data)), args.data
    else:
        data = Path(args.data)
        uri = str(data / "images") if (data / "images").is_dir() else args.data
        frames, what = unlabelled_frames(uri, cfg), f"{args.data} (no labels: prediction only)"
    _note(args, f"evaluating {args.weights} ({meta.arch}, {meta.num_classes} classes) on {what}, "
          f"backend {getattr(backend, 'name', cfg.model.backend)}")

    masks_dir = Path(args.masks) if args.masks else None

    def save_mask(frame: EvalFrame, labels: np.ndarray) -> None:
        path = masks_dir / f"{frame.name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(path), labels):
            raise EvaluateError(f"cannot write {path}")

    result = Evaluator(backend, settings, meta.num_labels, meta.contact_class).run(frames, save_mask if masks_dir else None)
    print(format_scores(result, meta.label_names))
    if args.json:
        report = dict(result.scores) if result.scores else {key: None for key in METRIC_KEYS}
        report.update({"class_names": list(meta.label_names), "fractions": result.fractions,
                       "frames": result.frames, "labelled_frames": result.labelled_frames, "fps": result.fps,
                       "weights": args.weights, "data": what})
        path = Path(args.json)
        write_text(path, json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
        _note(args, f"wrote {path}")
    if args.per_image:
        write_per_image(Path(args.per_image), result.per_image)
        _note(args, f"wrote {args.per_image}")
    if masks_dir:
        _note(args, f"wrote {result.frames} masks to {masks_dir}")
    return EXIT_OK


def parse_sweep(text: str, cfg: Config) -> tuple[str, list[Any]]:
    """``KEY=V1,V2,...`` -> (synth field, typed values); the field must be a number of SynthConfig."""
    key, _, values = text.partition("=")
    key = key.strip().removeprefix("synth.")
    current = getattr(cfg.synth, key, None)
    if not values or not isinstance(current, (int, float)) or isinstance(current, bool):
        raise EvaluateError(f"--sweep needs KEY=V1,V2,... with KEY a numeric synth setting, got '{text}'")
    try:
        parsed = [type(current)(float(v)) if isinstance(current, int) else float(v) for v in values.split(",")]
    except ValueError as exc:
        raise EvaluateError(f"--sweep values must be numbers: {values}") from exc
    return key, parsed


def run_sweep(sweep: tuple[str, list[Any]], cfg: Config, args: argparse.Namespace, backend: Backend,
              settings: PreprocessSettings, meta: Any) -> int:
    """One evaluation per value of one kept synth setting (the rest randomised); a table on stdout."""
    key, values = sweep
    rows = []
    for value in values:
        synth = dataclasses.replace(cfg.synth, randomize=True, keep=tuple(sorted({*cfg.synth.keep, key})),
                                    **{key: value})
        frames = synthetic_frames(replace(cfg, synth=dataclasses.asdict(synth)), args.sequences, args.with_background)
        result = Evaluator(backend, settings, meta.num_labels, meta.contact_class).run(frames)
        scores = result.scores or {}
        iou = scores.get("iou") or [float("nan")] * meta.num_labels
        rows.append({key: value, "miou": scores.get("miou"), "mdice": scores.get("mdice"),
                     **{f"iou_{name}": iou[c] for c, name in enumerate(meta.label_names)}, "frames": result.frames})
    header = list(rows[0])
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for row in rows:
        print(" | ".join(f"{row[h]:.4f}" if isinstance(row[h], float) else str(row[h]) for h in header))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(json_safe({"sweep": key, "rows": rows, "weights": args.weights,
                                              "sequences": args.sequences, "seed": cfg.synth.seed,
                                              "with_background": args.with_background}), indent=2) + "\n")
        _note(args, f"wrote {path}")
    return EXIT_OK


def _note(args: argparse.Namespace, text: str) -> None:
    """A progress line on stderr, unless ``-q``."""
    if not args.quiet:
        print(text, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
