"""Small files and durability: temporary names, fsync, atomic text, a model folder's side files.

Files of an input folder (a model folder, an adapter folder, a hub snapshot) are read as the
trust boundary says: a link that leaves the folder is refused (in a hub cache snapshot, links
must lead into that repository's `blobs/`), so is anything that is not a regular file, and a
side file larger than SIDE_FILE_BYTES. Files are checked as opened (fstat, and where the opened
file really is), not by path before the open, so a link swapped in between is caught too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path
from typing import Iterator, NamedTuple

from ..errors import InputError

__all__ = ["temporary_name", "fsync_dir", "start_writeback", "atomic_write", "atomic_write_bytes", "atomic_write_text",
           "model_side_files",
           "copy_file_durably", "WEIGHT_SUFFIXES", "SIDE_FILE_BYTES", "input_roots", "check_inside", "open_input",
           "check_opened", "read_side_file", "SideFile", "stored_mode", "disk_full", "naming_full_disk"]

# Files of a model folder that are weights in some format; small files besides them are its side files.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".pkl")
SIDE_FILE_BYTES = 50 * 1024 * 1024  # configs and tokenizers are far smaller; anything larger is not one
_PSEUDO = (Path("/proc"), Path("/sys"), Path("/dev"))  # files there are not files of a model, whatever fstat says
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a FIFO put in place of a file must not block the open
_FULL = (errno.ENOSPC, errno.EDQUOT)


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


# ---- a full disk, named -------------------------------------------------------------------


class _NamedFull(OSError):
    """A full disk, already named: an outer naming_full_disk leaves it as it is."""


def disk_full(err: OSError, path: str | os.PathLike, needed: int | None = None) -> OSError:
    """`err` (ENOSPC or EDQUOT) as an OSError whose one line names the file and the space it needed."""
    what = "no space left on the device" if err.errno == errno.ENOSPC else "disk quota exceeded"
    size = f" (writing {needed} bytes)" if needed is not None else ""
    return _NamedFull(err.errno, f"{path}: {what}{size}; free space there or write elsewhere")


@contextlib.contextmanager
def naming_full_disk(path: str | os.PathLike, needed: int | None = None) -> Iterator[None]:
    """Writes in this block that find the disk full raise disk_full(...) naming `path`; other
    errors pass as they are."""
    try:
        yield
    except _NamedFull:
        raise
    except OSError as err:
        if err.errno in _FULL:
            raise disk_full(err, path, needed) from None
        raise


def _write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:  # a write may take fewer bytes than given
        view = view[os.write(fd, view):]


def _create(path: Path, mode: int) -> int:
    """A new file at `path` with permissions `mode` (less the umask); an existing one, or a link
    put there, is removed first rather than written through."""
    path.unlink(missing_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, mode)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, mode: int = 0o666) -> None:
    """Write `data` to `path` so a reader sees the old file or the new one, never a mix.
    `mode`: the new file's permissions, less the umask (a copied file's: stored_mode)."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with naming_full_disk(path, len(data)):
            fd = _create(tmp, mode)
            try:
                _write_fd(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
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
            raise InputError(f"{path}: {name!r} is not a file name; give the folder's files plain names")
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


# ---- files of an input folder ----------------------------------------------------------------


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def input_roots(folder: str | os.PathLike) -> tuple[Path, ...]:
    """Where the files of input folder `folder` may really be: inside it, and for a hub cache
    snapshot (.../models--org--name/snapshots/<commit>/) inside that repository's blobs/."""
    real = Path(os.path.realpath(folder))
    repo = real.parent.parent
    if real.parent.name == "snapshots" and repo.name.startswith(("models--", "datasets--", "spaces--")):
        return real, Path(os.path.realpath(repo / "blobs"))
    return (real,)


def _outside(path: Path, real: str, roots: tuple[Path, ...]) -> InputError:
    where = "its hub cache repository's blobs/" if len(roots) > 1 else "its folder"
    return InputError(f"{path}: a link to {real}, outside {where}; copy the file into the folder instead of "
                      "linking it")


def check_inside(path: str | os.PathLike, folder: str | os.PathLike | None = None) -> Path:
    """`path`'s real location, refused in one line when a link takes it out of `folder` (default:
    its parent; see input_roots) or onto a pseudo file system such as /proc."""
    path = Path(path)
    roots = input_roots(path.parent if folder is None else folder)
    real = Path(os.path.realpath(path))
    if not _inside(real, roots):
        raise _outside(path, str(real), roots)
    if _inside(real, _PSEUDO):
        raise InputError(f"{path}: leads to {real}, not a file of a model; copy the file into the folder")
    return real


def _opened_at(fd: int, real: Path) -> str:
    """Where the file open as `fd` really is (Linux: /proc/self/fd), or `real` where that is not known."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        st = os.fstat(fd)
        try:
            same = os.stat(real, follow_symlinks=False)
        except OSError:
            return ""
        return str(real) if (same.st_dev, same.st_ino) == (st.st_dev, st.st_ino) else ""


def open_input(path: str | os.PathLike, *, folder: str | os.PathLike | None = None, limit: int | None = None) -> int:
    """A read-only descriptor of a regular file of an input folder (check_inside's rules), checked
    as opened: a regular file, of at most `limit` bytes, really inside the folder."""
    path = Path(path)
    real = check_inside(path, folder)
    try:
        fd = os.open(real, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC)
    except OSError as err:
        if err.errno == errno.ELOOP:  # the resolved path became a link since it was resolved
            raise InputError(f"{path}: changed into a link while it was opened; leave the folder alone while "
                             "it is read") from None
        raise
    try:
        check_opened(fd, path, folder=folder, limit=limit)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_opened(fd: int, path: str | os.PathLike, *, folder: str | os.PathLike | None = None,
                 limit: int | None = None) -> None:
    """The file open as `fd` (opened from `path`) is a regular file of at most `limit` bytes, really
    inside `folder` (default: path's parent; see input_roots): one line otherwise."""
    path = Path(path)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: not a regular file (a FIFO, device or socket); put the file itself there")
    if limit is not None and st.st_size > limit:
        raise InputError(f"{path}: {st.st_size} bytes, more than the {limit} a side file may have; move it out "
                         "of the folder")
    roots = input_roots(path.parent if folder is None else folder)
    at = _opened_at(fd, Path(os.path.realpath(path)))  # a folder on the way may have been swapped for a link
    if not at or not _inside(Path(at), roots) or _inside(Path(at), _PSEUDO):
        raise _outside(path, at or "another file", roots)


class SideFile(NamedTuple):
    data: bytes
    mode: int  # the source's permission bits


def read_side_file(path: str | os.PathLike, *, folder: str | os.PathLike | None = None,
                   limit: int = SIDE_FILE_BYTES) -> SideFile:
    """A side file's bytes and permissions, read through open_input's checks, at most `limit` bytes
    (a file that grows past it while read is refused too)."""
    fd = open_input(path, folder=folder, limit=limit)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        chunks, total = [], 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise InputError(f"{path}: more than the {limit} bytes a side file may have; move it out of the folder")
    finally:
        os.close(fd)
    return SideFile(b"".join(chunks), mode)


def stored_mode(source_mode: int) -> int:
    """A copy's permissions: the store's usual ones, never more open than the source's (the owner
    keeps read and write, so the store can replace and delete its copy)."""
    return (source_mode | 0o600) & 0o666


def _side_file(path: Path, folder: Path) -> bool:
    """Whether entry `path` of `folder` is a side file; one line when it is one that cannot be read."""
    name = path.name
    if name.startswith(".") or path.suffix.lower() in WEIGHT_SUFFIXES or name.endswith(".index.json"):
        return False
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        check_inside(path, folder)  # a link that leaves the folder is refused, not skipped
        try:
            st = os.stat(path)
        except OSError:
            return False  # a dangling link inside the folder: nothing to copy
    if stat.S_ISDIR(st.st_mode):
        return False
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: not a regular file (a FIFO, device or socket); remove it from the folder")
    if st.st_size > SIDE_FILE_BYTES:
        raise InputError(f"{path}: {st.st_size} bytes, more than the {SIDE_FILE_BYTES} a side file may have; move "
                         "it out of the folder")
    return True


def model_side_files(folder: str | os.PathLike) -> list[Path]:
    """config.json, tokenizer and processor files: every non-weight file of a model folder. Links
    leaving the folder, special files and files over SIDE_FILE_BYTES are refused in one line."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if _side_file(p, folder))


def copy_file_durably(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy a side file of an input folder (read_side_file's rules) and fsync the copy, no more open
    than the source (its folder is made durable by the caller)."""
    side = read_side_file(src)
    dst = Path(dst)
    with naming_full_disk(dst, len(side.data)):
        fd = _create(dst, stored_mode(side.mode))
        try:
            _write_fd(fd, side.data)
            os.fsync(fd)
        finally:
            os.close(fd)
    return dst
