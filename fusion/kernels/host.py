"""Decouple's elementwise rebuild on the host: one C pass where the native library is there, else numpy.

`rebuild_into` is `fusion.reference.rebuild` computed in place on the packed mask bits. Where the
cpu kernel's native library loads (fusion.kernels.cpu_native: built once per machine, loaded in
milliseconds) it is one pass over the inputs; without a compiler, or with
CONDU_CPU_BACKEND=numba, `rebuild_numpy` does the same in five numpy passes (the rebuild was a
fifth of a decouple's CPU time in numpy, measured with perf at 64M parameters). The cpu
kernel's `rebuild` is this function; the kernel tests prove both paths equal to the reference
bit for bit. A decouple never loads numba.
"""

from __future__ import annotations

import os

import numpy as np

from ..dtypes import as_float32

__all__ = ["rebuild_into", "rebuild_numpy"]


def _native():
    """fusion.kernels.cpu_native when its library loads and numba was not asked for, else None."""
    if os.environ.get("CONDU_CPU_BACKEND") == "numba":
        return None
    from . import cpu_native

    return cpu_native if cpu_native.available() else None


def _flat_float32(array, *, writable: bool = False) -> bool:
    return (isinstance(array, np.ndarray) and array.dtype == np.float32 and array.flags.c_contiguous
            and (array.flags.writeable or not writable))


def rebuild_into(base: np.ndarray, unified: np.ndarray, packed: np.ndarray, rescaler: float, *,
                 out: np.ndarray | None = None) -> np.ndarray:
    """theta0 + lambda * M * u on the packed bits, float32 (n,), in `out` if given (`out` may be `unified`)."""
    n = np.size(unified)
    result = np.empty(n, dtype=np.float32) if out is None else out
    native = _native() if np.size(base) == n == np.size(result) else None
    if native is not None and _flat_float32(base) and _flat_float32(unified) and _flat_float32(result, writable=True):
        flat = np.ascontiguousarray(np.reshape(packed, -1), dtype=np.uint8)
        if flat.size >= -(-n // 8):
            return native.rebuild(base, unified, flat, rescaler, result)
    return rebuild_numpy(base, unified, packed, rescaler, out=result)


def rebuild_numpy(base: np.ndarray, unified: np.ndarray, packed: np.ndarray, rescaler: float, *,
                  out: np.ndarray | None = None) -> np.ndarray:
    """rebuild_into in numpy: no compiled code at all."""
    n = np.size(unified)
    # (n,) int8: -1 (all bits set) where the mask is on, else 0. The `and` below widens it to int32
    # a few thousand elements at a time, where an int32 mask would be a 4-byte-a-weight pass of its own.
    keep = np.unpackbits(np.reshape(packed, -1), count=n, bitorder="little").view(np.int8)
    np.negative(keep, out=keep)
    result = np.empty(n, dtype=np.float32) if out is None else out
    np.multiply(as_float32(unified), np.float32(rescaler), out=result)  # u * lambda, one rounding
    # where(M, u * lambda, +0.0) exactly, as a bit mask (a select in numpy is several times slower)
    np.bitwise_and(result.view(np.int32), keep, out=result.view(np.int32))
    # `base + 0` (not a copy) where the mask is off: -0.0 + 0.0 is +0.0, as in the reference
    np.add(as_float32(base), result, out=result)
    return result
