"""Where a task's delta comes from, chunk by chunk: the one interface a pass reads new tasks through.

A `DeltaSource` fills a float32 row with delta = theta_i - theta0 on elements [lo, hi) of a
fused tensor, and keeps a digest of the content it read, so that a later pass can tell whether
the same source still holds the same content (then the task's fidelity is measured again).
A source that holds the weights themselves also offers `read_weights(name, lo, hi, out)`: a
pass whose sources all do lets its kernel subtract theta0 (the same float32 subtraction,
without a pass of its own over memory).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..dtypes import F32, to_float32
from ..io import Checkpoint
from ..io.integrity import content_digest

__all__ = ["DeltaSource", "CheckpointDeltas"]


class DeltaSource(Protocol):
    def read_delta(self, name: str, lo: int, hi: int, base: np.ndarray, out: np.ndarray) -> None:
        """out (hi - lo,) float32 = the task's delta on [lo, hi) of `name`; `base` is theta0 there."""

    def content(self) -> str:
        """The digest of the content read so far (after a whole pass: of all of it)."""


class CheckpointDeltas:
    """A full fine-tune: delta = checkpoint - base in float32, hashed as it is read."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self._hasher = content_digest()  # over the raw bytes of the fused tensors, in tensor order

    def read_weights(self, name: str, lo: int, hi: int, out: np.ndarray) -> None:
        """out = theta_i on [lo, hi) in float32; a pass may subtract theta0 inside its kernel."""
        dtype = self.checkpoint.info(name).dtype
        if dtype is F32:
            self.checkpoint.read_flat_into(name, lo, hi, out)
            self._hasher.update(out)
        else:
            raw = self.checkpoint.view_flat(name, lo, hi)
            self._hasher.update(raw)
            to_float32(raw, dtype, out=out)

    def read_delta(self, name: str, lo: int, hi: int, base: np.ndarray, out: np.ndarray) -> None:
        self.read_weights(name, lo, hi, out)
        np.subtract(out, base, out=out)

    def content(self) -> str:
        return self._hasher.hexdigest()
