"""Decouple's elementwise rebuild on the host: one C pass where the native library is there, else numpy.

`rebuild_into` is `fusion.reference.rebuild` computed in place on the packed mask bits. Where the
cpu kernel's native library loads (fusion.kernels.cpu_native: built once per machine, loaded in
milliseconds) it is one pass over the inputs; without a compiler, or with
CONDU_CPU_BACKEND=numba, `rebuild_numpy` does the same in five numpy passes (the rebuild was a
fifth of a decouple's CPU time in numpy, measured with perf at 64M parameters). `rebuild_as`
also rounds to a 16-bit output dtype in that pass, where numpy's conversion alone doubled a
bf16 decouple's CPU time. The cpu kernel's `rebuild` is `rebuild_into`; tests prove every path
equal to the reference (and to fusion.dtypes' rounding) bit for bit. A decouple never loads numba.
"""

from __future__ import annotations

import os

import numpy as np

from ..dtypes import DType, as_float32, from_float32

__all__ = ["rebuild_into", "rebuild_as", "rebuild_numpy"]

# How the native rebuild stores each output dtype (fusion.kernels.cpu_native.rebuild's `kind`), and in what.
_NATIVE_KINDS = {"F32": 0, "BF16": 1, "F16": 2}
_KIND_STORAGE = {0: np.dtype(np.float32), 1: np.dtype(np.uint16), 2: np.dtype(np.float16)}


def _native():
    """fusion.kernels.cpu_native when its library loads and numba was not asked for, else None."""
    if os.environ.get("CONDU_CPU_BACKEND") == "numba":
        return None
    from . import cpu_native

    return cpu_native if cpu_native.available() else None


def _flat_float32(array) -> bool:
    return isinstance(array, np.ndarray) and array.dtype == np.float32 and array.flags.c_contiguous


def rebuild_into(base: np.ndarray, unified: np.ndarray, packed: np.ndarray, rescaler: float, *,
                 out: np.ndarray | None = None) -> np.ndarray:
    """theta0 + lambda * M * u on the packed bits, float32 (n,), in `out` if given (`out` may be `unified`)."""
    result = np.empty(np.size(unified), dtype=np.float32) if out is None else out
    if _native_rebuild(base, unified, packed, rescaler, result, 0):
        return result
    return rebuild_numpy(base, unified, packed, rescaler, out=result)


def rebuild_as(base: np.ndarray, unified: np.ndarray, packed: np.ndarray, rescaler: float, out: np.ndarray,
               dtype: DType) -> np.ndarray:
    """rebuild_into stored in `dtype` in `out` (its storage: bfloat16 as uint16 bits), rounded as
    fusion.dtypes.from_float32: in the same single pass where the native library is there."""
    kind = _NATIVE_KINDS.get(dtype.code)
    if kind is not None and _native_rebuild(base, unified, packed, rescaler, out, kind):
        return out
    return from_float32(rebuild_into(base, unified, packed, rescaler), dtype, out=out)


def _native_rebuild(base, unified, packed, rescaler: float, out: np.ndarray, kind: int) -> bool:
    """The native rebuild into `out`, where the library is there and the arrays are what it reads."""
    n = np.size(unified)
    if not (np.size(base) == n == np.size(out) and _flat_float32(base) and _flat_float32(unified)
            and out.dtype == _KIND_STORAGE[kind] and out.flags.c_contiguous and out.flags.writeable):
        return False
    flat = np.ascontiguousarray(np.reshape(packed, -1), dtype=np.uint8)
    native = _native() if flat.size >= -(-n // 8) else None
    if native is None:
        return False
    native.rebuild(base, unified, flat, rescaler, out, kind=kind)
    return True


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
