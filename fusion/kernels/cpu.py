"""The CPU kernel: elect and the continual step fused into one pass over cache-sized blocks.

Same inputs, same outputs as `fusion.reference.elect` / `continual_chunk`: unified values and
packed masks bit for bit, L1 sums to float tolerance. The numerics follow the reference exactly:
inputs are read as float32 (fp16/bf16 through an exact 65536-entry table), the election sum runs
in task order in float32, a rebuilt delta is `where(M, u * float32(lambda), 0)`. Inputs and
outputs are numpy arrays (bfloat16 as `ml_dtypes.bfloat16` arrays); torch is never imported.

Also here, the two other chunk operations of the `fusion.kernels.Kernel` contract: `rebuild`
(theta0 + lambda * M * u, in numpy on the packed bits, no compilation) and `fidelity_sums` (one
pass over the chunk, no temporaries of its size).

How it works. A chunk `(T, n)` is cut into blocks of `block` elements (4096 by default: at T = 16
a block is 256 KiB of float32, it stays in L2). Blocks are spread over threads; each thread owns
its scratch buffers (stacked rows, signs, magnitudes, byte masks: O(T * block)). For every block,
one read of the inputs from memory, then from cache: the sign election, the magnitudes, and one
loop per task for its mask, its L1 sums and its fidelity sums; masks are packed eight bytes at a
time. The store's rounding of u (fp16/bf16, or int8/int4 blocks of 64, whose scales come out too)
is done in the block, before the sums. L1 and
fidelity sums are per-block float64 partials summed after the pass (deterministic, independent
of the thread count). No temporaries of the chunk's size are made for float32 inputs.

Two backends run these loops, proven equal to the reference by the same tests:
- `native` (fusion.kernels.cpu_native): C, built when the package is installed and loaded with
  ctypes; a process starts it in milliseconds. Threads take blocks from a shared counter, so a
  thread the machine slows down takes fewer.
- `numba` (fusion.kernels.cpu_numba, the `numba` extra): where the C library was not built (an
  install without a compiler); numba's import and the load of its cached code cost a process
  about 0.7 s of CPU time before its first chunk.
`CpuKernel(backend="auto")` takes the native one where its library was built, else numba; the
environment variable CONDU_CPU_BACKEND (native, numba) chooses one for a whole process.
"""

from __future__ import annotations

import functools
import os
import sys

import numpy as np

from ..dtypes import BF16, F16, F32, BlockQuant, as_float32, dtype_of, to_float32, unified_form
from ..errors import InputError
from ..fidelity import NUM_SUMS
from .host import rebuild_into
from ..reference import NOT_MEASURED, ChunkResult, Originals

__all__ = ["CpuKernel", "KERNEL", "DEFAULT_BLOCK"]

# Elements per block and task: 16 KiB of float32 a task, 256 KiB for T = 16 (an L2's share).
DEFAULT_BLOCK = 4096

# float32 value of every 16-bit code, indexed by the code as uint16 (65536,): exact widenings.
_CODES = np.arange(1 << 16, dtype=np.uint16)
_TABLES = {F16: _CODES.view(np.float16).astype(np.float32), BF16: to_float32(_CODES, BF16)}
_NO_TABLE = np.zeros(1, dtype=np.float32)



# ---- the kernel object ---------------------------------------------------------------------------


def _as_rows(array: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Float rows the drivers read: float32 as is, fp16/bf16 as uint16 codes and their table."""
    dtype = dtype_of(array)
    if dtype in _TABLES:
        return np.ascontiguousarray(array).view(np.uint16), _TABLES[dtype]
    if not dtype.is_float:
        raise InputError(f"cpu kernel: {what} must be float, got {dtype.name}; pass float32, float16 or bfloat16 arrays")
    return np.ascontiguousarray(array, dtype=np.float32), _NO_TABLE


def _keeps_torch_threads(method):
    """Restore torch's thread count after a kernel call, when torch is loaded at all.

    numba's OpenMP layer and torch share libgomp's process-wide thread count; a parallel region
    can raise it behind torch's back, and a busy CPU then slows every later torch op. A process
    without torch has nothing to restore, and this does not import it.
    """

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        torch = sys.modules.get("torch")
        if not hasattr(torch, "set_num_threads"):  # no torch, or one still being imported by another thread
            return method(*args, **kwargs)
        threads = torch.get_num_threads()
        try:
            return method(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


class CpuKernel:
    """Fused, block-chunked elect and continual step on CPU threads, on numpy arrays.

    `backend`: "native" (C), "numba", or "auto" (CONDU_CPU_BACKEND, else native where its library
    was built, else numba); chosen at the first call, so making a kernel costs nothing."""

    name = "cpu"

    def __init__(self, *, block: int = DEFAULT_BLOCK, backend: str = "auto"):
        if block <= 0 or block % 8:
            raise InputError(f"cpu kernel: block must be a positive multiple of 8, got {block}")
        if backend not in BACKENDS:
            raise InputError(f"cpu kernel: unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
        self.block, self.requested = block, backend
        self._backend = None

    @property
    def backend(self):
        """The module that runs the loops (cpu_native or cpu_numba), loaded at first use."""
        if self._backend is None:
            self._backend = load_backend(self.requested)
        return self._backend

    def ready(self) -> "CpuKernel":
        """Load the backend now: ImportError when there is neither the built C library nor numba."""
        self.backend
        return self

    @_keeps_torch_threads
    def elect(self, deltas: np.ndarray, *, unified_dtype=F32, base: np.ndarray | None = None,
              originals: Originals | None = None) -> ChunkResult:
        """Same as fusion.reference.elect: stacked deltas (T, n) -> ChunkResult."""
        if np.ndim(deltas) != 2 or len(deltas) == 0:
            raise InputError(f"cpu kernel: elect expects stacked deltas (T, n) with T >= 1, got "
                             f"{np.shape(deltas)}; stack one flattened chunk per task as rows")
        no_stored = (np.zeros(0, np.float32), np.zeros((0, 0), np.uint8), np.zeros(0, np.float32))
        return self._run(no_stored, deltas, base, originals, unified_dtype)

    @_keeps_torch_threads
    def continual(self, unified: np.ndarray, packed_masks: np.ndarray, rescalers: np.ndarray,
                  new_deltas: np.ndarray, *, unified_dtype=F32, base: np.ndarray | None = None,
                  originals: Originals | None = None) -> ChunkResult:
        """Same as fusion.reference.continual_chunk: rebuild the stored tasks, unify them with the new."""
        n = np.size(unified)
        num_old = len(packed_masks)
        new_deltas = np.reshape(new_deltas, (-1, n))  # (T_new, n)
        if num_old + len(new_deltas) == 0:
            raise InputError("cpu kernel: continual step with no stored and no new task; pass at least one")
        if np.shape(packed_masks) != (num_old, -(-n // 8)) or np.size(rescalers) != num_old:
            raise InputError(f"cpu kernel: packed masks {np.shape(packed_masks)} and {np.size(rescalers)} rescalers "
                             f"do not fit {n} elements; expected ({num_old}, {-(-n // 8)}), one byte per 8 "
                             "elements per stored task, and one rescaler per stored task")
        stored = (np.ascontiguousarray(as_float32(unified).reshape(-1)),  # (n,)
                  np.ascontiguousarray(packed_masks, dtype=np.uint8),  # (T_old, n/8)
                  np.asarray(rescalers, dtype=np.float64).reshape(-1).astype(np.float32))  # (T_old,) float32(lambda)
        return self._run(stored, new_deltas, base, originals, unified_dtype)

    def _run(self, stored, rows, base, originals, unified_dtype) -> ChunkResult:
        """One pass of the backend over the stored tasks (possibly none) and the new rows."""
        num_tasks, n = len(stored[1]) + len(rows), np.shape(rows)[1] if len(rows) else np.size(stored[0])
        src, table = _as_rows(rows, "deltas")  # (T_new, n)
        base32 = _NO_BASE if base is None else np.ascontiguousarray(as_float32(base).reshape(-1))  # (n,)
        orig, index = _originals(originals, num_tasks, n)
        drift = originals is not None and originals.drift
        out = self._outputs(num_tasks, n, drift)
        form = unified_form(unified_dtype)
        quantized = isinstance(form, BlockQuant)
        if quantized and self.block % form.block:
            raise InputError(f"cpu kernel: block {self.block} cuts the {form.name} blocks of {form.block} elements; "
                             f"use a multiple of {form.block}")
        scales = np.empty(-(-n // form.block) if quantized else 0, dtype=np.float32)  # (ceil(n/64),)
        self.backend.unify(*stored, src, table, base32, self.block, out, _ROUNDING[form.code], _TABLES[F16], orig,
                           index, form.block if quantized else 0, scales)
        unified, packed, delta_l1, masked_l1, fidelity, drift_sums = out
        return ChunkResult(unified, packed, delta_l1.sum(axis=0), masked_l1.sum(axis=0),
                           None if originals is None else fidelity.sum(axis=0), drift_sums.sum(axis=0) if drift else None,
                           scales if quantized else None)

    def rebuild(self, base: np.ndarray, unified: np.ndarray, packed: np.ndarray, rescaler: float, *,
                out: np.ndarray | None = None) -> np.ndarray:
        """fusion.reference.rebuild in numpy on the packed bits (fusion.kernels.host), in `out` if given."""
        return rebuild_into(base, unified, packed, rescaler, out=out)

    def fidelity_sums(self, unified: np.ndarray, packed: np.ndarray, original: np.ndarray) -> np.ndarray:
        """fusion.reference.fidelity_sums in one pass: (5,) float64 A, E, D, Z, C."""
        out = np.zeros(NUM_SUMS, dtype=np.float64)
        u = np.ascontiguousarray(as_float32(unified).reshape(-1))  # (n,)
        o = np.ascontiguousarray(as_float32(original).reshape(-1))  # (n,)
        mask = np.unpackbits(np.reshape(packed, -1), count=u.size, bitorder="little")  # (n,) 0/1 bytes
        self.backend.fidelity_sums(u, mask, o, out)
        return out

    def warm(self) -> None:
        """Load (or build) the backend and its machine code for float32: the first call's cost, paid now."""
        deltas = np.zeros((2, 16), dtype=np.float32)
        result = self.elect(deltas)
        self.continual(result.unified, result.packed_masks, np.ones(2), deltas[:1])
        self.fidelity_sums(result.unified, result.packed_masks[0], deltas[0])

    def _outputs(self, num_tasks: int, n: int, drift: bool) -> tuple:
        """unified (n,), packed masks (T, n/8), and per-block partials of the L1, fidelity and drift
        sums (drift: no blocks when not asked for, which tells the backend to skip it)."""
        num_blocks = max(1, -(-n // self.block))
        return (np.empty(n, dtype=np.float32), np.empty((num_tasks, -(-n // 8)), dtype=np.uint8),
                np.zeros((num_blocks, num_tasks), dtype=np.float64), np.zeros((num_blocks, num_tasks), dtype=np.float64),
                np.zeros((num_blocks, num_tasks, NUM_SUMS), dtype=np.float64),
                np.zeros((num_blocks if drift else 0, num_tasks, NUM_SUMS), dtype=np.float64))

    def __repr__(self) -> str:
        chosen = self._backend.NAME if self._backend is not None else self.requested
        return f"CpuKernel(block={self.block}, backend={chosen!r})"


_NO_BASE = np.zeros(0, dtype=np.float32)
BACKENDS = ("auto", "native", "numba")


def load_backend(requested: str = "auto"):
    """The backend module for `requested`; "auto" reads CONDU_CPU_BACKEND, then takes native where
    its library was built, else numba. ImportError, saying why for each, when neither is at hand."""
    wanted = os.environ.get("CONDU_CPU_BACKEND", "auto") if requested == "auto" else requested
    if wanted not in BACKENDS:
        raise InputError(f"CONDU_CPU_BACKEND={wanted!r}: use one of {', '.join(BACKENDS)}")
    why_not_native = ""
    if wanted != "numba":
        from . import cpu_native

        try:
            cpu_native.require()
            return cpu_native
        except RuntimeError as missing:
            if wanted == "native":  # asked for by name: say why it is not there
                raise
            why_not_native = f"{missing}; "
    try:
        from . import cpu_numba
    except ImportError as error:
        raise ImportError(f"{why_not_native}{error}") from error
    return cpu_numba


# How the unified delta is rounded to its storage form inside the pass (0: it stays float32; 3, 4:
# int8 and int4 blocks).
_ROUNDING = {"F64": 0, "F32": 0, "F16": 1, "BF16": 2, "Q8": 3, "Q4": 4}


def _originals(originals: Originals | None, num_tasks: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows (R, n) float32, index (T,) int64) for the driver; nothing measured without originals."""
    if originals is None:
        return np.zeros((0, n), dtype=np.float32), np.full(num_tasks, NOT_MEASURED, dtype=np.int64)
    index = np.asarray(originals.index, dtype=np.int64).reshape(-1)
    if index.shape != (num_tasks,):
        raise InputError(f"cpu kernel: originals.index has {index.size} entries for {num_tasks} tasks; give one each")
    rows = np.ascontiguousarray(as_float32(originals.rows)).reshape(-1, n) if np.size(originals.rows) else \
        np.zeros((0, n), dtype=np.float32)
    return rows, index


KERNEL = CpuKernel()
