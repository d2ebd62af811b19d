"""Where a task's delta comes from, chunk by chunk: the one interface a pass reads new tasks through.

A `DeltaSource` fills a float32 row with delta = theta_i - theta0 on elements [lo, hi) of a
fused tensor, and keeps a digest of the content it read, so that a later pass can tell whether
the same source still holds the same content (then the task's fidelity is measured again).
A source that holds the weights themselves also offers `read_weights(name, lo, hi, out)`: a
pass whose sources all do lets its kernel subtract theta0 (the same float32 subtraction,
without a pass of its own over memory).

    CheckpointDeltas   a full fine-tune (or, in factor space, an adapter's factors): file - base
    AdapterDeltas      a LoRA adapter in a dense store: scaling * B @ A on its target weights,
                       computed a block of rows at a time (fusion.lora.delta_rows); deltas only
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..dtypes import F32, to_float32
from ..io import Checkpoint
from ..io.integrity import content_digest
from ..lora import delta_operands, delta_rows

__all__ = ["DeltaSource", "CheckpointDeltas", "LoraTarget", "AdapterDeltas"]


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
        _read_hashed(self.checkpoint, name, lo, hi, out, self._hasher)

    def read_delta(self, name: str, lo: int, hi: int, base: np.ndarray, out: np.ndarray) -> None:
        self.read_weights(name, lo, hi, out)
        np.subtract(out, base, out=out)

    def content(self) -> str:
        return self._hasher.hexdigest()


def _read_hashed(checkpoint: Checkpoint, name: str, lo: int, hi: int, out: np.ndarray, hasher) -> None:
    """out = elements [lo, hi) of `name` in float32; the stored bytes go into `hasher`."""
    dtype = checkpoint.info(name).dtype
    if dtype is F32:
        checkpoint.read_flat_into(name, lo, hi, out)
        hasher.update(out)
    else:
        raw = checkpoint.view_flat(name, lo, hi)
        hasher.update(raw)
        to_float32(raw, dtype, out=out)


@dataclass(frozen=True)
class LoraTarget:
    """How one base weight's delta comes out of an adapter: scaling * B @ A, maybe transposed."""

    a: str  # tensor names in the adapter file
    b: str
    scaling: float
    transpose: bool  # the weight is stored (in, out): Conv1D (fan_in_fan_out) or an embedding


class AdapterDeltas:
    """A LoRA adapter as dense deltas: scaling * B @ A on its target weights, a whole tensor it
    saved (modules_to_save, biases) minus the base's, and zero elsewhere (the plan skips those).

    Memory: the factors of one target at a time (r * (rows + cols) values, the adapter's own
    size for that layer), never its dense delta: `delta_rows` writes rows straight into `out`.
    The content digest covers each target's factors, its scaling and orientation, and the whole
    tensors' bytes, so a changed alpha is a changed source.
    """

    def __init__(self, adapter: Checkpoint, targets: dict[str, LoraTarget], whole: dict[str, str]):
        self.adapter, self.targets, self.whole = adapter, targets, whole  # keyed by base tensor name
        self._hasher = content_digest()
        self._operands: tuple[str, np.ndarray, np.ndarray] | None = None  # the current target's (name, left, right)
        self._hashed: set[str] = set()
        self.peak_factor_bytes = 0  # the largest factors held at once, for tests and figures

    def read_delta(self, name: str, lo: int, hi: int, base: np.ndarray, out: np.ndarray) -> None:
        if name in self.whole:
            _read_hashed(self.adapter, self.whole[name], lo, hi, out, self._hasher)
            np.subtract(out, base, out=out)
            return
        left, right = self._operands_of(name)
        delta_rows(left, right, self.targets[name].scaling, lo, hi, out)

    def _operands_of(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """The factors of target `name` as delta_rows operands, read once while its chunks come."""
        if self._operands is None or self._operands[0] != name:
            self._operands = None  # let the previous target's factors go before reading the next
            target = self.targets[name]
            raw_a, raw_b = self.adapter.read(target.a), self.adapter.read(target.b)
            if name not in self._hashed:
                self._hashed.add(name)
                self._hasher.update(f"{name}\0{target.scaling!r}\0{target.transpose}\0".encode())
                self._hasher.update(raw_a)
                self._hasher.update(raw_b)
            a = to_float32(raw_a, self.adapter.info(target.a).dtype)
            b = to_float32(raw_b, self.adapter.info(target.b).dtype)
            left, right = delta_operands(a, b, transpose=target.transpose)
            self.peak_factor_bytes = max(self.peak_factor_bytes, left.nbytes + right.nbytes)
            self._operands = (name, left, right)
        return self._operands[1], self._operands[2]

    def content(self) -> str:
        return self._hasher.hexdigest()
