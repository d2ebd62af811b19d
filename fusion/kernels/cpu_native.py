"""The native backend of the cpu kernel: cpu_native.c, built once per machine, loaded with ctypes.

The same loops as the numba backend (fusion.kernels.cpu_numba), in C. What it buys is start-up:
a process loads the built library in milliseconds, where numba's import and the load of its
cached code take about 0.7 s of CPU time (measured on the 2-core development machine), and that
time is a fifth of a whole `condu-fuse unify` of 8 x 64M parameters.

Building. At first use, the system C compiler (`$CC`, else `cc`) builds the library with the
flags below, in about a second, into a per-user cache folder (`$CONDU_CACHE_DIR`, else
`$XDG_CACHE_HOME/condu`, else `~/.cache/condu`), named by a digest of the source, the compiler,
the flags and the CPU's features; later processes load it from there. Without a compiler, or
when the build fails, the cpu kernel uses the numba backend (`available()` is False and
`require()` says why). A folder another user could write to is never loaded from.

Threads. Each call hands a chunk's blocks to the calling thread and to workers of a small pool,
all taking the next few blocks from one counter inside the library; ctypes releases the GIL
for the call, so they run side by side.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

__all__ = ["NAME", "available", "require", "unify", "fidelity_sums", "rebuild"]

NAME = "native"
_SOURCE = Path(__file__).with_name("cpu_native.c")
# No fast-math and no contraction into fused multiply-adds: float32 values round as the reference's.
_FLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-ffp-contract=off")
_NATIVE_ISA = ("-march=native",)  # dropped if the compiler refuses it
_BUILD_SECONDS = 120
_STEP = 4  # blocks a thread takes at a time: 16K elements, small enough to balance a busy machine


class _Pass(ctypes.Structure):
    """The C struct `Pass` of cpu_native.c, field for field."""

    _fields_ = [(name, ctypes.c_int64) for name in ("n", "block", "num_old", "num_new", "num_blocks")] + \
        [(name, ctypes.c_void_p) for name in ("stored_u", "stored_packed", "lam", "src", "table", "base", "orig",
                                              "index")] + \
        [("rounding", ctypes.c_int64), ("f16_table", ctypes.c_void_p)] + \
        [(name, ctypes.c_void_p) for name in ("unified", "packed", "delta_l1", "masked_l1", "fidelity", "drift")] + \
        [("next_block", ctypes.c_int64)]


_lock = threading.Lock()
_state: dict = {}  # "library" (ctypes.CDLL) once loaded, or "error" (why not)
_pool: tuple[int, ThreadPoolExecutor, int] | None = None  # the process that made it, the pool, its threads


def available() -> bool:
    """Whether the library is built (or builds now) and loads."""
    return _library() is not None


def require() -> None:
    if _library() is None:
        raise RuntimeError(f"cpu kernel: the native backend is not available: {_state['error']}")


def _library() -> ctypes.CDLL | None:
    with _lock:
        if not _state:
            try:
                _state["library"] = _load()
            except (OSError, subprocess.SubprocessError) as error:
                _state["error"] = str(error)
        return _state.get("library")


def _load() -> ctypes.CDLL:
    if sys.byteorder != "little":
        raise OSError("it packs masks eight bytes to a little-endian word; this machine is big-endian")
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise OSError("no C compiler found (cc, or $CC); install one, e.g. gcc")
    folder = _cache_folder()
    path = folder / f"cpu_native-{_build_key(compiler)}.so"
    if not path.exists():
        _build(compiler, folder, path)
    try:
        library = ctypes.CDLL(str(path))
    except OSError:  # a damaged file (a full disk, a crash): built again, once
        path.unlink(missing_ok=True)
        _build(compiler, folder, path)
        library = ctypes.CDLL(str(path))
    library.condu_unify.argtypes = [ctypes.POINTER(_Pass), ctypes.c_int64]
    library.condu_unify.restype = ctypes.c_int
    library.condu_fidelity_sums.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_void_p]
    library.condu_fidelity_sums.restype = None
    library.condu_rebuild.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_float, ctypes.c_int64, ctypes.c_void_p]
    library.condu_rebuild.restype = None
    return library


def _cache_folder() -> Path:
    """The per-user folder built libraries live in: made private, refused if others may write to it."""
    root = os.environ.get("CONDU_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "condu")
    folder = Path(root) / "kernels"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    status = folder.stat()
    if hasattr(os, "getuid") and (status.st_uid != os.getuid() or status.st_mode & 0o022):
        raise OSError(f"{folder}: owned by another user or writable by others; a library is never loaded from there")
    return folder


def _build_key(compiler: str) -> str:
    """What the built library depends on: the source, the compiler, the flags and the CPU."""
    digest = hashlib.sha256(_SOURCE.read_bytes())
    for part in (compiler, str(os.stat(compiler).st_mtime_ns), *_FLAGS, *_NATIVE_ISA, platform.machine(), _cpu_features()):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:20]


def _cpu_features() -> str:
    """The CPU's feature flags (Linux), so a library built for one CPU is never loaded on another."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _build(compiler: str, folder: Path, path: Path) -> None:
    """Compile into a temporary file beside `path`, then rename it there (atomic: processes may race)."""
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".build-", suffix=".so")
    os.close(handle)
    try:
        for isa in (_NATIVE_ISA, ()):
            command = [compiler, *_FLAGS, *isa, "-o", temporary, str(_SOURCE)]
            done = subprocess.run(command, capture_output=True, text=True, timeout=_BUILD_SECONDS)
            if done.returncode == 0:
                os.replace(temporary, path)
                return
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise OSError(f"building {_SOURCE.name} with {compiler} failed: {last}")
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _threads() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _workers() -> tuple[ThreadPoolExecutor, int]:
    """The pool of this process and how many threads a pass may use (the caller's included): a
    forked child makes its own pool (its parent's threads are not in it)."""
    global _pool
    with _lock:
        if _pool is None or _pool[0] != os.getpid():
            threads = _threads()
            _pool = (os.getpid(), ThreadPoolExecutor(max_workers=max(1, threads - 1),
                                                     thread_name_prefix="condu-kernel"), threads)
        return _pool[1], _pool[2]


def _address(array: np.ndarray | None) -> int | None:
    """Where a contiguous array's values start; None (NULL) for no array or an empty one."""
    if array is None or not array.size:
        return None
    assert array.flags.c_contiguous, "the native kernel reads contiguous arrays"
    return array.ctypes.data


def unify(stored_u, stored_packed, lam, src, table, base, block, out, rounding, f16_table, orig, index) -> None:
    """One chunk's pass (the arguments of fusion.kernels.cpu's drivers) into `out`."""
    library = _library()
    unified, packed, delta_l1, masked_l1, fidelity, drift = out
    n = unified.shape[0]
    index = np.ascontiguousarray(index, dtype=np.int64)
    arrays = dict(stored_u=stored_u, stored_packed=stored_packed, lam=lam, src=src,
                  table=table if table.size > 1 else None,  # a one-entry table: float32 rows, nothing to decode
                  base=base, orig=orig, index=index, f16_table=f16_table, unified=unified, packed=packed,
                  delta_l1=delta_l1, masked_l1=masked_l1, fidelity=fidelity, drift=drift)  # drift: NULL when empty
    job = _Pass(n=n, block=block, num_old=stored_packed.shape[0], num_new=src.shape[0], num_blocks=-(-n // block),
                rounding=rounding, next_block=0, **{name: _address(a) for name, a in arrays.items()})
    pool, threads = _workers()
    helpers = min(threads, -(-job.num_blocks // _STEP)) - 1
    pending = [pool.submit(library.condu_unify, ctypes.byref(job), _STEP) for _ in range(helpers)]
    codes = [library.condu_unify(ctypes.byref(job), _STEP)] + [p.result() for p in pending]
    if any(codes):
        raise MemoryError(f"cpu kernel: no memory for the scratch buffers of {job.num_old + job.num_new} tasks")


def fidelity_sums(unified: np.ndarray, mask: np.ndarray, original: np.ndarray, out: np.ndarray) -> None:
    """out (5,) += A, E, D, Z, C of float32 u against `original` under the 0/1 byte mask."""
    _library().condu_fidelity_sums(_address(unified), _address(mask), _address(original), unified.size,
                                   _address(out))


def rebuild(base: np.ndarray, unified: np.ndarray, packed: np.ndarray, rescaler: float, out: np.ndarray) -> np.ndarray:
    """out (n,) = base + where(M, u * float32(rescaler), +0.0): contiguous float32 base, u and out, the
    mask's packed bytes; on the calling thread (decouple overlaps it with its reads)."""
    _library().condu_rebuild(_address(base), _address(unified), _address(packed), float(rescaler), out.size,
                             _address(out))
    return out
