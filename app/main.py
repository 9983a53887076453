"""``cellseg COMMAND [ARGS]`` (also ``python -m app``): one entry point that hands over to each CLI.

:data:`COMMANDS` is the registry, command name -> (module with ``main(argv)``, one-line summary);
modules are imported only when their command runs. Adding a command is one line there. The
``python -m app.live`` style commands keep working; ``cellseg live ARGS`` runs the same ``main``.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Mapping
from types import MappingProxyType

from app.errors import EXIT_OK, EXIT_USAGE, invoked_as

PROG = "cellseg"

COMMANDS: Mapping[str, tuple[str, str]] = MappingProxyType({
    "live": ("app.live", "segment a camera, stream, video, folder or the synthetic source live"),
    "replay": ("app.replay", "a recorded sequence (folder, glob, video, TIFF stack) to an overlay GIF/MP4"),
    "export": ("app.export", "export a checkpoint to ONNX and check it against PyTorch"),
    "train": ("app.train", "train a model on a folder dataset or synthetic holograms"),
    "evaluate": ("app.evaluate", "score a checkpoint (IoU, Dice) or predict on unlabelled frames"),
    "synth": ("app.synth", "write synthetic hologram sequences with exact masks"),
    "bench": ("benchmarks.fps", "frame-rate benchmarks (storage, stages, models, end to end)"),
    "info": ("app.info", "print a checkpoint's model card"),
    "batch": ("app.batch", "segment many recordings in parallel (needs the 'batch' extra)"),
})


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"usage: {PROG} COMMAND [ARGS]   ({PROG} COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run ``argv[0]``'s CLI with the rest of ``argv``; its exit code (2 for an unknown command)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return EXIT_OK
    if not argv:
        print(usage(), file=sys.stderr)
        return EXIT_USAGE
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"valid: {', '.join(COMMANDS)}"
        print(f"{PROG}: error: unknown command '{name}'; {hint} (see --help)", file=sys.stderr)
        return EXIT_USAGE
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        print(f"{PROG}: error: '{name}' is not available in this installation ({module_name} is missing)",
              file=sys.stderr)
        return EXIT_USAGE
    with invoked_as(module_name, f"{PROG} {name}"):
        return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
