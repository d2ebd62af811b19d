"""Tensor dtypes in numpy terms, as safetensors names them, with exact float32 conversions.

numpy has no bfloat16, and the CPU core does not import a framework, so a bfloat16 tensor is
held as its uint16 bit patterns (`DType.storage`). Conversions to and from float32 work on
those bits: widening is exact (a shift), narrowing rounds to nearest even, as torch's `.to()`
and `ml_dtypes` do. float16 is numpy's own. Arrays that arrive as `ml_dtypes.bfloat16` or as
torch tensors are recognised by their dtype's name, without importing either package.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError

__all__ = ["DType", "DTYPES", "F64", "F32", "F16", "BF16", "FLOAT_NAMES", "parse_dtype", "dtype_of",
           "to_float32", "from_float32", "round_through", "as_float32", "float_dtype"]


@dataclass(frozen=True)
class DType:
    """One safetensors dtype: its code (`F32`), size, and the numpy dtype its bytes are held in."""

    code: str
    name: str  # the spelling users know: float32, bfloat16, int64, ...
    storage: np.dtype  # bfloat16 is held as uint16 bit patterns
    is_float: bool

    @property
    def itemsize(self) -> int:
        return self.storage.itemsize

    def __repr__(self) -> str:
        return self.name


def _dtype(code: str, name: str, storage, is_float: bool = False) -> DType:
    return DType(code, name, np.dtype(storage), is_float)


F64 = _dtype("F64", "float64", np.float64, True)
F32 = _dtype("F32", "float32", np.float32, True)
F16 = _dtype("F16", "float16", np.float16, True)
BF16 = _dtype("BF16", "bfloat16", np.uint16, True)
DTYPES: dict[str, DType] = {d.code: d for d in (
    F64, F32, F16, BF16,
    _dtype("F8_E4M3", "float8_e4m3fn", np.uint8, True), _dtype("F8_E5M2", "float8_e5m2", np.uint8, True),
    _dtype("I64", "int64", np.int64), _dtype("I32", "int32", np.int32), _dtype("I16", "int16", np.int16),
    _dtype("I8", "int8", np.int8), _dtype("U64", "uint64", np.uint64), _dtype("U32", "uint32", np.uint32),
    _dtype("U16", "uint16", np.uint16), _dtype("U8", "uint8", np.uint8), _dtype("BOOL", "bool", np.bool_),
)}
_BY_NAME = {d.name: d for d in DTYPES.values()}
# Float dtypes a unified delta or a decoupled model may be written in, as the CLI spells them.
FLOAT_NAMES = ("float32", "float16", "bfloat16")
_ALIASES = {"fp32": F32, "float": F32, "fp16": F16, "half": F16, "bf16": BF16, "double": F64, "fp64": F64}


def parse_dtype(value) -> DType:
    """A DType from its code (`BF16`), its name (`bfloat16`, `bf16`), a numpy or a torch dtype."""
    if isinstance(value, DType):
        return value
    text = str(value).removeprefix("torch.")
    found = DTYPES.get(text) or _BY_NAME.get(text.lower()) or _ALIASES.get(text.lower())
    if found is None:
        raise InputError(f"unknown dtype {value!r}; use one of {', '.join(FLOAT_NAMES)} (or a safetensors code such as F32)")
    return found


def dtype_of(array) -> DType:
    """The DType of a numpy array (ml_dtypes' bfloat16 included) or of a torch tensor."""
    return parse_dtype(array.dtype)


def _bf16_to_float32(codes: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    wide = codes.astype(np.uint32) << 16  # exact: bfloat16 is the top half of a float32
    if out is None:
        return wide.view(np.float32)
    out.view(np.uint32)[...] = wide
    return out


def _float32_to_bf16(x: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    # Round to nearest, ties to even: add 0x7FFF plus the lowest kept bit, then truncate.
    rounded = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    rounded = np.where(np.isnan(x), np.uint16(0x7FC0), rounded)  # NaN stays NaN (a quiet one)
    if out is None:
        return rounded
    out[...] = rounded
    return out


def to_float32(raw: np.ndarray, dtype: DType, *, out: np.ndarray | None = None) -> np.ndarray:
    """Values held in `dtype`'s storage (bfloat16 as uint16 bits) as float32; exact for 16-bit floats."""
    if dtype is BF16:
        return _bf16_to_float32(raw.view(np.uint16), out)
    if out is None:
        return raw.astype(np.float32)
    np.copyto(out, raw, casting="unsafe")
    return out


def from_float32(x: np.ndarray, dtype: DType, *, out: np.ndarray | None = None) -> np.ndarray:
    """float32 values in `dtype`'s storage, rounded to nearest even (bfloat16 as uint16 bits)."""
    if dtype is BF16:
        return _float32_to_bf16(x, out)
    with np.errstate(over="ignore"):  # beyond float16's range is inf, as in torch; callers check
        if out is None:
            return x.astype(dtype.storage, copy=False)  # float32 to float32 is the array itself
        np.copyto(out, x, casting="unsafe")
    return out


def round_through(x: np.ndarray, dtype: DType) -> np.ndarray:
    """float32 values rounded to `dtype` and widened back: what storing them in `dtype` keeps."""
    if dtype in (F32, F64):
        return np.asarray(x, dtype=np.float32)
    return to_float32(from_float32(x, dtype), dtype)


def as_float32(array) -> np.ndarray:
    """A float numpy array's values as float32 (no copy if they are float32 already).

    float16 and bfloat16 (`ml_dtypes`' arrays, known by their dtype's name) widen exactly;
    float64 rounds to nearest even, as torch's `.float()` does.
    """
    dtype = dtype_of(array)
    if not dtype.is_float:
        raise InputError(f"expected a float array, got {dtype.name}; only float tensors are fused")
    if dtype is BF16:
        return to_float32(np.asarray(array).view(np.uint16), BF16)
    return np.asarray(array, dtype=np.float32)


def float_dtype(value) -> DType:
    """`parse_dtype` for a dtype that values are computed or stored in: float64, float32, float16, bfloat16."""
    found = parse_dtype(value)
    if found not in (F64, F32, F16, BF16):
        raise InputError(f"dtype {found.name} cannot hold a delta; use one of {', '.join(FLOAT_NAMES)}")
    return found
