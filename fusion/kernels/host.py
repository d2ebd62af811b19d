"""Decouple's elementwise rebuild on the host, in numpy: no compilation, so a decouple starts at once.

`rebuild_into` is `fusion.reference.rebuild` computed in place on the packed mask bits; the cpu
kernel's `rebuild` is this function, and the kernel tests prove it equal to the reference bit
for bit. A decouple needs nothing else, so it never loads numba.
"""

from __future__ import annotations

import numpy as np

from ..dtypes import as_float32

__all__ = ["rebuild_into"]


def rebuild_into(base: np.ndarray, unified: np.ndarray, packed: np.ndarray, rescaler: float, *,
                 out: np.ndarray | None = None) -> np.ndarray:
    """theta0 + lambda * M * u on the packed bits, float32 (n,), in `out` if given (`out` may be `unified`)."""
    n = np.size(unified)
    bits = np.unpackbits(np.reshape(packed, -1), count=n, bitorder="little")  # (n,) uint8 0/1
    keep = np.negative(bits, dtype=np.int32)  # (n,) all 32 bits set where the mask is on, else none
    result = np.empty(n, dtype=np.float32) if out is None else out
    np.multiply(as_float32(unified), np.float32(rescaler), out=result)  # u * lambda, one rounding
    # where(M, u * lambda, +0.0) exactly, as a bit mask (a select in numpy is several times slower)
    np.bitwise_and(result.view(np.int32), keep, out=result.view(np.int32))
    # `base + 0` (not a copy) where the mask is off: -0.0 + 0.0 is +0.0, as in the reference
    np.add(as_float32(base), result, out=result)
    return result
