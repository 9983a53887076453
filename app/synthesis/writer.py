"""Write a synthetic sequence to disk: numbered PNG images and masks, the objects' ground truth
(objects.csv), meta.json, the background hologram and optionally a video."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import cv2
import numpy as np

from app.files import OutputError, atomic_open, write_bytes, write_text
from app.pipeline.sinks import VideoSink
from app.synthesis.generator import InterferogramSequence

OBJECT_COLUMNS = ("frame", "object_id", "parent_id", "class", "x_px", "y_px", "area_px", "integrated_phase_rad_px",
                  "in_focus")
"""The header of objects.csv: one row per frame and object (:class:`~app.synthesis.generator.SynthObject`;
``class`` is its kind, ``parent_id`` 0 = none, ``in_focus`` 1 or 0)."""


def write_png(path: Path, image: np.ndarray) -> None:
    """Encode ``image`` as PNG and write it atomically (checked for room and size: ``cv2.imwrite`` reports
    no full disk). Raises :class:`~app.files.OutputError`."""
    ok, png = cv2.imencode(".png", image)
    if not ok:
        raise OutputError(f"cannot encode {path} as PNG")
    write_bytes(path, png.tobytes(), suffixes=(".png",), fsync=False)


def write_sequence(seq: InterferogramSequence, out_dir: Path, video: Path | None = None, fps: float = 25.0,
                   progress: bool = False) -> None:
    """Write ``out_dir/images/NNNNNN.png``, ``out_dir/masks/NNNNNN.png``, the ground truth of every
    object in every frame ``out_dir/objects.csv`` (columns :data:`OBJECT_COLUMNS`), ``out_dir/meta.json``
    (with the divisions, :class:`~app.synthesis.generator.Division`), the background hologram ``out_dir/background.png`` (propagated generator) and optionally a video (8-bit, the pipeline's :class:`~app.pipeline.sinks.VideoSink`: mp4v or the first codec
    that opens). Every file is written under a temporary name and renamed when complete (the video when
    finished, also on error or Ctrl-C), so a file on disk is always complete and playable; a full disk
    raises :class:`~app.files.OutputError` naming the file. Numbered frames left in
    ``images``/``masks`` by an earlier, longer sequence are deleted, so the folders hold this sequence only."""
    images, masks = out_dir / "images", out_dir / "masks"
    for folder in (images, masks):
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("[0-9]" * 6 + ".png"):
            if int(stale.stem) >= len(seq):
                stale.unlink()
    write_text(out_dir / "meta.json", json.dumps(seq.meta(), indent=2) + "\n")
    background = getattr(seq, "background", None)
    if background is not None:
        write_png(out_dir / "background.png", background())
    shift = seq.cfg.bit_depth - 8
    writer = VideoSink(video, fps) if video is not None else None
    try:
        with atomic_open(out_dir / "objects.csv", newline="") as handle:
            table = csv.writer(handle)
            table.writerow(OBJECT_COLUMNS)
            for frame in seq:
                name = f"{frame.index:06d}.png"
                for folder, array in ((images, frame.image), (masks, frame.mask)):
                    write_png(folder / name, array)
                table.writerows((frame.index, o.object_id, o.parent_id, o.kind, o.x_px, o.y_px, o.area_px,
                                 o.integrated_phase_rad_px, int(o.in_focus)) for o in frame.objects)
                if writer is not None:
                    gray = frame.image if frame.image.dtype == np.uint8 else (frame.image >> shift).astype(np.uint8)
                    writer.write_image(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR))
                if progress:
                    print(f"\rframe {frame.index + 1}/{len(seq)}", end="", file=sys.stderr, flush=True)
    finally:
        if progress:
            print(file=sys.stderr)
        if writer is not None:
            writer.close()
