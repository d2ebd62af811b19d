"""LoRA factors as a dense delta: delta = scaling * B @ A, the rule PEFT merges an adapter with.

    A (r, in), B (out, r)                  a linear layer's factors; its weight is (out, in)
    delta = scaling * B @ A                (out, in)
    delta = scaling * (B @ A).T            (in, out): a weight stored transposed (GPT-2's
                                           Conv1D, fan_in_fan_out) and every embedding LoRA
    scaling = alpha / r, or alpha / sqrt(r) with rsLoRA

`dense_delta` is the readable rule, for whole tensors. `delta_rows` is the streaming path the
store reads: elements [lo, hi) of the flattened delta, computed a block of whole rows at a
time straight into the caller's buffer, so a pass never holds more of a large weight's delta
than one chunk and one row. Both compute in float32, as PEFT does for float32 factors.
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import numpy as np

__all__ = ["lora_scaling", "pattern_value", "dense_delta", "delta_rows", "delta_operands"]


def lora_scaling(alpha: float, rank: int, *, rslora: bool = False) -> float:
    """PEFT's scaling of B @ A: alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def pattern_value(patterns: Mapping[str, float] | None, module: str, default: float) -> float:
    """The value a rank_pattern or alpha_pattern gives `module`, matched as PEFT does: the first
    key that matches a suffix of the module's dotted name (as a regular expression) wins."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def dense_delta(a: np.ndarray, b: np.ndarray, scaling: float, *, transpose: bool) -> np.ndarray:
    """The whole delta, readably: scaling * B @ A, transposed for weights stored (in, out)."""
    product = b.astype(np.float32) @ a.astype(np.float32)  # (out, in)
    if transpose:
        product = product.T  # (in, out)
    return np.ascontiguousarray(product * np.float32(scaling))


def delta_operands(a: np.ndarray, b: np.ndarray, *, transpose: bool) -> tuple[np.ndarray, np.ndarray]:
    """(left, right), contiguous float32, with delta = scaling * left @ right row by row:
    left (rows, r) gives one row of the delta per row, right (r, cols) is shared by all."""
    left, right = (a.T, b.T) if transpose else (b, a)
    return np.ascontiguousarray(left, dtype=np.float32), np.ascontiguousarray(right, dtype=np.float32)


def delta_rows(left: np.ndarray, right: np.ndarray, scaling: float, lo: int, hi: int, out: np.ndarray) -> np.ndarray:
    """out (hi - lo,) = elements [lo, hi) of the flattened delta scaling * left @ right.

    Whole rows inside [lo, hi) are one matmul into `out`; a row cut by lo or hi goes through a
    one-row buffer. Nothing larger than a row is allocated besides `out`."""
    cols = right.shape[1]
    pos = lo
    while pos < hi:
        row, start = divmod(pos, cols)
        whole = (hi - pos) // cols if start == 0 else 0
        if whole:
            block = out[pos - lo : pos - lo + whole * cols].reshape(whole, cols)  # (whole, cols)
            np.matmul(left[row : row + whole], right, out=block)
            pos += whole * cols
        else:
            stop = min(cols, hi - row * cols)
            out[pos - lo : pos - lo + stop - start] = (left[row] @ right)[start:stop]  # (cols,) then a slice
            pos += stop - start
    out *= np.float32(scaling)
    return out
