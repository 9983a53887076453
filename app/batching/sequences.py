"""The sequences of a batch run: SRC arguments -> checked :class:`SequenceSpec` items with unique output names.

A SRC is anything :func:`app.pipeline.sources.source_kind` accepts as a recording (a folder, glob,
video, TIFF stack: every non-live kind of :data:`~app.pipeline.sources.SOURCES`), or a listing: a
``.txt`` / ``.lst`` file with one SRC per line (``#`` starts a comment; relative paths are relative to
the listing), optionally followed by a tab and that sequence's background hologram. Every sequence is
opened once here, so a bad one fails (one line, exit 2) before Ray starts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from app.config import Config
from app.errors import UsageError
from app.pipeline.sources import LIVE_KINDS, SourceError, open_source, source_kind

LISTING_SUFFIXES = (".txt", ".lst")


@dataclass(frozen=True)
class SequenceSpec:
    """One recorded sequence: its ``uri`` (what :func:`~app.pipeline.sources.open_source` opens), the
    output folder ``name`` under ``--out``, its ``background`` hologram ("" = the config's) and the
    ``frames`` its source declares (a progress hint; None when unknown)."""

    uri: str
    name: str
    background: str = ""
    frames: int | None = None


def _listing(path: Path) -> list[tuple[str, str]]:
    """``(uri, background)`` per line of a listing file."""
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        uri, _, background = (part.strip() for part in text.partition("\t"))
        if not uri:
            raise UsageError(f"{path}:{number}: no sequence before the tab")
        entries.append((_relative_to(path.parent, uri), _relative_to(path.parent, background)))
    if not entries:
        raise UsageError(f"listing {path} names no sequence")
    return entries


def _relative_to(folder: Path, item: str) -> str:
    return item if not item or Path(item).expanduser().is_absolute() else str(folder / item)


def _base_name(uri: str) -> str:
    path = Path(uri.rstrip("/"))
    if any(ch in uri for ch in "*?["):
        path = path.parent
    return (path.name if path.is_dir() or not path.suffix else path.stem) or "sequence"


def expand_sources(sources: list[str], config: Config) -> list[SequenceSpec]:
    """The sequences ``sources`` name, in order, each opened and closed once to check it; output names
    are the folder or file stem, with ``-2``, ``-3`` … for repeats. Raises :class:`UsageError`."""
    entries: list[tuple[str, str]] = []
    for source in sources:
        path = Path(source)
        if path.is_file() and path.suffix.lower() in LISTING_SUFFIXES:
            entries.extend(_listing(path))
        else:
            entries.append((source, ""))
    specs, seen = [], set()
    for uri, background in entries:
        try:
            kind, _ = source_kind(uri)
            if kind in LIVE_KINDS or kind == "synthetic":
                raise UsageError(f"'{uri}' is not a recording; app.batch takes folders, globs, videos and "
                                 f"TIFF stacks")
            with open_source(uri, config, realtime=False) as opened:
                frames = opened.info.frame_count
        except SourceError as exc:
            raise UsageError(str(exc)) from exc
        if background and not Path(background).is_file():
            raise UsageError(f"background hologram not found: {background} (for {uri})")
        name, count = _base_name(uri), 2
        while name in seen:
            name, count = f"{_base_name(uri)}-{count}", count + 1
        seen.add(name)
        specs.append(SequenceSpec(uri, name, background, frames))
    if not specs:
        raise UsageError("no sequence given")
    return specs


def fingerprint(spec: SequenceSpec, config: Config) -> str:
    """What a finished sequence's outputs depend on (source, background, weights file, preprocessing,
    model settings, strictness, frame limit), hashed: a rerun skips a sequence only when it matches."""
    weights = Path(config.model.weights)
    stat = weights.stat() if weights.exists() else None
    recipe = {"uri": str(Path(spec.uri).expanduser().resolve()), "background": spec.background,
              "weights": [str(weights.resolve()), stat.st_size if stat else 0, stat.st_mtime_ns if stat else 0],
              "preprocess": asdict(config.preprocess), "model": asdict(config.model),
              "strict": config.source.strict, "max_frames": config.pipeline.max_frames}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]
