"""Tensor dtypes in numpy terms, as safetensors names them, with exact float32 conversions.

numpy has no bfloat16, and the CPU core does not import a framework, so a bfloat16 tensor is
held as its uint16 bit patterns (`DType.storage`). Conversions to and from float32 work on
those bits: widening is exact (a shift), narrowing rounds to nearest even, as torch's `.to()`
and `ml_dtypes` do. float16 is numpy's own. Arrays that arrive as `ml_dtypes.bfloat16` or as
torch tensors are recognised by their dtype's name, without importing either package.

A unified delta may also be stored block-quantized (`Q8`, `Q4`: `BlockQuant`), the store's compact
mode: blocks of QUANT_BLOCK elements, each one float32 scale and that many signed integer codes.
The rule that makes the codes is `fusion.reference.quantize_blocks`; this module holds the forms,
their byte layout on disk (`encode_blocks`, `decode_blocks`) and `unified_form`, which names them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError

__all__ = ["DType", "DTYPES", "F64", "F32", "F16", "BF16", "FLOAT_NAMES", "parse_dtype", "dtype_of",
           "to_float32", "from_float32", "round_through", "as_float32", "float_dtype", "BlockQuant", "Q8", "Q4",
           "QUANT_BLOCK", "QUANT_FORMS", "UNIFIED_NAMES", "unified_form", "encode_blocks", "decode_blocks",
           "dequantize_raw"]


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


# ---- block-quantized storage of a unified delta (the store's compact mode) ------------------------

# Elements per quantization block. A chunk of a pass, and a read of a stored tensor, start at a block
# boundary of their tensor: chunk sizes and the kernels' blocks are multiples of it.
QUANT_BLOCK = 64


@dataclass(frozen=True)
class BlockQuant:
    """A unified delta stored in blocks of `block` elements: per block one float32 scale (its largest
    |u| over qmax) and one signed `bits`-bit code per element, -qmax..qmax (fusion.reference).

    On disk a tensor is one uint8 array of records, one per block, in order: the scale's four
    little-endian bytes, then the codes: int8 one a byte (Q8), or two a byte for int4, element 2j in
    the low four bits and 2j + 1 in the high four, each stored as code + 8 (Q4). A tensor's last
    block may be shorter; its record is as long as its codes need. Q8 costs 8.5 bits an element,
    Q4 4.5 (float32 scales over 64 elements)."""

    code: str  # as the manifest records it: Q8, Q4
    name: str  # as users spell it: int8, int4
    bits: int
    block: int = QUANT_BLOCK
    is_float = False

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1  # 127, 7: a symmetric range, so -0 and +0 code alike

    def code_bytes(self, count: int) -> int:
        """Bytes the codes of `count` elements take."""
        return (count * self.bits + 7) // 8

    @property
    def record(self) -> int:
        """Bytes of one whole block's record: its scale and its codes."""
        return 4 + self.code_bytes(self.block)

    def nbytes(self, numel: int) -> int:
        """Bytes of a whole tensor of `numel` elements."""
        full, rest = divmod(numel, self.block)
        return full * self.record + (4 + self.code_bytes(rest) if rest else 0)

    def byte_range(self, lo: int, hi: int, numel: int) -> tuple[int, int]:
        """The bytes that hold elements [lo, hi) of a tensor of `numel`; lo is a block boundary, and
        hi one too or the tensor's end."""
        if lo % self.block or (hi % self.block and hi != numel):
            raise InputError(f"elements [{lo}, {hi}) of a {self.name} unified delta do not start and end at "
                             f"blocks of {self.block}; read it in chunks of a multiple of {self.block}")
        return self.nbytes(lo), self.nbytes(hi)

    def __repr__(self) -> str:
        return self.name


Q8 = BlockQuant("Q8", "int8", 8)
Q4 = BlockQuant("Q4", "int4", 4)
QUANT_FORMS: dict[str, BlockQuant] = {q.code: q for q in (Q8, Q4)}
# How a unified delta may be stored, as the CLI spells it: a float dtype, or block-quantized.
UNIFIED_NAMES = FLOAT_NAMES + (Q8.name, Q4.name)


def unified_form(value) -> DType | BlockQuant:
    """How a unified delta is stored: a float dtype (`float_dtype`), or Q8 / Q4 by name or code."""
    if isinstance(value, BlockQuant):
        return value
    text = str(value)
    found = next((q for q in QUANT_FORMS.values() if text in (q.code, q.name)), None)
    if found is not None:
        return found
    try:
        return float_dtype(value)
    except InputError as error:
        raise InputError(f"{error}, or the blocks of {' or '.join(q.name for q in QUANT_FORMS.values())}") from None


def encode_blocks(codes: np.ndarray, scales: np.ndarray, form: BlockQuant) -> np.ndarray:
    """The records of codes (n,) (integers in -qmax..qmax) and scales (ceil(n/block),) float32: uint8
    (form.nbytes(n),). `codes` start at a block boundary of their tensor."""
    n = codes.size
    full = n // form.block
    out = np.empty(form.nbytes(n), dtype=np.uint8)
    body = out[: full * form.record].reshape(full, form.record)  # (full, record)
    body[:, :4] = np.asarray(scales[:full], dtype="<f4").reshape(full, 1).view(np.uint8)
    body[:, 4:] = _code_bytes(codes[: full * form.block].reshape(full, form.block), form)
    if n % form.block:
        tail = out[full * form.record :]
        tail[:4] = np.asarray(scales[full : full + 1], dtype="<f4").view(np.uint8)
        tail[4:] = _code_bytes(codes[full * form.block :].reshape(1, -1), form)[0]
    return out


def decode_blocks(raw: np.ndarray, n: int, form: BlockQuant) -> tuple[np.ndarray, np.ndarray]:
    """The codes (n,) int8 and scales (ceil(n/block),) float32 of the records of n elements."""
    raw = np.asarray(raw, dtype=np.uint8).reshape(-1)
    if raw.size != form.nbytes(n):
        raise InputError(f"{raw.size} bytes hold no {form.name} records of {n} elements ({form.nbytes(n)} would)")
    full, rest = divmod(n, form.block)
    body = raw[: full * form.record].reshape(full, form.record)  # (full, record)
    scales = np.empty(full + (1 if rest else 0), dtype=np.float32)
    scales[:full] = np.ascontiguousarray(body[:, :4]).view("<f4").reshape(-1)
    codes = np.empty(n, dtype=np.int8)
    codes[: full * form.block] = _codes_of(body[:, 4:], form.block, form).reshape(-1)
    if rest:
        tail = raw[full * form.record :]
        scales[full] = tail[:4].copy().view("<f4")[0]
        codes[full * form.block :] = _codes_of(tail[4:].reshape(1, -1), rest, form).reshape(-1)
    return codes, scales


def dequantize_raw(raw: np.ndarray, n: int, form: BlockQuant, *, out: np.ndarray | None = None) -> np.ndarray:
    """The float32 values (n,) that records of n elements stand for: code * scale, one rounding each
    (fusion.reference.dequantize_blocks), in `out` if given."""
    codes, scales = decode_blocks(raw, n, form)
    values = np.empty(n, dtype=np.float32) if out is None else out
    full = (n // form.block) * form.block
    np.multiply(codes[:full].reshape(-1, form.block), scales[: full // form.block, None],
                out=values[:full].reshape(-1, form.block), dtype=np.float32)
    if full < n:
        np.multiply(codes[full:], scales[-1], out=values[full:], dtype=np.float32)
    return values


def _code_bytes(codes: np.ndarray, form: BlockQuant) -> np.ndarray:
    """Codes (k, m) as their bytes (k, code_bytes(m)): int8 as is, int4 two a byte plus 8."""
    if form.bits == 8:
        return codes.astype(np.int8).view(np.uint8)
    offset = (codes.astype(np.int16) + 8).astype(np.uint8)  # (k, m) 1..15
    if offset.shape[1] % 2:
        offset = np.concatenate([offset, np.full((offset.shape[0], 1), 8, dtype=np.uint8)], axis=1)  # code 0 pads
    return offset[:, 0::2] | (offset[:, 1::2] << 4)


def _codes_of(data: np.ndarray, m: int, form: BlockQuant) -> np.ndarray:
    """Bytes (k, code_bytes(m)) as codes (k, m) int8: the inverse of _code_bytes."""
    if form.bits == 8:
        return np.ascontiguousarray(data).view(np.int8)
    low = (data & 0x0F).astype(np.int8) - 8
    high = (data >> 4).astype(np.int8) - 8
    return np.stack([low, high], axis=2).reshape(data.shape[0], 2 * data.shape[1])[:, :m]
