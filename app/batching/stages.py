"""What runs on the Ray workers: the read stage (tasks) and the model actors of the pool.

Read stage, one task per sequence (:func:`read_stage`): opens the sequence through the source registry,
decodes its frames in order and runs them through one :class:`~app.pipeline.preprocess.Preprocessor`,
exactly as ``app.replay``'s preprocessing stage does, so every piece of per-sequence state (first-N
mean, running average, MOG2, the hologram carrier and reference fit, the background hologram) is built
and used in frame order by one object and never has to travel. It yields blocks of up to
``batch.frames_per_block`` rows (:data:`FRAME_COLUMNS`), then one end row per sequence with its
counters and, if the sequence failed (a corrupt frame with ``source.strict``, a frame the hologram
stage rejects), the one-line reason. Each frame row names the frame delivered before it
(``previous``), so the driver can write the frames in order and spot duplicates of a retried task.

Model actors (:class:`SegmentActor`): one model each, built by the stage factory; ``__call__`` maps a
block of preprocessed rows to label maps with the same :class:`~app.pipeline.inference.InferenceWorker`
replay uses, and stamps each row with the node it ran on and when it finished (wall clock).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from app.config import Config
from app.errors import describe
from app.pipeline.preprocess import Preprocessor, PreprocessSettings
from app.pipeline.sources import open_source

FRAME_COLUMNS = ("sequence", "index", "previous", "name", "tensor", "height", "width", "read_at", "end",
                 "frames_read", "frames_skipped", "error")


def column_of(arrays: list[np.ndarray]) -> np.ndarray:
    """One column of arrays: stacked when they share a shape, else a 1-D object array of them."""
    if len({array.shape for array in arrays}) == 1:
        return np.stack(arrays)
    column = np.empty(len(arrays), dtype=object)
    for position, array in enumerate(arrays):
        column[position] = array
    return column


def _block(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    block = {column: np.array([row[column] for row in rows]) for column in FRAME_COLUMNS if column != "tensor"}
    block["tensor"] = column_of([row["tensor"] for row in rows])
    return block


def read_sequence(sequence: int, uri: str, background: str, config: Config, settings: PreprocessSettings,
                  frames_per_block: int) -> Iterator[dict[str, np.ndarray]]:
    """Blocks of preprocessed frames of one sequence, in order, then its end row (see the module docstring)."""
    rows: list[dict[str, Any]] = []
    previous, read, skipped, error = -1, 0, 0, ""
    limit = config.pipeline.max_frames
    source = None
    try:
        source = open_source(uri, config, realtime=False)
        preprocessor = Preprocessor(dataclasses.replace(settings, background_file=background) if background
                                    else settings)
        for frame in source:
            rows.append({"sequence": sequence, "index": frame.index, "previous": previous, "name": frame.name or "",
                         "tensor": preprocessor(frame.image), "height": frame.image.shape[0],
                         "width": frame.image.shape[1], "read_at": time.time(), "end": False,
                         "frames_read": 0, "frames_skipped": 0, "error": ""})
            previous = frame.index
            if len(rows) >= frames_per_block:
                yield _block(rows)
                rows = []
            if limit and source.frames_read >= limit:
                break
    except Exception as exc:  # this sequence fails, the others go on
        error = describe(exc)
    finally:
        if source is not None:
            read, skipped = source.frames_read, source.frames_skipped
            source.close()
    if rows and not error:
        yield _block(rows)
    yield _block([{"sequence": sequence, "index": -1, "previous": previous, "name": "",
                   "tensor": np.zeros((1, 0, 0), np.float32), "height": 0, "width": 0, "read_at": time.time(),
                   "end": True, "frames_read": read, "frames_skipped": skipped, "error": error}])


def read_stage(batch: dict[str, np.ndarray], *, config: Config, settings: PreprocessSettings,
               frames_per_block: int) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data read stage over rows ``sequence, uri, background``: :func:`read_sequence` for each."""
    for sequence, uri, background in zip(batch["sequence"], batch["uri"], batch["background"], strict=True):
        yield from read_sequence(int(sequence), str(uri), str(background), config, settings, frames_per_block)


class SegmentActor:
    """One model per actor (``config.model`` with ``threads`` CPU threads); blocks of read-stage rows ->
    rows ``sequence, index, previous, labels (H×W uint8), node, actor, done_at, …`` (end rows passed through)."""

    def __init__(self, config: Config, threads: int) -> None:
        import ray

        from app.config import replace
        from app.pipeline.factory import build_backend, build_inference, load_model

        config = replace(config, model={"threads": threads})
        model, meta = load_model(config)
        self.inference = build_inference(config, build_backend(config, model, meta, concurrent=False), meta)
        context = ray.get_runtime_context()
        self.node, self.actor = context.get_node_id(), context.get_actor_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        frames = [row for row, end in enumerate(batch["end"]) if not end]
        tensors = [np.asarray(batch["tensor"][row], dtype=np.float32) for row in frames]
        for shape in dict.fromkeys(tensor.shape for tensor in tensors):
            self.inference.warmup(shape)
        labels = self.inference.predict(tensors, [(int(batch["height"][row]), int(batch["width"][row]))
                                                  for row in frames])
        done_at = time.time()
        out_labels = [np.zeros((0, 0), np.uint8)] * len(batch["end"])
        for row, label_map in zip(frames, labels, strict=True):
            out_labels[row] = label_map
        result = {column: batch[column] for column in FRAME_COLUMNS if column != "tensor"}
        result["labels"] = column_of(out_labels)
        result["node"] = np.array([self.node] * len(batch["end"]))
        result["actor"] = np.array([self.actor] * len(batch["end"]))
        result["done_at"] = np.full(len(batch["end"]), done_at)
        return result
