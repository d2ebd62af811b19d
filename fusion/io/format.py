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
A file that breaks one rule is refused with one line naming the file, the tensor and the rule.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Mapping, Sequence

from ..dtypes import DTYPES, DType

__all__ = ["MAX_HEADER_BYTES", "PREFIX_BYTES", "TensorInfo", "LayoutEntry", "parse_header", "encode_header",
           "header_length", "numel"]

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit
PREFIX_BYTES = 8
METADATA = "__metadata__"
_FIX = "re-save it with safetensors"

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
        raise ValueError(f"{where}: not a safetensors file (shorter than its 8-byte header length); {_FIX}")
    (length,) = struct.unpack("<Q", prefix)
    if length > MAX_HEADER_BYTES or PREFIX_BYTES + length > file_size:
        raise ValueError(f"{where}: not a safetensors file (header length {length} does not fit the file "
                         f"of {file_size} bytes); {_FIX}")
    return length


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} appears twice")
        seen[key] = value
    return seen


def _load_json(raw: bytes, where: str) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise ValueError(f"{where}: header is not UTF-8; {_FIX}") from None
    except ValueError as err:  # json.JSONDecodeError is a ValueError, as is a repeated key
        raise ValueError(f"{where}: header is not valid JSON ({err}); {_FIX}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{where}: header is not a JSON object; {_FIX}")
    return header


def _is_index(value) -> bool:
    """A non-negative JSON integer; booleans and floats are not integers here."""
    return type(value) is int and value >= 0


def _parse_metadata(value, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"{where}: {METADATA} must map strings to strings; {_FIX}")
    return dict(value)


def _parse_entry(name: str, entry, where: str) -> TensorInfo:
    def bad(rule: str) -> ValueError:
        return ValueError(f"{where}: tensor {name!r}: {rule}; {_FIX}")

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
            raise ValueError(f"{where}: tensor {info.name!r} {rule} (data_offsets {info.begin}..{info.end}); {_FIX}")
        position = info.end
    if position != data_size:
        raise ValueError(f"{where}: the tensors cover {position} bytes but the data section has {data_size} "
                         f"(truncated, or trailing bytes); {_FIX}")


def parse_header(raw: bytes, *, data_size: int, where: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Entries (in header order) and metadata of a header's JSON bytes, validated strictly."""
    header = _load_json(raw, where)
    metadata = _parse_metadata(header.pop(METADATA), where) if METADATA in header else {}
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
            raise ValueError(f"tensor name {name!r} is used twice or reserved; give every tensor its own name")
        header[name] = {"dtype": dtype.code, "shape": list(shape), "data_offsets": [info.begin, info.end]}
        entries[name], offset = info, info.end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, entries
