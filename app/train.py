"""Train a segmentation model on a folder dataset or on synthetic interferograms.

``python -m app.train [--config F] [--set k=v] [--data DIR | --synthetic] --model NAME [--epochs N]
[--batch-size N] [--lr X] [--out weights/NAME.pt] [--steps-per-epoch N] [--seed K]``
``python -m app.train --resume weights/NAME.last.pt``

Writes three files: ``NAME.pt`` (the best model by validation mIoU, a checkpoint that carries its own
recipe, for ``--weights``), ``NAME.last.pt`` (the full training state after every epoch and on Ctrl-C,
for ``--resume``) and ``NAME.history.csv`` (one row per epoch).

Resuming continues exactly: model, optimiser, scheduler, AMP scaler, epoch and step within it, best
metric, early-stopping count, history, the RNG states of python/numpy/torch and the data order (which
is a function of seed and epoch; augmentation draws depend on seed, epoch and sample index only).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
import threading
import time
from typing import Any

from app.cli import (
    Parser,
    add_config_arguments,
    add_device_arguments,
    add_verbosity_arguments,
    config_from_args,
    main_of,
)
from app.config import replace
from app.errors import EXIT_INTERRUPTED, EXIT_OK
from app.pipeline.backends.torch_backend import resolve_torch_device
from app.training.trainer import EpochSummary, Progress, RunSpec, Trainer, TrainError
from models import list_models

log = logging.getLogger("app.train")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m app.train",
        description="Train a segmentation model. Writes OUT (best val mIoU), OUT's .last.pt (resumable "
                    "state, every epoch and on Ctrl-C) and .history.csv.",
        epilog=f"models: {', '.join(list_models())}. Exit status: 0 done, 2 bad input, 130 interrupted "
               f"(state saved; continue with --resume).")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", metavar="DIR", help="folder with images/ and masks/ (or boxes.csv|json)")
    source.add_argument("--synthetic", action="store_true",
                        help="train on synthetic interferograms (train.synthetic_* seeds; the default)")
    parser.add_argument("--model", metavar="NAME", help="model to train (train.model)")
    parser.add_argument("--epochs", type=int, help="train.epochs")
    parser.add_argument("--batch-size", type=int, help="train.batch_size")
    parser.add_argument("--lr", type=float, help="train.lr")
    parser.add_argument("--steps-per-epoch", type=int, metavar="N", help="train.steps_per_epoch")
    parser.add_argument("--seed", type=int, help="train.seed")
    parser.add_argument("--backbone-weights", metavar="FILE",
                        help="torchvision ImageNet checkpoint (state_dict .pth you downloaded) to start the "
                             "backbone from; needs width 1 (train.backbone_weights)")
    parser.add_argument("--out", metavar="FILE.pt", help="best checkpoint (default weights/MODEL.pt)")
    parser.add_argument("--resume", metavar="STATE",
                        help="continue a run from its NAME.last.pt (its own settings; --device may change)")
    add_device_arguments(parser, half=False)  # mixed precision on CUDA is train.amp
    add_config_arguments(parser)
    add_verbosity_arguments(parser)
    return parser


def _flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    flags = {"model": args.model, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
             "steps_per_epoch": args.steps_per_epoch, "seed": args.seed,
             "backbone_weights": args.backbone_weights}
    return {key: value for key, value in flags.items() if value is not None}


class _StopFlag:
    """First Ctrl-C (or SIGTERM) asks the trainer to save and stop after the current step; a second
    Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self) -> bool:
        return self.event.is_set()

    def handle(self, signum: int, frame: Any) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()


class _ProgressLine:
    """A ``\r``-updated bar on stderr when it is a terminal; otherwise a plain line every 30 s; none
    when ``quiet``."""

    def __init__(self, quiet: bool = False) -> None:
        self.tty = sys.stderr.isatty()
        self.quiet = quiet
        self._last_line = time.perf_counter()

    def __call__(self, event: Progress) -> None:
        if self.quiet:
            return
        filled = int(20 * event.step / event.steps)
        rate = event.step / event.seconds if event.seconds > 0 else 0.0
        text = (f"epoch {event.epoch}/{event.epochs} [{'#' * filled}{'.' * (20 - filled)}] {event.step}/"
                f"{event.steps} loss {event.loss:.4f} lr {event.lr:.2e} {rate:.2f} it/s")
        if self.tty:
            sys.stderr.write(f"\r{text}\x1b[K")
            sys.stderr.flush()
        elif time.perf_counter() - self._last_line >= 30.0:
            self._last_line = time.perf_counter()
            print(text, file=sys.stderr, flush=True)

    def clear(self) -> None:
        if self.tty:
            sys.stderr.write("\r\x1b[K")


def _summary_line(summary: EpochSummary) -> None:
    miou = "n/a" if summary.val is None else f"{summary.val['miou']:.4f}"
    print(f"epoch {summary.epoch}: loss {summary.train_loss:.4f}  val mIoU {miou}  lr {summary.lr:.2e}  "
          f"{summary.seconds:.1f} s{'  (best)' if summary.best else ''}", flush=True)


def main(argv: list[str] | None = None) -> int:
    command = shlex.join(["python", "-m", "app.train", *(sys.argv[1:] if argv is None else argv)])
    return main_of("python -m app.train", build_parser(), lambda args: run(args, command), argv)


def run(args: argparse.Namespace, command: str) -> int:
    # Ctrl-C finishes the current step and saves the state; a second one stops at once (see _StopFlag).
    stop = _StopFlag()
    signal.signal(signal.SIGINT, stop.handle)
    signal.signal(signal.SIGTERM, stop.handle)
    progress = _ProgressLine(quiet=args.quiet)
    try:
        if args.resume:
            given = [flag for flag, value in (("--data", args.data), ("--synthetic", args.synthetic or None),
                                              ("--out", args.out), ("--config", args.config),
                                              ("--set", args.overrides or None)) if value is not None]
            given += [f"--{key.replace('_', '-')}" for key in _flag_overrides(args)]
            if given:
                raise TrainError(f"--resume continues a run with its own settings; drop {', '.join(given)}")
            device = resolve_torch_device(args.device) if args.device else None
            trainer = Trainer.resume(args.resume, device)
            log.info("resuming %s at epoch %d, step %d", trainer.cfg.train.model, trainer.epoch + 1, trainer.step)
        else:
            cfg = config_from_args(args)
            cfg = replace(cfg, train=_flag_overrides(args))
            out = args.out or f"weights/{cfg.train.model}.pt"
            trainer = Trainer(cfg, RunSpec(args.data, out, command))
        source = trainer.run.data or "synthetic interferograms"
        log.info("training %s on %s: %d training frames, %d validation frames, %d steps/epoch, device %s",
                 trainer.cfg.train.model, source, len(trainer.train_set),
                 len(trainer.val_set) if trainer.val_set is not None else 0, trainer.steps_per_epoch, trainer.device)

        def summary(record: EpochSummary) -> None:
            progress.clear()
            _summary_line(record)

        result = trainer.fit(progress=progress, summary=summary, stop=stop)
    finally:
        progress.clear()
    spec = trainer.run
    if result.interrupted:
        log.warning("interrupted: state saved to %s; continue with python -m app.train --resume %s",
                    spec.last_path, spec.last_path)
        return EXIT_INTERRUPTED
    reason = "early stop" if result.stopped_early else "done"
    best = "n/a" if result.best_miou is None else f"{result.best_miou:.4f}"
    log.info("%s after %d epochs; best val mIoU %s; wrote %s, %s, %s", reason, result.epochs_done, best, spec.out,
             spec.last_path, spec.history_path)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
