"""``cellseg info [FILE.pt]``: print a checkpoint's model card, what the file itself records.

Architecture and options, parameter count, classes and palette, input channels and training size,
normalisation, the preprocessing recipe replayed at inference, the metrics it reached and the command
that trained it. Without FILE, the configured ``model.weights`` (the shipped model). ``--json`` prints
the same as one JSON object on stdout. A file that is not a checkpoint is one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from app.cli import add_config_arguments, add_verbosity_arguments, config_from_args, doc_parser, main_of
from app.errors import EXIT_OK
from app.resources import content_key, weights_file
from app.training.metrics import json_safe

PROG = "app.info"


def build_parser() -> argparse.ArgumentParser:
    parser = doc_parser(PROG, __doc__)
    parser.add_argument("weights", metavar="FILE.pt", nargs="?",
                        help="checkpoint (default: model.weights, the shipped model)")
    parser.add_argument("--json", action="store_true", help="print the model card as JSON on stdout")
    add_config_arguments(parser)
    add_verbosity_arguments(parser)
    return parser


def model_card(path: str | Path) -> dict[str, Any]:
    """Everything the checkpoint at ``path`` records about itself, as plain JSON-able values; raises
    :class:`models.CheckpointError` for a file that is not one."""
    from models import load_checkpoint

    path = Path(path)
    model, meta = load_checkpoint(path)
    train = meta.train_config
    return json_safe({
        "file": str(path), "size_bytes": path.stat().st_size, "sha256_16": content_key(path),
        "arch": meta.arch, "options": meta.options,
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "num_classes": meta.num_classes, "class_names": list(meta.class_names),
        "palette": [list(colour) for colour in meta.palette], "in_channels": meta.in_channels,
        "input_size": list(meta.input_size), "normalization": meta.normalization,
        "preprocessing": train.get("preprocess") or {}, "metrics": meta.metrics,
        "training_data": train.get("data"), "training_command": train.get("command"), "extra": meta.extra,
    })


def _pairs(values: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in values.items()) or "none recorded"


def _metric_lines(metrics: dict[str, Any], class_names: list[str], prefix: str = "") -> list[str]:
    """``key value`` per metric; nested sections as ``section.key``; per-class lists with class names."""
    lines = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            lines += _metric_lines(value, class_names, f"{name}.")
        elif isinstance(value, list) and len(value) == len(class_names):
            lines.append(f"{name} " + ", ".join(f"{cls} {_number(v)}" for cls, v in zip(class_names, value, strict=True)))
        else:
            lines.append(f"{name} {_number(value)}")
    return lines


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def format_card(card: dict[str, Any]) -> str:
    """The model card as aligned ``field  value`` lines."""
    options = {key: value for key, value in card["options"].items() if key not in ("num_classes", "in_channels")}
    height, width = card["input_size"]
    rows = [
        ("file", f"{card['file']} ({card['size_bytes'] / 1e6:.1f} MB, sha256 {card['sha256_16']}…)"),
        ("architecture", f"{card['arch']} ({_pairs(options)}), {card['parameters'] / 1e6:.2f} M parameters"),
        ("classes", ", ".join(f"{index} {name} {tuple(colour)}" for index, (name, colour)
                              in enumerate(zip(card["class_names"], card["palette"], strict=True)))),
        ("input", f"{card['in_channels']} channel(s), trained on {height}×{width}"),
        ("normalisation", _pairs(card["normalization"])),
        ("preprocessing", _pairs(card["preprocessing"])),
    ]
    metrics = _metric_lines(card["metrics"], card["class_names"]) or ["none recorded"]
    rows += [("metrics" if index == 0 else "", line) for index, line in enumerate(metrics)]
    rows.append(("training data", str(card["training_data"] or "not recorded")))
    rows.append(("training command", card["training_command"] or "not recorded"))
    if card["extra"]:
        rows.append(("extra", _pairs(card["extra"])))
    width_of = max(len(field) for field, _ in rows)
    return "\n".join(f"{field:<{width_of}}  {value}" for field, value in rows)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    card = model_card(weights_file(args.weights) if args.weights else config.model.weights)
    print(json.dumps(card, indent=2) if args.json else format_card(card))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return main_of(PROG, build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
