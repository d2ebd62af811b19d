"""Small files and durability: temporary names, fsync, atomic text, a model folder's side files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["temporary_name", "fsync_dir", "start_writeback", "atomic_write", "atomic_write_bytes", "atomic_write_text",
           "model_side_files",
           "copy_file_durably", "WEIGHT_SUFFIXES", "SMALL_FILE_BYTES"]

# Files of a model folder that are weights in some format; small files besides them are its side files.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".pkl")
SMALL_FILE_BYTES = 64 * 1024 * 1024


def temporary_name(path: Path) -> Path:
    """Where `path` is written before it is complete: same folder, so the rename is atomic."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def _sync_file_range():
    """libc's sync_file_range (Linux), or None where there is none."""
    try:
        import ctypes

        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing [offset, offset+nbytes) to disk now, without waiting for it.

    A file written in a stream and fsynced at the end otherwise waits at the end for all of it;
    started early, the disk works while the rest is computed. Where the call does not exist
    (not Linux), the final fsync does all the work, as before.
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new file in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so a reader sees the old file or the new one, never a mix."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write(path: str | os.PathLike, data: bytes | str | dict[str, bytes | str]) -> Path:
    """Write a file (bytes, or text as UTF-8), or a whole folder ({file name: content}), so a reader
    sees the old content or the new, never a mix, and a crash after the return loses nothing: the
    files are fsynced, renamed into place, and the folder that holds them fsynced.

    A folder is written under a temporary name and renamed whole, so one that exists is complete;
    it must not exist yet (`path`'s parent must). Returns `path`."""
    path = Path(path)
    if isinstance(data, (bytes, bytearray, memoryview, str)):
        atomic_write_bytes(path, data.encode("utf-8") if isinstance(data, str) else bytes(data))
        return path
    _atomic_folder(path, data)
    return path


def _atomic_folder(path: Path, files: dict[str, bytes | str]) -> None:
    import shutil  # here, not at the top: only folder writes need it

    if path.exists():
        raise FileExistsError(f"{path}: exists; a folder is written whole, under a name not taken yet")
    for name in files:
        if name in ("", ".", "..") or Path(name).name != name:
            raise ValueError(f"{path}: {name!r} is not a file name; give the folder's files plain names")
    tmp = temporary_name(path)
    shutil.rmtree(tmp, ignore_errors=True)  # a crashed attempt's leftovers
    tmp.mkdir()
    try:
        for name, content in files.items():
            atomic_write_bytes(tmp / name, content.encode("utf-8") if isinstance(content, str) else bytes(content))
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


def model_side_files(folder: str | os.PathLike) -> list[Path]:
    """config.json, tokenizer and processor files: every small non-weight file of a model folder."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in WEIGHT_SUFFIXES
                  and not p.name.endswith(".index.json") and p.stat().st_size <= SMALL_FILE_BYTES)


def copy_file_durably(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy a file and fsync the copy (its folder is made durable by the caller)."""
    shutil.copyfile(src, dst)
    with open(dst, "rb") as f:
        os.fsync(f.fileno())
    return Path(dst)
