"""Synthetic holograms with exact ground truth: the classic interferogram generator
(:mod:`app.synthesis.generator`), the propagated off-axis hologram generator with domain randomisation
(:mod:`app.synthesis.propagated`), measuring a real hologram (:mod:`app.synthesis.like`) and writing
sequences to disk (:mod:`app.synthesis.writer`). NumPy/OpenCV only, no PyTorch."""

from __future__ import annotations

from app.config import SynthConfig
from app.synthesis.generator import InterferogramSequence
from app.synthesis.propagated import HologramSequence


def make_sequence(cfg: SynthConfig) -> InterferogramSequence:
    """The generator ``cfg`` asks for: the classic one, or the propagated-hologram one
    (:class:`~app.synthesis.propagated.HologramSequence`) for ``generator: propagated`` or ``randomize: true``."""
    if cfg.generator == "propagated" or cfg.randomize:
        return HologramSequence(cfg)
    return InterferogramSequence(cfg)
