"""The safetensors format, read strictly and written exactly.

A file is an 8-byte little-endian header length N, N bytes of JSON, then the data section.
The JSON maps each tensor name to `{"dtype", "shape", "data_offsets": [begin, end]}` (byte
offsets into the data section) and may hold `"__metadata__"`, a map of strings to strings.
A header is accepted only as the format defines it (the rules of the reference
implementation's own validation):
- the length fits the file and the 100 MiB limit, and the JSON is one UTF-8 object whose
  keys appear once;
- dtypes are known; shapes and offsets are non-negative integers (no floats, no booleans);
- sorted by offset, the tensors are contiguous from 0, never overlap, each spans exactly
  numel * itemsize bytes, and together they cover the data section exactly (no trailing bytes).
A header is outside text, so it is bounded before it is parsed (`fusion.io.bounded_json`): it
nests 3 levels ({name: {dtype, shape: [...], data_offsets: [...]}}); it lists at most
MAX_TENSORS tensors (a zero-size tensor costs an entry too), with commas and brackets to match;
and it is no longer than its entries (64 KiB each) and its metadata can take. So a refusal costs
one read of the header, whatever it holds. After parsing: `__metadata__` holds at most
MAX_METADATA_CHARS characters (or an eighth of the data section, if more); a shape has at most
64 dimensions, and its non-zero dimensions times the item size stay below 2**63 bytes, so numpy
and the reference implementation can describe even a tensor of no elements (a dimension of 2**64
in a zero-size tensor is refused, not written into an output).
A file that breaks one rule is refused with one line naming the file, the tensor and the rule.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Mapping, Sequence

from ..dtypes import DTYPES, DType
from ..errors import InputError
from .bounded_json import JsonLimits, loads

__all__ = ["MAX_HEADER_BYTES", "MAX_TENSORS", "MAX_METADATA_CHARS", "MAX_DIMS", "PREFIX_BYTES", "TensorInfo",
           "LayoutEntry", "parse_header", "encode_header", "header_length", "numel"]

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit
MAX_TENSORS = 1 << 18  # per file: a model's largest shard holds a few thousand; bounds the parse's memory
MAX_METADATA_CHARS = 1 << 20  # __metadata__ is a few names and versions, not data
MAX_DIMS = 64  # numpy's limit
_MAX_BYTES = 1 << 63  # numpy's sizes are signed 64-bit
_ENTRY_BYTES = 64 * 1024  # a tensor's entry: its name (rarely past a few hundred bytes) and a few numbers
PREFIX_BYTES = 8
METADATA = "__metadata__"
_FIX = "re-save it with safetensors"
# An entry is one object and two lists; its commas: 2 between fields, 1 in data_offsets, 1 after it,
# and one per further dimension; with metadata's, a 16-per-tensor budget holds any real header.
_HEADER_LIMITS = JsonLimits(depth=3, brackets=6 * (MAX_TENSORS + 2), commas=16 * MAX_TENSORS)

LayoutEntry = tuple[str, DType, Sequence[int]]  # (name, dtype, shape): a tensor before it is written


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a header: where its bytes are in the data section."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def header_length(prefix: bytes, *, file_size: int, where: str) -> int:
    """The JSON length from the 8-byte prefix, checked against the file's size."""
    if len(prefix) < PREFIX_BYTES:
        raise InputError(f"{where}: not a safetensors file (shorter than its 8-byte header length); {_FIX}")
    (length,) = struct.unpack("<Q", prefix)
    if length > MAX_HEADER_BYTES or PREFIX_BYTES + length > file_size:
        raise InputError(f"{where}: not a safetensors file (header length {length} does not fit the file "
                         f"of {file_size} bytes); {_FIX}")
    return length


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise InputError(f"key {key!r} appears twice")  # loads names the file
        seen[key] = value
    return seen


def _metadata_limit(data_size: int) -> int:
    return max(MAX_METADATA_CHARS, data_size // 8)


def _load_json(raw: bytes, data_size: int, where: str) -> dict:
    objects = raw.count(b"{")  # the header, __metadata__, and one per tensor (and any in a string)
    if objects > MAX_TENSORS + 2:
        raise InputError(f"{where}: header lists about {objects - 1:,} tensors, more than the {MAX_TENSORS:,} a "
                         f"file may hold; split it into shards of fewer tensors")
    allowance = objects * _ENTRY_BYTES + 6 * _metadata_limit(data_size)  # 6: a character written as \uXXXX
    if len(raw) > allowance:
        raise InputError(f"{where}: header is {len(raw):,} bytes, more than its {max(objects - 2, 0):,} tensor "
                         f"entries and the metadata allowed take ({allowance:,}); {_FIX}")
    header = loads(raw, _HEADER_LIMITS, where=where, what="header", fix=_FIX, object_pairs_hook=_unique_keys)
    if not isinstance(header, dict):
        raise InputError(f"{where}: header is not a JSON object; {_FIX}")
    return header


def _is_index(value) -> bool:
    """A non-negative JSON integer; booleans and floats are not integers here."""
    return type(value) is int and value >= 0


def _parse_metadata(value, data_size: int, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise InputError(f"{where}: {METADATA} must map strings to strings; {_FIX}")
    limit = _metadata_limit(data_size)
    size = sum(len(k) + len(v) for k, v in value.items())
    if size > limit:
        raise InputError(f"{where}: {METADATA} holds {size:,} characters, more than the {limit:,} allowed (1 MiB, "
                         f"or an eighth of the data); keep large data in tensors or files beside it and {_FIX}")
    return dict(value)


def _too_large(shape: Sequence[int], itemsize: int) -> bool:
    """Whether itemsize times the non-zero dimensions reaches 2**63 (what numpy refuses even for no
    elements; the reference implementation refuses a subset of these)."""
    size = itemsize
    for dim in shape:
        size *= dim or 1
        if size >= _MAX_BYTES:
            return True
    return False


def _parse_entry(name: str, entry, where: str) -> TensorInfo:
    def bad(rule: str) -> InputError:
        return InputError(f"{where}: tensor {name!r}: {rule}; {_FIX}")

    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise bad("entry needs dtype, shape and data_offsets")
    dtype = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise bad(f"unknown dtype {entry['dtype']!r}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(_is_index(s) for s in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_index(o) for o in offsets):
        raise bad(f"data_offsets {offsets!r} is not two non-negative integers")
    if len(shape) > MAX_DIMS:
        raise bad(f"shape has {len(shape)} dimensions, more than numpy's {MAX_DIMS}")
    if _too_large(shape, dtype.itemsize):
        raise bad(f"shape {shape} is too large: its non-zero dimensions of {dtype.name} take 2**63 bytes or more, "
                  "which numpy cannot describe even with no elements")
    info = TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])
    if info.end < info.begin or info.nbytes != info.numel * dtype.itemsize:
        raise bad(f"data_offsets {offsets} span {info.end - info.begin} bytes, but {dtype.name} "
                  f"{list(shape)} needs {info.numel * dtype.itemsize}")
    return info


def _check_coverage(entries: list[TensorInfo], data_size: int, where: str) -> None:
    """Sorted by offset, tensors tile the data section exactly: no gap, no overlap, no tail."""
    position = 0
    for info in sorted(entries, key=lambda i: (i.begin, i.end)):
        if info.begin != position:
            rule = "overlaps the tensor before it" if info.begin < position else f"leaves a gap at byte {position}"
            raise InputError(f"{where}: tensor {info.name!r} {rule} (data_offsets {info.begin}..{info.end}); {_FIX}")
        position = info.end
    if position != data_size:
        raise InputError(f"{where}: the tensors cover {position} bytes but the data section has {data_size} "
                         f"(truncated, or trailing bytes); {_FIX}")


def parse_header(raw: bytes, *, data_size: int, where: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Entries (in header order) and metadata of a header's JSON bytes, validated strictly."""
    header = _load_json(raw, data_size, where)
    metadata = _parse_metadata(header.pop(METADATA), data_size, where) if METADATA in header else {}
    entries = {name: _parse_entry(name, entry, where) for name, entry in header.items()}
    _check_coverage(list(entries.values()), data_size, where)
    return entries, metadata


def encode_header(layout: Sequence[LayoutEntry], metadata: Mapping[str, str] | None = None
                  ) -> tuple[bytes, dict[str, TensorInfo]]:
    """The header bytes (length prefix, JSON padded with spaces to 8 bytes) and its entries."""
    header: dict = {}
    if metadata:
        header[METADATA] = {str(k): str(v) for k, v in metadata.items()}
    entries, offset = {}, 0
    for name, dtype, shape in layout:
        shape = tuple(int(s) for s in shape)
        info = TensorInfo(name, dtype, shape, offset, offset + numel(shape) * dtype.itemsize)
        if name in entries or name == METADATA:
            raise InputError(f"tensor name {name!r} is used twice or reserved; give every tensor its own name")
        header[name] = {"dtype": dtype.code, "shape": list(shape), "data_offsets": [info.begin, info.end]}
        entries[name], offset = info, info.end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, entries
