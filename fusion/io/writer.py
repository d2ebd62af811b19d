"""Streaming safetensors writing: header first, then chunks in header order, atomically.

The layout (names, dtypes, shapes) is known before any data, so the header is written first
and chunks are appended as they are computed; memory never holds a whole tensor. A file is
written under a temporary name and becomes visible under its own name only when it is
complete and fsynced (`finish`). Block checksums are computed from the bytes as they are
written (`fusion.io.integrity`), so nothing reads the file a second time to checksum it.

Writers are context managers: leaving the block normally finishes the file, an exception
removes the temporary file. Nothing is left for a finaliser to close.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..dtypes import DType, dtype_of
from .files import fsync_dir, start_writeback, temporary_name
from .format import LayoutEntry, encode_header, numel
from .integrity import DEFAULT_BLOCK, BlockHasher, FileDigests

__all__ = ["SafetensorsWriter", "ShardedWriter", "save", "as_storage"]

# Hand written data to the disk every 1 MiB, so the final fsync waits for little. Small files
# count: a pass writes one trigger file per task beside the unified delta (8 MiB each for 64M
# parameters), and with a larger step none of them reached the disk before its fsync.
_WRITEBACK_BYTES = 1 << 20


def as_storage(array: np.ndarray, dtype: DType, where: str) -> np.ndarray:
    """The array's bytes as `dtype`'s storage (bfloat16 as uint16), refusing another dtype."""
    if dtype_of(array) is not dtype and array.dtype != dtype.storage:
        raise ValueError(f"{where}: got {array.dtype} data for a {dtype.name} tensor; convert it first")
    return np.ascontiguousarray(array).reshape(-1).view(dtype.storage)


class SafetensorsWriter:
    """Write one safetensors file in a stream, under a temporary name until `finish()`.

    `checksums=False` skips the block digests (a decoupled model for a user needs none).
    After `finish()`, `digests` holds the file's block checksums and `size` its size.
    """

    def __init__(self, path: str | os.PathLike, layout: Sequence[LayoutEntry], *,
                 metadata: Mapping[str, str] | None = None, checksums: bool = True, block: int = DEFAULT_BLOCK):
        self.path = Path(path)
        self.tmp = temporary_name(self.path)
        header, self.entries = encode_header(layout, metadata)
        self.size = len(header) + sum(e.nbytes for e in self.entries.values())
        self._data_start = len(header)
        self._hasher = BlockHasher(block) if checksums else None
        self.digests: FileDigests | None = None
        self._file = open(self.tmp, "wb", buffering=0)  # chunks are large: no second buffer
        self._pos = 0  # bytes of the data section written so far
        self._written = self._flushed = 0  # bytes of the file written, and handed to the disk
        self._write(header)

    def _write(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:  # a raw file may take fewer bytes than given
            view = view[self._file.write(view):]
        if self._hasher is not None:
            self._hasher.update(data)
        self._written += memoryview(data).nbytes
        if self._written - self._flushed >= _WRITEBACK_BYTES:
            start_writeback(self._file.fileno(), self._flushed, self._written - self._flushed)
            self._flushed = self._written

    def write(self, name: str, chunk: np.ndarray) -> None:
        """Append the next elements of tensor `name`; chunks come in header order."""
        info = self.entries[name]
        data = as_storage(chunk, info.dtype, f"{self.path}: tensor {name!r}")
        assert info.begin <= self._pos and self._pos + data.nbytes <= info.end, f"{name}: chunk out of header order"
        self._write(memoryview(data).cast("B"))
        self._pos += data.nbytes

    def finish(self) -> Path:
        """fsync the file and give it its name; the folder's entry is made durable by the caller."""
        assert self._data_start + self._pos == self.size, f"{self.path}: wrote {self._pos} data bytes of {self.size - self._data_start}"
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        if self._hasher is not None:
            self.digests = self._hasher.finish()
        return self.path

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.tmp.unlink(missing_ok=True)

    @property
    def finished(self) -> bool:
        return self._file.closed and not self.tmp.exists()

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, kind, *exc) -> None:
        if kind is not None:
            self.abort()
        elif not self.finished:
            self.finish()


def _split_shards(layout: Sequence[LayoutEntry], max_shard_size: int) -> list[list[LayoutEntry]]:
    """Greedy split in order: a new shard starts when the next tensor would overflow this one."""
    groups: list[list[LayoutEntry]] = [[]]
    size = 0
    for entry in layout:
        nbytes = numel(entry[2]) * entry[1].itemsize
        if groups[-1] and size + nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += nbytes
    return groups


class ShardedWriter:
    """Stream tensors into shards of at most `max_shard_size` bytes (a tensor is never split).

    `shard_name(k, n)` names shard k of n (1-based); with one shard its name is `single`.
    Shards are written one after the other as the tensors arrive in layout order.
    """

    def __init__(self, folder: str | os.PathLike, layout: Sequence[LayoutEntry], *, single: str,
                 shard_name: Callable[[int, int], str], max_shard_size: int, **options):
        self.folder = Path(folder)
        groups = _split_shards(layout, max_shard_size)
        names = [single] if len(groups) == 1 else [shard_name(k + 1, len(groups)) for k in range(len(groups))]
        self.shards = list(zip(names, groups))
        self.weight_map = {entry[0]: name for name, group in self.shards for entry in group}
        self._shard_of = {name: k for k, (_, group) in enumerate(self.shards) for name, _, _ in group}
        self.total_size = sum(numel(shape) * dtype.itemsize for _, dtype, shape in layout)
        self._options = options
        self.writers: dict[str, SafetensorsWriter] = {}
        self._current = -1

    def _advance_to(self, shard: int) -> SafetensorsWriter:
        while self._current < shard:
            if self._current >= 0:
                self.writers[self.shards[self._current][0]].finish()
            self._current += 1
            name, group = self.shards[self._current]
            self.writers[name] = SafetensorsWriter(self.folder / name, group, **self._options)
        return self.writers[self.shards[shard][0]]

    def write(self, name: str, chunk: np.ndarray) -> None:
        self._advance_to(self._shard_of[name]).write(name, chunk)

    def finish(self) -> dict[str, SafetensorsWriter]:
        """Finish every shard (empty trailing ones included); {file name: finished writer}."""
        self._advance_to(len(self.shards) - 1).finish()
        return dict(self.writers)

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, kind, *exc) -> None:
        if kind is not None:
            self.abort()
        elif self._current < len(self.shards) - 1 or not self.writers[self.shards[-1][0]].finished:
            self.finish()


def save(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, *, metadata: Mapping[str, str] | None = None) -> None:
    """Write numpy arrays (bfloat16 as `ml_dtypes.bfloat16`) to one safetensors file, atomically."""
    layout = [(name, dtype_of(array), array.shape) for name, array in tensors.items()]
    with SafetensorsWriter(path, layout, metadata=metadata, checksums=False) as writer:
        for name, array in tensors.items():
            writer.write(name, array)
    fsync_dir(Path(path).parent)
