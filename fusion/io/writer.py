"""Streaming safetensors writing: header first, then chunks in header order, atomically.

The layout (names, dtypes, shapes) is known before any data, so the header is written first
and chunks are appended as they are computed; memory never holds a whole tensor. A file is
written under a temporary name and becomes visible under its own name only when it is
complete and fsynced (`finish`). Block checksums are computed from the bytes as they are
written (`fusion.io.integrity`), so nothing reads the file a second time to checksum it.

With `direct=True` the data goes around the page cache (O_DIRECT), through two aligned
buffers that a thread of the writer hands to the disk in turn. Copying into the page cache is
the largest CPU cost of writing a decoupled model (more than reading, checking and rebuilding
it, measured with perf on the development machine), and a model written for someone else to
load gains nothing from pushing the store and the base out of the cache. Where the filesystem
refuses direct I/O, the file is written through the page cache as usual.

Writers are context managers: leaving the block normally finishes the file, an exception
removes the temporary file. Nothing is left for a finaliser to close.
"""

from __future__ import annotations

import errno
import fcntl
import os
import queue
import threading
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..dtypes import DType, dtype_of
from ..errors import InputError, InvariantError
from .files import fsync_dir, naming_full_disk, start_writeback, temporary_name
from .format import LayoutEntry, TensorInfo, encode_header, numel
from .integrity import DEFAULT_BLOCK, BlockHasher, FileDigests

__all__ = ["SafetensorsWriter", "ShardedWriter", "save", "as_storage"]

# Hand written data to the disk every 1 MiB, so the final fsync waits for little. Small files
# count: a pass writes one trigger file per task beside the unified delta (8 MiB each for 64M
# parameters), and with a larger step none of them reached the disk before its fsync.
_WRITEBACK_BYTES = 1 << 20
# Direct writes: buffer addresses, file offsets and lengths are multiples of _ALIGN (the page
# size, which covers the logical block sizes of disks in use). Two buffers: the caller fills one
# while the disk takes the other; 8 MiB is two of the disk queue's largest requests here.
_ALIGN = 4096
_STAGE_BYTES = 8 << 20


def as_storage(array: np.ndarray, dtype: DType, where: str) -> np.ndarray:
    """The array's bytes as `dtype`'s storage (bfloat16 as uint16), refusing another dtype."""
    if dtype_of(array) is not dtype and array.dtype != dtype.storage:
        raise InputError(f"{where}: got {array.dtype} data for a {dtype.name} tensor; convert it first")
    return np.ascontiguousarray(array).reshape(-1).view(dtype.storage)


def _open_for_writing(path: Path, direct: bool) -> tuple[int, bool]:
    """A new file's descriptor, and whether it writes around the page cache."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o666), True
        except OSError as err:
            if err.errno != errno.EINVAL:  # EINVAL: this filesystem takes no direct I/O
                raise
    return os.open(path, flags, 0o666), False


def _write_all(fd: int, view: memoryview, offset: int, path: Path) -> None:
    """All of `view` at `offset`; an error names `path` (a full disk says so, and how much it was writing)."""
    try:
        with naming_full_disk(path, len(view)):
            while view:  # a write may take fewer bytes than given
                got = os.pwrite(fd, view, offset)
                view, offset = view[got:], offset + got
    except OSError as err:
        if err.filename is None and not str(err).startswith(f"{path}:"):
            raise OSError(err.errno, f"{path}: {err.strerror}") from err
        raise


class _BufferedSink:
    """Writes through the page cache, starting the disk on every MiB as it goes."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path
        self._written = self._flushed = 0  # bytes of the file written, and handed to the disk
        self._scratch = np.empty(0, dtype=np.uint8)  # what `reserve` lends

    def write(self, view: memoryview) -> None:
        _write_all(self.fd, view, self._written, self.path)
        self._written += len(view)
        if self._written - self._flushed >= _WRITEBACK_BYTES:
            start_writeback(self.fd, self._flushed, self._written - self._flushed)
            self._flushed = self._written

    def reserve(self, nbytes: int) -> np.ndarray:
        if self._scratch.size < nbytes:
            self._scratch = np.empty(nbytes, dtype=np.uint8)
        return self._scratch[:nbytes]

    def commit(self, nbytes: int) -> memoryview:
        view = memoryview(self._scratch[:nbytes])
        self.write(view)
        return view

    def finish(self, size: int) -> None:
        os.fsync(self.fd)

    def stop(self) -> None:
        pass


def _aligned_buffer(nbytes: int) -> np.ndarray:
    raw = np.empty(nbytes + _ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start : start + nbytes]


class _DirectSink:
    """Writes around the page cache from two aligned buffers in turn: the caller fills one (in
    place, through `reserve` and `commit`, or by copying) while a thread writes the other's whole
    blocks at their aligned offset; the bytes past the last whole block start the next buffer.
    The last buffer is padded to a whole block and the file cut back to its size. If the first
    write says the filesystem takes no direct I/O (EINVAL), the descriptor drops O_DIRECT and
    every write goes through the page cache; the bytes are the same either way."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path
        self.direct = True  # until the filesystem refuses it
        self._free: queue.Queue = queue.Queue()
        self._full: queue.Queue = queue.Queue()
        for _ in range(2):
            self._free.put(_aligned_buffer(_STAGE_BYTES))
        self._stage, self._filled, self._offset = self._free.get(), 0, 0  # offset: where _stage goes
        self._error: BaseException | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="condu-direct-writer", daemon=True)
        self._thread.start()

    def reserve(self, nbytes: int) -> np.ndarray:
        """The file's next `nbytes`, in the buffer: fill them, then `commit`."""
        if self._filled + nbytes > self._stage.size:
            self._hand_off()
        if self._filled + nbytes > self._stage.size:  # more than a buffer holds: a larger one
            larger = _aligned_buffer(-(-(self._filled + nbytes) // _ALIGN) * _ALIGN)
            larger[: self._filled] = self._stage[: self._filled]
            self._stage = larger
        return self._stage[self._filled : self._filled + nbytes]

    def commit(self, nbytes: int) -> memoryview:
        view = memoryview(self._stage[self._filled : self._filled + nbytes])
        self._filled += nbytes
        return view

    def write(self, view: memoryview) -> None:
        while view:
            take = min(len(view), _STAGE_BYTES // 2)
            self.reserve(take)[:] = np.frombuffer(view[:take], dtype=np.uint8)
            self.commit(take)
            view = view[take:]

    def _hand_off(self, *, last: bool = False) -> None:
        """The buffer's whole blocks (all of it if `last`) to the writing thread; the rest starts the next."""
        if self._error is not None:
            raise self._error
        nbytes = self._filled if last else self._filled // _ALIGN * _ALIGN
        if not nbytes:
            return
        following = self._free.get() if not last else None
        if following is not None:
            tail = self._filled - nbytes  # under one block
            following[:tail] = self._stage[nbytes : self._filled]
        self._full.put((self._stage, self._offset, nbytes))
        self._offset += nbytes
        if following is not None:
            self._stage, self._filled = following, tail

    def _run(self) -> None:
        while (item := self._full.get()) is not None:
            stage, offset, nbytes = item
            try:
                if self._error is None and not self._stopped:
                    self._write_stage(stage, offset, nbytes)
            except BaseException as error:  # raised in the caller's thread at its next hand-off or finish
                self._error = error
            self._free.put(stage)

    def _write_stage(self, stage: np.ndarray, offset: int, nbytes: int) -> None:
        padded = -(-nbytes // _ALIGN) * _ALIGN if self.direct else nbytes
        stage[nbytes:padded] = 0  # past the end of the file (only the last buffer): cut off in finish
        try:
            _write_all(self.fd, memoryview(stage[:padded]), offset, self.path)
        except OSError as err:
            if not (err.errno == errno.EINVAL and self.direct and offset == 0):
                raise
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            self.direct = False
            _write_all(self.fd, memoryview(stage[:nbytes]), offset, self.path)
        if not self.direct:
            start_writeback(self.fd, offset, nbytes)

    def _drain(self) -> None:
        self._full.put(None)
        self._thread.join()

    def finish(self, size: int) -> None:
        self._hand_off(last=True)
        self._drain()
        if self._error is not None:
            raise self._error
        os.ftruncate(self.fd, size)  # the last block's padding
        os.fsync(self.fd)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._stopped = True
            self._drain()


def _check_in_order(name: str, info: TensorInfo, pos: int, nbytes: int) -> None:
    """A chunk lands inside its own tensor's bytes, after what was written: the header stays true."""
    if not (info.begin <= pos and pos + nbytes <= info.end):
        raise InvariantError(f"{name}: chunk of {nbytes} bytes at {pos} out of header order [{info.begin}, {info.end})")


class SafetensorsWriter:
    """Write one safetensors file in a stream, under a temporary name until `finish()`.

    `checksums=False` skips the block digests (a decoupled model for a user needs none);
    `direct=True` writes around the page cache (see the module's notes).
    After `finish()`, `digests` holds the file's block checksums and `size` its size.
    """

    def __init__(self, path: str | os.PathLike, layout: Sequence[LayoutEntry], *,
                 metadata: Mapping[str, str] | None = None, checksums: bool = True, block: int = DEFAULT_BLOCK,
                 direct: bool = False):
        self.path = Path(path)
        self.tmp = temporary_name(self.path)
        header, self.entries = encode_header(layout, metadata)
        self.size = len(header) + sum(e.nbytes for e in self.entries.values())
        self._data_start = len(header)
        self._hasher = BlockHasher(block) if checksums else None
        self.digests: FileDigests | None = None
        self._fd, direct = _open_for_writing(self.tmp, direct)
        self._closed = False
        self._sink = _DirectSink(self._fd, self.path) if direct else _BufferedSink(self._fd, self.path)
        self._pos = 0  # bytes of the data section written so far
        try:
            self._write(header)
        except BaseException:
            self.abort()
            raise

    def _write(self, data) -> None:
        view = memoryview(data).cast("B")
        self._sink.write(view)
        if self._hasher is not None:
            self._hasher.update(view)

    def write(self, name: str, chunk: np.ndarray) -> None:
        """Append the next elements of tensor `name`; chunks come in header order."""
        info = self.entries[name]
        data = as_storage(chunk, info.dtype, f"{self.path}: tensor {name!r}")
        _check_in_order(name, info, self._pos, data.nbytes)
        self._write(memoryview(data).cast("B"))
        self._pos += data.nbytes

    def reserve(self, name: str, count: int) -> np.ndarray:
        """Room for the next `count` elements of tensor `name`, in its dtype's storage, to be filled
        in place and then `commit`ted: a direct writer's own buffer, so nothing is copied again."""
        info = self.entries[name]
        nbytes = count * info.dtype.itemsize
        _check_in_order(name, info, self._pos, nbytes)
        return self._sink.reserve(nbytes).view(info.dtype.storage)

    def commit(self, name: str, count: int) -> None:
        """The `count` elements given by `reserve` are filled: they are the file's next bytes."""
        view = self._sink.commit(count * self.entries[name].dtype.itemsize)
        if self._hasher is not None:
            self._hasher.update(view)
        self._pos += len(view)

    def finish(self) -> Path:
        """fsync the file and give it its name; the folder's entry is made durable by the caller."""
        if self._data_start + self._pos != self.size:  # a short file must never get its final name
            raise InvariantError(f"{self.path}: wrote {self._pos} data bytes of {self.size - self._data_start}")
        try:
            self._sink.finish(self.size)
        except BaseException:
            self.abort()
            raise
        self._close()
        os.replace(self.tmp, self.path)
        if self._hasher is not None:
            self.digests = self._hasher.finish()
        return self.path

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)

    def abort(self) -> None:
        self._sink.stop()
        self._close()
        self.tmp.unlink(missing_ok=True)

    @property
    def finished(self) -> bool:
        return self._closed and not self.tmp.exists()

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

    def reserve(self, name: str, count: int) -> np.ndarray:
        return self._advance_to(self._shard_of[name]).reserve(name, count)

    def commit(self, name: str, count: int) -> None:
        self.writers[self.shards[self._shard_of[name]][0]].commit(name, count)

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
