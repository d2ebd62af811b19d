"""The native backend of the cpu kernel: cpu_native.c, built when the package is installed, loaded with ctypes.

The same loops as the numba backend (fusion.kernels.cpu_numba), in C. What it buys is start-up:
a process loads the built library in milliseconds, where numba's import and the load of its
cached code take about 0.7 s of CPU time (measured on the 2-core development machine), and that
time is a fifth of a whole `condu-fuse unify` of 8 x 64M parameters.

The library. Installing the package (`pip install`, `make install`) compiles cpu_native.c into
`_cpu_native<extension suffix>` beside this file (setuptools' build_ext; setup.py declares it):
-O3 without fast-math, every loop for AVX-512, AVX2 and the x86-64 baseline, and the dynamic loader
picks the one this CPU runs. It is loaded from this package's folder only, the folder this code
itself came from: nothing is built or cached at run time, so nothing executable is loaded from a
folder another user could write. Where it is missing (an install without a C compiler, a source
checkout never installed), does not load, or was built from another cpu_native.c (its struct
`Pass` has another size, or the source beside it another sha256), `available()` is False,
`require()` says why in one line, and the cpu kernel runs on the numba backend (the `numba`
extra), or the reference where numba is missing.

Threads. Each call hands a chunk's blocks to the calling thread and to workers of a small pool,
all taking the next few blocks from one counter inside the library; ctypes releases the GIL
for the call, so they run side by side.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

__all__ = ["NAME", "available", "require", "unify", "fidelity_sums", "rebuild"]

NAME = "native"
# Where build_ext writes the library: beside this file, named as an extension module of this interpreter.
_PATH = Path(__file__).with_name("_cpu_native" + importlib.machinery.EXTENSION_SUFFIXES[0])
_MODULE = f"{__package__}._cpu_native"
_REINSTALL = "reinstall with a C compiler (pip install -e . / make install)"
_STEP = 4  # blocks a thread takes at a time: 16K elements, small enough to balance a busy machine


class _Pass(ctypes.Structure):
    """The C struct `Pass` of cpu_native.c, field for field."""

    _fields_ = [(name, ctypes.c_int64) for name in ("n", "block", "num_old", "num_new", "num_blocks")] + \
        [(name, ctypes.c_void_p) for name in ("stored_u", "stored_packed", "lam", "src", "table", "base", "orig",
                                              "index")] + \
        [("rounding", ctypes.c_int64), ("f16_table", ctypes.c_void_p), ("quant_block", ctypes.c_int64),
         ("scales", ctypes.c_void_p)] + \
        [(name, ctypes.c_void_p) for name in ("unified", "packed", "delta_l1", "masked_l1", "fidelity", "drift")] + \
        [("next_block", ctypes.c_int64)]


_lock = threading.Lock()
_state: dict = {}  # "library" (ctypes.CDLL) once loaded, or "error" (why not)
_pool: tuple[int, ThreadPoolExecutor, int] | None = None  # the process that made it, the pool, its threads


def available() -> bool:
    """Whether the library was built with the package and loads."""
    return _library() is not None


def require() -> None:
    if _library() is None:
        raise RuntimeError(f"cpu kernel: the native backend is not available: {_state['error']}")


def _library() -> ctypes.CDLL | None:
    with _lock:
        if not _state:
            try:
                _state["library"] = _open(_PATH)
            except OSError as error:
                _state["error"] = str(error)
        return _state.get("library")


def _open(path: Path) -> ctypes.CDLL:
    """The library at `path`, its functions declared; OSError, in one line, where it is missing, does
    not load, or was built from another cpu_native.c: a struct of another size would be misread, and
    a checkout's library older than its source would run old loops."""
    if sys.byteorder != "little":
        raise OSError("it packs masks eight bytes to a little-endian word; this machine is big-endian")
    if not path.is_file():
        raise OSError(f"{_MODULE} is not built: {_REINSTALL}")
    try:
        library = ctypes.CDLL(str(path))  # a path with a slash: dlopen searches no other folder
        size, built_from = library.condu_pass_size, library.condu_source_sha256
    except (OSError, AttributeError) as error:
        raise OSError(f"{path.name} does not load as the cpu kernel's library ({error}): {_REINSTALL}") from error
    size.restype, built_from.restype = ctypes.c_int64, ctypes.c_char_p
    if size() != ctypes.sizeof(_Pass):
        raise OSError(f"{path.name} was built from another cpu_native.c (its Pass is {size()} bytes, this "
                      f"module's {ctypes.sizeof(_Pass)}): {_REINSTALL}")
    source = path.with_name("cpu_native.c")  # in a checkout, and in the wheel
    if source.is_file() and built_from().decode() != hashlib.sha256(source.read_bytes()).hexdigest():
        raise OSError(f"{path.name} was built from another cpu_native.c than the one beside it: {_REINSTALL}")
    library.condu_unify.argtypes = [ctypes.POINTER(_Pass), ctypes.c_int64]
    library.condu_unify.restype = ctypes.c_int
    library.condu_fidelity_sums.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_void_p]
    library.condu_fidelity_sums.restype = None
    library.condu_rebuild_as.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_float, ctypes.c_int64, ctypes.c_void_p,
                                                                ctypes.c_int64]
    library.condu_rebuild_as.restype = None
    return library


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


def unify(stored_u, stored_packed, lam, src, table, base, block, out, rounding, f16_table, orig, index,
          quant_block, scales) -> None:
    """One chunk's pass (the arguments of fusion.kernels.cpu's drivers) into `out`; `scales` receives the
    block scales of a quantized u (rounding 3, 4; an empty array otherwise)."""
    library = _library()
    unified, packed, delta_l1, masked_l1, fidelity, drift = out
    n = unified.shape[0]
    index = np.ascontiguousarray(index, dtype=np.int64)
    arrays = dict(stored_u=stored_u, stored_packed=stored_packed, lam=lam, src=src,
                  table=table if table.size > 1 else None,  # a one-entry table: float32 rows, nothing to decode
                  base=base, orig=orig, index=index, f16_table=f16_table, unified=unified, packed=packed,
                  delta_l1=delta_l1, masked_l1=masked_l1, fidelity=fidelity, drift=drift,  # drift: NULL when empty
                  scales=scales)
    job = _Pass(n=n, block=block, num_old=stored_packed.shape[0], num_new=src.shape[0], num_blocks=-(-n // block),
                rounding=rounding, quant_block=quant_block, next_block=0,
                **{name: _address(a) for name, a in arrays.items()})
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


def rebuild(base: np.ndarray, unified: np.ndarray, packed: np.ndarray, rescaler: float, out: np.ndarray, *,
            kind: int = 0) -> np.ndarray:
    """out (n,) = base + where(M, u * float32(rescaler), +0.0): contiguous float32 base and u, the mask's
    packed bytes; out float32 (kind 0), or the bits of bfloat16 (1) or float16 (2) rounded as
    fusion.dtypes.from_float32. On the calling thread (decouple overlaps it with its reads)."""
    _library().condu_rebuild_as(_address(base), _address(unified), _address(packed), float(rescaler), out.size,
                                _address(out), kind)
    return out
