"""Write a synthetic sequence to disk: numbered PNG images and masks, meta.json, the background
hologram and optionally a video."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np

from app.pipeline.sinks import VideoSink
from app.synthesis.generator import InterferogramSequence


def write_sequence(seq: InterferogramSequence, out_dir: Path, video: Path | None = None, fps: float = 25.0,
                   progress: bool = False) -> None:
    """Write ``out_dir/images/NNNNNN.png``, ``out_dir/masks/NNNNNN.png``, ``out_dir/meta.json``, the
    background hologram ``out_dir/background.png`` (propagated generator) and optionally a video (8-bit, the pipeline's :class:`~app.pipeline.sinks.VideoSink`: mp4v or the first codec
    that opens). The video is written under a temporary name and renamed when finished, also on error
    or Ctrl-C, so the file on disk is always playable. Numbered frames left in
    ``images``/``masks`` by an earlier, longer sequence are deleted, so the folders hold this sequence only."""
    images, masks = out_dir / "images", out_dir / "masks"
    for folder in (images, masks):
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("[0-9]" * 6 + ".png"):
            if int(stale.stem) >= len(seq):
                stale.unlink()
    (out_dir / "meta.json").write_text(json.dumps(seq.meta(), indent=2) + "\n")
    background = getattr(seq, "background", None)
    if background is not None and not cv2.imwrite(str(out_dir / "background.png"), background()):
        raise OSError(f"cannot write {out_dir / 'background.png'}")
    shift = seq.cfg.bit_depth - 8
    writer = VideoSink(video, fps) if video is not None else None
    try:
        for frame in seq:
            name = f"{frame.index:06d}.png"
            for folder, array in ((images, frame.image), (masks, frame.mask)):
                if not cv2.imwrite(str(folder / name), array):
                    raise OSError(f"cannot write {folder / name}")
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
