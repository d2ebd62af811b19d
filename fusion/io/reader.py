"""Lazy safetensors reading, slice by slice, optionally checked against block checksums.

A flat slice `[lo, hi)` of a tensor is one `preadv` of its bytes, so memory is bounded by the
slice, never by the tensor or the file. Files are opened (and their headers parsed strictly,
`fusion.io.format`) when the reader is made; a reader is a context manager that closes them.

Checked reads. Given a file's `FileDigests`, a reader returns only bytes it has verified: it
reads whole blocks into a window, hashes each block once as it arrives, and hands out views of
the window. Sequential reads (the store's passes) load each block once: the block a read ends
in is carried over to the next window. In `record` mode (no digests known yet) the same
machinery computes the digests of what it reads, for the store to keep, and reads the blocks a
caller never asked for at the end. A reader's buffers are reused, two in turn: a view it returns
is valid until the second read after it on the same file, so a reader one chunk ahead of its
consumer never overwrites what is being consumed. One file is read by one thread at a time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from ..dtypes import to_float32
from ..errors import InputError
from .format import PREFIX_BYTES, TensorInfo, header_length, parse_header
from .integrity import DEFAULT_BLOCK, FileDigests, IntegrityError, block_digest

__all__ = ["SafetensorsFile", "read_exactly"]


def read_exactly(fd: int, buffer: np.ndarray, offset: int, where: str) -> np.ndarray:
    """Fill `buffer` (any contiguous array) with the file's bytes from `offset`."""
    view = memoryview(buffer.reshape(-1).view(np.uint8))
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise InputError(f"{where}: the file ends early (truncated at byte {offset + done}); restore or re-save it")
        done += got
    return buffer


class _Window:
    """A run of verified whole blocks of one file, kept while reads stay inside it.

    Loads alternate between two buffers, so a view survives the next load and dies with the one
    after: a reader one chunk ahead of its consumer never overwrites what is being consumed.
    """

    def __init__(self, fd: int, size: int, where: str, block: int, digests: FileDigests | None,
                 record: dict[int, str] | None):
        self.fd, self.size, self.where, self.block, self.digests, self.record = fd, size, where, block, digests, record
        self.buffers = [np.empty(0, dtype=np.uint8), np.empty(0, dtype=np.uint8)]
        self.buffer = self.buffers[0]  # the current one
        self.first, self.count = 0, 0  # block index of buffer[0], blocks held

    def bytes(self, begin: int, end: int) -> np.ndarray:
        """Verified bytes [begin, end) of the file, a view valid until the second load after it."""
        if end <= begin:
            return self.buffer[:0]
        first, last = begin // self.block, (end - 1) // self.block
        if not (self.first <= first and last < self.first + self.count):
            self._load(first, last)
        start = begin - self.first * self.block
        return self.buffer[start : start + end - begin]

    def _load(self, first: int, last: int) -> None:
        need = (last - first + 1) * self.block
        spare = 1 if self.buffer is self.buffers[0] else 0
        if self.buffers[spare].size < need:
            self.buffers[spare] = np.empty(need, dtype=np.uint8)
        buffer = self.buffers[spare]
        kept = self._carry(first, last, buffer)  # blocks of the old window the new one starts with
        begin = (first + kept) * self.block
        end = min((last + 1) * self.block, self.size)
        if end > begin:
            read_exactly(self.fd, buffer[begin - first * self.block : end - first * self.block], begin, self.where)
        self.buffer, self.first, self.count = buffer, first, last - first + 1
        for index in range(first + kept, last + 1):
            self._check(index, buffer[(index - first) * self.block : (index - first + 1) * self.block])

    def _carry(self, first: int, last: int, buffer: np.ndarray) -> int:
        """Move the old window's verified blocks [first, ...) to the front of `buffer`."""
        if not (self.count and self.first <= first < self.first + self.count):
            return 0
        kept = min(self.first + self.count, last + 1) - first
        start = (first - self.first) * self.block
        buffer[: kept * self.block] = self.buffer[start : start + kept * self.block]
        return kept

    def _check(self, index: int, data: np.ndarray) -> None:
        begin, end = index * self.block, min((index + 1) * self.block, self.size)
        digest = block_digest(data[: end - begin])
        if self.digests is not None:
            expected = self.digests.of(index) if index < self.digests.num_blocks else None
            if digest != expected:
                raise IntegrityError(f"{self.where}: bytes {begin}..{end} do not match their checksum "
                                     "(the file is damaged or was changed)")
        elif self.record.setdefault(index, digest) != digest:
            raise IntegrityError(f"{self.where}: bytes {begin}..{end} changed while they were being read; "
                                 "leave the file alone while it is read")


class SafetensorsFile:
    """One safetensors file, read lazily; checked against `digests`, or recording them (`record=True`).

    `where` names the file in error messages (default: its path); the store passes the file and
    the task it belongs to.
    """

    def __init__(self, path: str | os.PathLike, *, digests: FileDigests | None = None, record: bool = False,
                 where: str | None = None, block: int = DEFAULT_BLOCK):
        self.path = Path(path)
        self.where = where or str(self.path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self.size = os.fstat(self._fd).st_size
            if digests is not None and digests.size != self.size:
                raise IntegrityError(f"{self.where}: {self.size} bytes, but its checksums are for {digests.size} "
                                     "(the file was truncated, extended or replaced)")
            self._recorded: dict[int, str] | None = {} if record and digests is None else None
            checked = digests is not None or self._recorded is not None
            block = digests.block if digests is not None else block
            self._window = _Window(self._fd, self.size, self.where, block, digests, self._recorded) if checked else None
            self._scratch, self._turn = [np.empty(0, dtype=np.uint8), np.empty(0, dtype=np.uint8)], 0
            self._read_header()
        except BaseException:
            os.close(self._fd)
            raise

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- header ------------------------------------------------------------------------------

    def _raw(self, begin: int, end: int) -> np.ndarray:
        """Bytes [begin, end) of the file: verified when checked, else a fresh read."""
        if self._window is not None:
            return self._window.bytes(begin, end)
        return read_exactly(self._fd, np.empty(end - begin, dtype=np.uint8), begin, self.where)

    def _raw_bytes(self, begin: int, end: int) -> bytes:
        """Bytes [begin, end) of the file as one bytes object: verified when checked, else read
        straight into it (a header may be 100 MiB: it is never held twice while it is parsed)."""
        if self._window is not None:
            return self._window.bytes(begin, end).tobytes()
        data = os.pread(self._fd, end - begin, begin)
        return data if len(data) == end - begin else self._raw(begin, end).tobytes()  # short: read_exactly says why

    def _read_header(self) -> None:
        prefix = self._raw_bytes(0, min(PREFIX_BYTES, self.size))
        length = header_length(prefix, file_size=self.size, where=self.where)
        raw = self._raw_bytes(PREFIX_BYTES, PREFIX_BYTES + length)
        self.data_start = PREFIX_BYTES + length
        self.entries, self.metadata = parse_header(raw, data_size=self.size - self.data_start, where=self.where)
        self.header_bytes = prefix + raw  # the fingerprint's input, kept once the header is accepted

    def keys(self) -> list[str]:
        return list(self.entries)

    def info(self, name: str) -> TensorInfo:
        return self.entries[name]

    # -- data --------------------------------------------------------------------------------

    def _span(self, name: str, lo: int, hi: int | None) -> tuple[TensorInfo, int, int]:
        info = self.entries[name]
        hi = info.numel if hi is None else hi
        if not 0 <= lo <= hi <= info.numel:
            raise InputError(f"slice [{lo}, {hi}) outside tensor {name!r} of {info.numel}")
        size = info.dtype.itemsize
        return info, self.data_start + info.begin + lo * size, self.data_start + info.begin + hi * size

    def view_flat(self, name: str, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Elements [lo, hi) in the stored dtype's storage: a read-only view, valid until the second
        read after it on this file."""
        info, begin, end = self._span(name, lo, hi)
        if self._window is not None:
            raw = self._window.bytes(begin, end)
        else:  # two scratch buffers in turn, as the window's: a view outlives the next read
            self._turn = 1 - self._turn
            if self._scratch[self._turn].size < end - begin:
                self._scratch[self._turn] = np.empty(end - begin, dtype=np.uint8)
            raw = read_exactly(self._fd, self._scratch[self._turn][: end - begin], begin, self.where)
        view = raw.view(info.dtype.storage)
        view.flags.writeable = False
        return view

    def read_flat(self, name: str, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Elements [lo, hi) in the stored dtype's storage, a new array."""
        info, begin, end = self._span(name, lo, hi)
        out = np.empty((end - begin) // info.dtype.itemsize, dtype=info.dtype.storage)
        return self.read_flat_into(name, lo, lo + out.size, out)

    def read(self, name: str) -> np.ndarray:
        """The whole tensor in its shape, in the stored dtype's storage (bfloat16 as uint16 bits)."""
        return self.read_flat(name).reshape(self.entries[name].shape)

    def read_flat_into(self, name: str, lo: int, hi: int, out: np.ndarray) -> np.ndarray:
        """Elements [lo, hi) into `out` (contiguous, hi - lo elements): the stored dtype's storage
        as is, or float32 converted from any float dtype. Unchecked same-dtype reads go straight
        into `out`, without an intermediate copy."""
        info = self.entries[name]
        if not (out.flags.c_contiguous and out.size == hi - lo):
            raise InputError("out must be contiguous with hi - lo elements")
        same = out.dtype == info.dtype.storage
        if not same and not (out.dtype == np.float32 and info.dtype.is_float):
            raise InputError(f"{self.where}: tensor {name!r} is {info.dtype.name}; it cannot be read as {out.dtype}")
        if same and self._window is None:
            _, begin, _ = self._span(name, lo, hi)
            return read_exactly(self._fd, out, begin, self.where)
        raw = self.view_flat(name, lo, hi)
        if same:
            out[...] = raw
            return out
        return to_float32(raw, info.dtype, out=out)

    # -- recording ---------------------------------------------------------------------------

    def recorded(self) -> FileDigests:
        """The digests of every block (record mode): blocks never read are read now."""
        if self._recorded is None:
            raise InputError("recorded() needs a reader made with record=True")
        window = self._window
        for index in range(-(-self.size // window.block)):
            if index not in self._recorded:
                window.bytes(index * window.block, min((index + 1) * window.block, self.size))
        hexes = "".join(self._recorded[i] for i in range(-(-self.size // window.block)))
        return FileDigests(self.size, window.block, hexes)


def open_files(paths: Mapping[str, Path], **options) -> dict[str, SafetensorsFile]:
    """Open several files; if one fails, the ones already open are closed."""
    opened: dict[str, SafetensorsFile] = {}
    try:
        for key, path in paths.items():
            opened[key] = SafetensorsFile(path, **options)
    except BaseException:
        for f in opened.values():
            f.close()
        raise
    return opened
