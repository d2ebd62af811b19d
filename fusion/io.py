"""Checkpoint I/O: lazy safetensors reading, slice by slice, and streaming atomic writing.

Inputs are a single `.safetensors` file or a Hugging Face model folder (`model.safetensors`,
or shards listed by `model.safetensors.index.json`). A file is read through its header: a
flat slice `[lo, hi)` of a tensor is one `pread` of `(hi - lo) * itemsize` bytes, so memory
is bounded by the slice, never by the tensor or the file. Pickle formats are refused.

Writing streams too: the safetensors layout is an 8-byte little-endian header length, a JSON
header with every tensor's dtype, shape and byte range, then the data in header order. When
shapes and dtypes are known up front (they always are here), the header goes first and chunks
are appended as they are computed. Files are written under a temporary name, fsynced and
renamed; `save` and `SafetensorsWriter` never leave a half-written file under a final name.

Fingerprint of a checkpoint: sha256 over, for each of its files in name order, the file name,
its size and its header bytes. It is cheap (no tensor data is read) and stable across copies;
it changes when a tensor is added, renamed, reshaped or re-typed, or the file is rewritten
with another layout, but not when only values change in place at the same size.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

__all__ = [
    "Checkpoint",
    "SafetensorsFile",
    "SafetensorsWriter",
    "ShardedWriter",
    "TensorInfo",
    "open_checkpoint",
    "load",
    "save",
    "copy_model_files",
    "fsync_dir",
    "atomic_write_text",
    "dtype_from_name",
    "dtype_name",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                     ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def dtype_from_name(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unsupported safetensors dtype {name!r}")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _NAMES:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors")
    return _NAMES[dtype]


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offset in the data section
    end: int

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _read_header(path: Path) -> tuple[bytes, dict]:
    """The raw header bytes (length prefix included) and the parsed JSON of a safetensors file."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: not a safetensors file (too short); re-save it with safetensors")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: not a safetensors file (header length {length}); re-save it with safetensors")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path}: not a safetensors file (unreadable header); re-save it with safetensors") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (header is not a JSON object)")
    return prefix + raw, header


def _parse_entries(path: Path, header: dict, data_size: int) -> dict[str, TensorInfo]:
    """Tensor entries of a header, checked against the data section's size."""
    entries = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            info = TensorInfo(name, dtype_from_name(entry["dtype"]), tuple(int(s) for s in entry["shape"]), begin, end)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: bad header entry for tensor {name!r} ({err}); re-save it with safetensors") from None
        if end - begin != info.numel * _itemsize(info.dtype) or end > data_size or begin < 0:
            raise ValueError(f"{path}: tensor {name!r} has inconsistent byte offsets; the file is truncated or corrupt")
        entries[name] = info
    return entries


class SafetensorsFile:
    """A safetensors file read lazily: headers up front, tensor bytes on demand with `pread`."""

    def __init__(self, path: str | os.PathLike):
        self._fd: int | None = None
        self.path = Path(path)
        self.header_bytes, header = _read_header(self.path)
        self.size = self.path.stat().st_size
        self.data_start = len(self.header_bytes)
        self.metadata = header.get("__metadata__") or {}
        self.entries = _parse_entries(self.path, header, self.size - self.data_start)

    def _file(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()

    def keys(self) -> list[str]:
        return list(self.entries)

    def read_flat(self, name: str, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Elements [lo, hi) of the flattened tensor, in its stored dtype: `(hi - lo,)`."""
        info = self.entries[name]
        hi = info.numel if hi is None else hi
        assert 0 <= lo <= hi <= info.numel, f"slice [{lo}, {hi}) outside tensor {name!r} of {info.numel}"
        return self._read_into(info, lo, torch.empty(hi - lo, dtype=info.dtype))

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor, in its shape and stored dtype."""
        return self.read_flat(name).reshape(self.entries[name].shape)

    def read_flat_into(self, name: str, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        """Elements [lo, hi) into the contiguous `out` (hi - lo,), converted to its dtype.

        Same dtype: the bytes are read straight into `out`, no intermediate copy.
        """
        info = self.entries[name]
        assert out.is_contiguous() and out.numel() == hi - lo, "out must be contiguous with hi - lo elements"
        if out.dtype != info.dtype:
            return out.copy_(self.read_flat(name, lo, hi))
        return self._read_into(info, lo, out)

    def _read_into(self, info: TensorInfo, lo: int, out: torch.Tensor) -> torch.Tensor:
        """One preadv of the slice's bytes straight into `out`'s memory."""
        nbytes = out.numel() * _itemsize(info.dtype)
        if nbytes == 0:
            return out
        view = memoryview(out.view(torch.uint8).numpy())
        got = os.preadv(self._file(), [view], self.data_start + info.begin + lo * _itemsize(info.dtype))
        if got != nbytes:
            raise ValueError(f"{self.path}: tensor {info.name!r} is truncated; the file is incomplete")
        return out


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: pickle checkpoints are not read (loading them can run code); "
                         "convert it to safetensors first, e.g. safetensors.torch.save_file(state_dict, 'model.safetensors')")


def _folder_files(folder: Path) -> list[Path]:
    """The safetensors files of a Hugging Face model folder, in index order."""
    index = folder / HF_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{index}: not a valid safetensors index (needs a 'weight_map'); re-save the model") from None
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    if (folder / HF_WEIGHTS).is_file():
        return [folder / HF_WEIGHTS]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"{folder}: holds only pickle weights ({', '.join(pickles)}); convert them to safetensors "
                         "first, e.g. model.save_pretrained(folder, safe_serialization=True)")
    raise ValueError(f"{folder}: no {HF_WEIGHTS} or {HF_INDEX}; pass a .safetensors file or a Hugging Face model folder")


class Checkpoint:
    """A checkpoint on disk, one file or a (sharded) model folder, read tensor by tensor."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        _refuse_pickle(self.path)
        if self.path.is_dir():
            paths = _folder_files(self.path)
        elif self.path.is_file():
            if self.path.suffix != ".safetensors":
                raise ValueError(f"{self.path}: not a .safetensors file; pass a .safetensors file or a model folder")
            paths = [self.path]
        else:
            raise ValueError(f"{self.path}: no such checkpoint; pass a .safetensors file or a model folder")
        self.files = [SafetensorsFile(p) for p in paths]
        self._where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for name in f.keys():
                if name in self._where:
                    raise ValueError(f"{f.path}: tensor {name!r} also appears in {self._where[name].path}")
                self._where[name] = f

    @property
    def is_folder(self) -> bool:
        return self.path.is_dir()

    @property
    def name(self) -> str:
        """A default task name: the file's stem or the folder's name."""
        return self.path.resolve().name if self.is_folder else self.path.stem

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def info(self, name: str) -> TensorInfo:
        return self._where[name].entries[name]

    def file_of(self, name: str) -> Path:
        return self._where[name].path

    def read_flat(self, name: str, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        return self._where[name].read_flat(name, lo, hi)

    def read(self, name: str) -> torch.Tensor:
        return self._where[name].read(name)

    def read_flat_into(self, name: str, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        return self._where[name].read_flat_into(name, lo, hi, out)

    @property
    def nbytes(self) -> int:
        return sum(f.size for f in self.files)

    def fingerprint(self) -> str:
        """sha256 over each file's name, size and header bytes (see the module docstring)."""
        digest = hashlib.sha256()
        for f in sorted(self.files, key=lambda f: f.path.name):
            digest.update(f"{f.path.name}\0{f.size}\0".encode())
            digest.update(f.header_bytes)
        return digest.hexdigest()

    def close(self) -> None:
        for f in self.files:
            f.close()


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a `.safetensors` file or a Hugging Face model folder for lazy reading."""
    return Checkpoint(path)


def load(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (file or folder), in memory."""
    checkpoint = open_checkpoint(path)
    try:
        return {name: checkpoint.read(name) for name in checkpoint.keys()}
    finally:
        checkpoint.close()


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new file in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` so a reader sees the old file or the new one, never a mix."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _header(tensors: Sequence[tuple[str, torch.dtype, Sequence[int]]], metadata: Mapping[str, str] | None) -> tuple[bytes, int]:
    """The header bytes (length prefix, JSON padded with spaces to 8 bytes) and the data size."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, dtype, shape in tensors:
        nbytes = int(torch.Size(shape).numel()) * _itemsize(dtype)
        header[name] = {"dtype": dtype_name(dtype), "shape": [int(s) for s in shape], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offset


def _as_bytes(tensor: torch.Tensor):
    """A tensor's bytes in memory order, without a copy when it is contiguous."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


class SafetensorsWriter:
    """Write one safetensors file in a stream: header first, then chunks in header order.

    The file is written as `path` + a temporary suffix; `finish()` fsyncs it and renames it to
    `path`; `abort()` removes it. The sha256 and size of the final file are kept in `sha256`/`size`.
    """

    def __init__(self, path: str | os.PathLike, tensors: Sequence[tuple[str, torch.dtype, Sequence[int]]],
                 *, metadata: Mapping[str, str] | None = None, checksum: bool = True):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + f".tmp-{os.getpid()}")
        header, self.data_size = _header(tensors, metadata)
        self._ranges = {}
        offset = 0
        for name, dtype, shape in tensors:
            end = offset + int(torch.Size(shape).numel()) * _itemsize(dtype)
            self._ranges[name] = (offset, end, dtype)
            offset = end
        self._digest = hashlib.sha256(header) if checksum else None  # the store needs it, a model output not
        self._file = open(self.tmp, "wb")
        self._file.write(header)
        self._pos = 0
        self.sha256: str | None = None
        self.size = len(header) + self.data_size

    def write(self, name: str, chunk: torch.Tensor) -> None:
        """Append the next elements of tensor `name`; chunks must come in header order."""
        begin, end, dtype = self._ranges[name]
        assert chunk.dtype == dtype, f"{name}: chunk is {chunk.dtype}, header says {dtype}"
        data = _as_bytes(chunk)
        assert begin <= self._pos and self._pos + data.nbytes <= end, f"{name}: chunk out of header order"
        self._file.write(data)
        if self._digest is not None:
            self._digest.update(data)
        self._pos += data.nbytes

    def finish(self) -> Path:
        assert self._pos == self.data_size, f"{self.path}: wrote {self._pos} of {self.data_size} data bytes"
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        self.sha256 = self._digest.hexdigest() if self._digest is not None else None
        return self.path

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.tmp.unlink(missing_ok=True)


class ShardedWriter:
    """Stream tensors into shards of at most `max_shard_size` bytes (a tensor is never split).

    `shard_names(k, n)` names shard k of n (1-based). With one shard, the name is `single`.
    Shards are opened one after the other as the tensors arrive in order.
    """

    def __init__(self, folder: str | os.PathLike, tensors: Sequence[tuple[str, torch.dtype, Sequence[int]]], *,
                 single: str, shard_name, max_shard_size: int, metadata: Mapping[str, str] | None = None,
                 checksum: bool = True):
        self.folder = Path(folder)
        groups = _split_shards(tensors, max_shard_size)
        names = [single] if len(groups) == 1 else [shard_name(k + 1, len(groups)) for k in range(len(groups))]
        self.shards = list(zip(names, groups))
        self.weight_map = {t[0]: name for name, group in self.shards for t in group}
        self.metadata, self.checksum = metadata, checksum
        self.total_size = sum(int(torch.Size(s).numel()) * _itemsize(d) for _, d, s in tensors)
        self._current = -1
        self._writer: SafetensorsWriter | None = None
        self.finished: dict[str, SafetensorsWriter] = {}

    def _advance_to(self, shard: int) -> None:
        while self._current < shard:
            if self._writer is not None:
                self._writer.finish()
            self._current += 1
            name, group = self.shards[self._current]
            self._writer = SafetensorsWriter(self.folder / name, group, metadata=self.metadata, checksum=self.checksum)
            self.finished[name] = self._writer

    def write(self, name: str, chunk: torch.Tensor) -> None:
        shard = [k for k, (file, _) in enumerate(self.shards) if file == self.weight_map[name]][0]
        self._advance_to(shard)
        self._writer.write(name, chunk)

    def finish(self) -> dict[str, SafetensorsWriter]:
        """Close every shard (empty trailing ones included); {file name: writer with sha256}."""
        self._advance_to(len(self.shards) - 1)
        self._writer.finish()
        return self.finished

    def abort(self) -> None:
        for writer in self.finished.values():
            writer.abort()


def _split_shards(tensors, max_shard_size: int) -> list[list]:
    """Greedy split in order: start a new shard when the next tensor would overflow this one."""
    groups: list[list] = [[]]
    size = 0
    for t in tensors:
        nbytes = int(torch.Size(t[2]).numel()) * _itemsize(t[1])
        if groups[-1] and size + nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += nbytes
    return groups


def save(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, *, metadata: Mapping[str, str] | None = None) -> None:
    """Write a state dict to one safetensors file, atomically (temporary name, fsync, rename)."""
    layout = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    writer = SafetensorsWriter(path, layout, metadata=metadata)
    try:
        for name, t in tensors.items():
            writer.write(name, t)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    fsync_dir(Path(path).parent)


# Files of a model folder that are weights in some format; everything else small is copied.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".pkl")
_SMALL_FILE = 64 * 1024 * 1024


def model_side_files(folder: str | os.PathLike) -> list[Path]:
    """config.json, tokenizer and processor files: every small non-weight file of a model folder."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in _WEIGHT_SUFFIXES
                  and not p.name.endswith(".index.json") and p.stat().st_size <= _SMALL_FILE)


def copy_model_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[Path]:
    """Copy a model folder's config/tokenizer/processor files so `from_pretrained` loads `dst`."""
    copied = []
    for p in model_side_files(src):
        target = Path(dst) / p.name
        shutil.copyfile(p, target)
        with open(target, "rb") as f:
            os.fsync(f.fileno())
        copied.append(target)
    return copied


def sha256_file(path: str | os.PathLike, *, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            digest.update(data)
    return digest.hexdigest()


def iter_flat_chunks(numel: int, chunk: int) -> Iterable[tuple[int, int]]:
    for lo in range(0, numel, chunk):
        yield lo, min(lo + chunk, numel)
