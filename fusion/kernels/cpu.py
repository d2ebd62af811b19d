"""The CPU kernel: elect and the continual step fused into one pass over cache-sized blocks.

Same inputs, same outputs as `fusion.reference.elect` / `continual_chunk`: unified values and
packed masks bit for bit, L1 sums to float tolerance. The numerics follow the reference exactly:
inputs are read as float32 (fp16/bf16 through an exact 65536-entry table), the election sum runs
in task order in float32, a rebuilt delta is `where(M, u * float32(lambda), 0)`. Inputs and
outputs are numpy arrays (bfloat16 as `ml_dtypes.bfloat16` arrays); torch is never imported.

Also here, the two other chunk operations of the `fusion.kernels.Kernel` contract: `rebuild`
(theta0 + lambda * M * u, in numpy on the packed bits, no compilation) and `fidelity_sums` (one
numba pass over the chunk, no temporaries of its size).

How it works. A chunk `(T, n)` is cut into blocks of `block` elements (4096 by default: at T = 16
a block is 256 KiB of float32, it stays in L2). Blocks are spread over threads with numba's
`prange`; each thread owns its scratch buffers (sums, magnitudes, byte masks: O(T * block)).
For every block, one read of the inputs from memory; the later phases (mask, magnitude, bit
packing, L1 sums) re-read it from cache. L1 sums are per-block float64 partials summed after the
pass (deterministic, independent of the thread count). No temporaries of the chunk's size are
made for float32 inputs; the store's dtype rounding of u (fp16/bf16) is done in numpy on the
(n,) unified delta, then the masked L1 is taken in a second pass over u and the packed bits.

Options measured before choosing (elect, T = 8, 16M-element float32 deltas per task, median of
3 to 7, on the shared 2-core development machine at a load average of 8 to 11, so only the order
of magnitude is firm; `python benchmarks/kernels.py` gives the figures of record):
    torch copy of the same bytes (the roofline)      1.9 GB/s
    numba, this file                                 0.85-1.3 GB/s  (a first version indexing with
                                                     offsets, rows[t, lo + j], did not vectorize:
                                                     0.4-0.6 GB/s; contiguous row views fixed it)
    chunked torch, 64K blocks, preallocated buffers  0.01 GB/s: ~15 torch ops per block, each an
      and in-place ops                               OpenMP region, which a busy machine starves
    torch.compile(reference.elect) on 1M chunks      0.02 GB/s after a 68 s warm-up; bit-equal, but
                                                     it needs a C++ compiler at run time
    the reference on 1M chunks                       0.02-0.03 GB/s (then in torch; in numpy now,
                                                     about 0.16 GB/s: fusion.kernels.SMALL_WORK)
A small C++ extension would run the same loops as numba's LLVM code, but it needs a compiler on
every user's machine and a minute to build (torch.utils.cpp_extension) or a wheel per platform.
numba installs from PyPI as wheels, compiles these functions once in ~15 s and caches the machine
code next to this file (`cache=True`), so later processes start in about a second. Chosen: numba.
"""

from __future__ import annotations

import functools
import sys

import numba
import numpy as np
from numba import njit, prange
from numba.extending import overload

from ..dtypes import BF16, F16, F32, as_float32, dtype_of, float_dtype, round_through, to_float32
from ..fidelity import NUM_SUMS
from ..reference import ChunkResult

__all__ = ["CpuKernel", "KERNEL", "DEFAULT_BLOCK"]

# Elements per block and task: 16 KiB of float32 a task, 256 KiB for T = 16 (an L2's share).
DEFAULT_BLOCK = 4096

_JIT = dict(cache=True, nogil=True)
# Only the L1 reductions may be reordered (they are compared to a tolerance); the election sum,
# the masks and the rebuilt values are computed without fast-math, so they match bit for bit.
_SUM = dict(cache=True, nogil=True, fastmath={"reassoc", "nsz"})


# float32 value of every 16-bit code, indexed by the code as uint16 (65536,): exact widenings.
_CODES = np.arange(1 << 16, dtype=np.uint16)
_TABLES = {F16: _CODES.view(np.float16).astype(np.float32), BF16: to_float32(_CODES, BF16)}
_NO_TABLE = np.zeros(1, dtype=np.float32)


# ---- block phases (njit, inlined by LLVM into the drivers) -------------------------------------


@njit(**_SUM)
def _abs_sum(rows, t, lo, m):
    """float64 sum of |rows[t, lo:lo+m]|."""
    row = rows[t, lo : lo + m]  # a contiguous view: plain indices vectorize, offsets did not
    acc = 0.0
    for j in range(m):
        acc += np.float64(abs(row[j]))
    return acc


@njit(**_SUM)
def _masked_sum(masks, t, magnitude, m):
    """float64 sum of magnitude[j] over the j where masks[t, j] is set."""
    mask = masks[t, :m]
    acc = 0.0
    for j in range(m):
        acc += np.float64(magnitude[j]) if mask[j] else 0.0
    return acc


@njit(**_JIT)
def _elect_sign(rows, lo, m, sign):
    """sign[:m] = +1 where the sequential float32 sum over tasks is > 0, else -1."""
    total = sign[:m]
    total[:] = rows[0, lo : lo + m]
    for t in range(1, rows.shape[0]):  # task order, one rounding per task: the reference's sum
        row = rows[t, lo : lo + m]
        for j in range(m):
            total[j] += row[j]
    for j in range(m):
        sign[j] = np.float32(1.0) if sign[j] > 0 else np.float32(-1.0)


@njit(**_JIT)
def _masks_and_magnitude(rows, lo, m, sign, masks, magnitude):
    """masks[t, j] = rows[t, j] agrees strictly with sign[j]; magnitude = max agreeing |value|."""
    magnitude[:m] = 0.0
    for t in range(rows.shape[0]):
        row, mask = rows[t, lo : lo + m], masks[t, :m]
        for j in range(m):
            x = row[j]
            agree = x * sign[j] > 0  # sign is +-1: the product is exact
            mask[j] = agree
            a = abs(x) if agree else np.float32(0.0)
            magnitude[j] = a if a > magnitude[j] else magnitude[j]


@njit(**_JIT)
def _pack_masks(masks, m, packed, byte_lo):
    """Byte masks (T, m) -> bits: element 8k+b at bit b of byte k (numpy little-endian)."""
    full = m // 8
    for t in range(masks.shape[0]):
        mask, out = masks[t], packed[t, byte_lo : byte_lo + (m + 7) // 8]
        for k in range(full):
            byte = 0
            for b in range(8):
                byte |= np.int32(mask[8 * k + b]) << b
            out[k] = byte
        if m % 8:  # the last, partial byte of the chunk: missing elements are 0 bits
            byte = 0
            for b in range(m % 8):
                byte |= np.int32(mask[8 * full + b]) << b
            out[full] = byte


@njit(**_JIT)
def _elect_block(rows, lo, m, out_lo, scratch, unified, packed, delta_l1, masked_l1, block_id, with_masked):
    """Elect one block of columns [lo, lo+m) of rows (T, *) into the outputs at out_lo."""
    sign, magnitude, masks = scratch
    _elect_sign(rows, lo, m, sign)
    _masks_and_magnitude(rows, lo, m, sign, masks, magnitude)
    for j in range(m):
        unified[out_lo + j] = sign[j] * magnitude[j]
    _pack_masks(masks, m, packed, out_lo // 8)
    for t in range(rows.shape[0]):
        delta_l1[block_id, t] = _abs_sum(rows, t, lo, m)
        if with_masked:  # u is stored as float32: |u| is the magnitude itself
            masked_l1[block_id, t] = _masked_sum(masks, t, magnitude, m)


def _stage(src, table, lo, m, stage, row0):
    """Copy columns [lo, lo+m) of src (T, *) into stage rows row0.. as float32."""


@overload(_stage, jit_options=_JIT)
def _stage_impl(src, table, lo, m, stage, row0):
    if src.dtype == numba.types.uint16:

        def decode(src, table, lo, m, stage, row0):
            for t in range(src.shape[0]):
                codes, row = src[t, lo : lo + m], stage[row0 + t]
                for j in range(m):
                    row[j] = table[codes[j]]

        return decode

    def copy(src, table, lo, m, stage, row0):
        for t in range(src.shape[0]):
            stage[row0 + t, :m] = src[t, lo : lo + m]

    return copy


def _new_stage(src, block):
    """Scratch rows for decoding 16-bit inputs; none needed for float32."""


@overload(_new_stage, jit_options=_JIT)
def _new_stage_impl(src, block):
    if src.dtype == numba.types.float32:
        return lambda src, block: np.empty((0, block), dtype=np.float32)
    return lambda src, block: np.empty((src.shape[0], block), dtype=np.float32)  # (T, block)


def _rows_at(src, table, lo, m, stage):
    """(rows, offset) holding columns [lo, lo+m) of src as float32: in place, or decoded to stage."""


@overload(_rows_at, jit_options=_JIT)
def _rows_at_impl(src, table, lo, m, stage):
    if src.dtype == numba.types.float32:
        return lambda src, table, lo, m, stage: (src, lo)

    def decoded(src, table, lo, m, stage):
        _stage(src, table, lo, m, stage, 0)
        return stage, 0

    return decoded


@njit(**_JIT)
def _rebuild_block(unified, packed, lam, lo, m, stage):
    """stage[i, :m] = where(bit i of element lo+j, u[lo+j] * lam[i], 0) for every stored task i."""
    u = unified[lo : lo + m]
    for i in range(packed.shape[0]):
        bits, row, scale = packed[i, lo // 8 : (lo + m + 7) // 8], stage[i], lam[i]
        for j in range(m):
            scaled = u[j] * scale
            row[j] = scaled if (bits[j >> 3] >> (j & 7)) & 1 else np.float32(0.0)


@njit(**_JIT)
def _new_scratch(num_tasks, block):
    """One thread's buffers: signs (block,), magnitudes (block,), byte masks (T, block)."""
    sign = np.empty(block, dtype=np.float32)
    magnitude = np.empty(block, dtype=np.float32)
    masks = np.empty((num_tasks, block), dtype=np.uint8)
    return sign, magnitude, masks


# ---- parallel drivers: blocks spread over threads, scratch per thread ---------------------------


@njit(parallel=True, **_JIT)
def _elect_pass(src, table, block, runs, unified, packed, delta_l1, masked_l1, with_masked):
    num_tasks, n = src.shape
    num_blocks = (n + block - 1) // block
    for run in prange(runs):
        scratch = _new_scratch(num_tasks, block)
        stage = _new_stage(src, block)
        for b in range(run * num_blocks // runs, (run + 1) * num_blocks // runs):
            lo = b * block
            m = min(block, n - lo)
            rows, offset = _rows_at(src, table, lo, m, stage)
            _elect_block(rows, offset, m, lo, scratch, unified, packed, delta_l1, masked_l1, b, with_masked)


@njit(parallel=True, **_JIT)
def _continual_pass(stored_u, stored_packed, lam, src, table, block, runs, unified, packed, delta_l1, masked_l1,
                    with_masked):
    num_old, num_new, n = stored_packed.shape[0], src.shape[0], stored_u.shape[0]
    num_blocks = (n + block - 1) // block
    for run in prange(runs):
        scratch = _new_scratch(num_old + num_new, block)
        stage = np.empty((num_old + num_new, block), dtype=np.float32)  # (T, block)
        for b in range(run * num_blocks // runs, (run + 1) * num_blocks // runs):
            lo = b * block
            m = min(block, n - lo)
            _rebuild_block(stored_u, stored_packed, lam, lo, m, stage)
            _stage(src, table, lo, m, stage, num_old)
            _elect_block(stage, 0, m, lo, scratch, unified, packed, delta_l1, masked_l1, b, with_masked)


@njit(parallel=True, **_SUM)
def _masked_l1_pass(unified, packed, block, masked_l1):
    """masked_l1[b, t] = sum |u| over the set bits of task t in block b (after u was rounded)."""
    num_tasks, n = packed.shape[0], unified.shape[0]
    num_blocks = (n + block - 1) // block
    for b in prange(num_blocks):
        lo = b * block
        m = min(block, n - lo)
        u = unified[lo : lo + m]
        for t in range(num_tasks):
            bits = packed[t, lo // 8 : (lo + m + 7) // 8]
            acc = 0.0
            for j in range(m):
                acc += np.float64(abs(u[j])) if (bits[j >> 3] >> (j & 7)) & 1 else 0.0
            masked_l1[b, t] = acc


# The fidelity sums may be reordered (vectorised); they are compared with the reference to a tolerance.
@njit(cache=True, nogil=True, fastmath={"reassoc", "nsz", "contract"})
def _fidelity_pass(u, packed, o, out):
    """out = A, E, D, Z, C of one chunk (fusion.fidelity), in one pass without temporaries."""
    a = e = d = z = c = 0.0
    for j in range(u.shape[0]):
        uj, oj = np.float64(u[j]), np.float64(o[j])
        on = np.float64((packed[j >> 3] >> (j & 7)) & 1)  # 1.0 or 0.0: no branch on random bits
        diff = uj - oj
        a += on * (uj * uj)
        e += on * (uj * diff)
        d += on * (diff * diff)
        z += (1.0 - on) * (oj * oj)
        c += oj * oj
    out[0], out[1], out[2], out[3], out[4] = a, e, d, z, c


# ---- the kernel object ---------------------------------------------------------------------------


def _as_rows(array: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Float rows the drivers read: float32 as is, fp16/bf16 as uint16 codes and their table."""
    dtype = dtype_of(array)
    if dtype in _TABLES:
        return np.ascontiguousarray(array).view(np.uint16), _TABLES[dtype]
    if not dtype.is_float:
        raise ValueError(f"cpu kernel: {what} must be float, got {dtype.name}; pass float32, float16 or bfloat16 arrays")
    return np.ascontiguousarray(array, dtype=np.float32), _NO_TABLE


def _keeps_torch_threads(method):
    """Restore torch's thread count after a numba parallel region, when torch is loaded at all.

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
    """Fused, block-chunked elect and continual step on CPU threads (numba), on numpy arrays."""

    name = "cpu"

    def __init__(self, *, block: int = DEFAULT_BLOCK):
        if block <= 0 or block % 8:
            raise ValueError(f"cpu kernel: block must be a positive multiple of 8, got {block}")
        self.block = block

    @_keeps_torch_threads
    def elect(self, deltas: np.ndarray, *, unified_dtype=F32) -> ChunkResult:
        """Same as fusion.reference.elect: stacked deltas (T, n) -> ChunkResult."""
        if np.ndim(deltas) != 2 or len(deltas) == 0:
            raise ValueError(f"cpu kernel: elect expects stacked deltas (T, n) with T >= 1, got "
                             f"{np.shape(deltas)}; stack one flattened chunk per task as rows")
        num_tasks, n = deltas.shape
        src, table = _as_rows(deltas, "deltas")  # (T, n)
        outputs, dtype = self._outputs(num_tasks, n), float_dtype(unified_dtype)
        _elect_pass(src, table, self.block, self._runs(n), *outputs, _keeps_float32(dtype))
        return self._finish(outputs, dtype)

    @_keeps_torch_threads
    def continual(self, unified: np.ndarray, packed_masks: np.ndarray, rescalers: np.ndarray,
                  new_deltas: np.ndarray, *, unified_dtype=F32) -> ChunkResult:
        """Same as fusion.reference.continual_chunk: rebuild the stored tasks, unify them with the new."""
        n = np.size(unified)
        num_old = len(packed_masks)
        new_deltas = np.reshape(new_deltas, (-1, n))  # (T_new, n)
        if num_old + len(new_deltas) == 0:
            raise ValueError("cpu kernel: continual step with no stored and no new task; pass at least one")
        if np.shape(packed_masks) != (num_old, -(-n // 8)) or np.size(rescalers) != num_old:
            raise ValueError(f"cpu kernel: packed masks {np.shape(packed_masks)} and {np.size(rescalers)} rescalers "
                             f"do not fit {n} elements; expected ({num_old}, {-(-n // 8)}), one byte per 8 "
                             "elements per stored task, and one rescaler per stored task")
        stored_u = np.ascontiguousarray(as_float32(unified).reshape(-1))  # (n,)
        lam = np.asarray(rescalers, dtype=np.float64).reshape(-1).astype(np.float32)  # (T_old,) float32(lambda)
        src, table = _as_rows(new_deltas, "new_deltas")
        outputs, dtype = self._outputs(num_old + len(new_deltas), n), float_dtype(unified_dtype)
        stored_packed = np.ascontiguousarray(packed_masks, dtype=np.uint8)  # (T_old, n/8)
        _continual_pass(stored_u, stored_packed, lam, src, table, self.block, self._runs(n), *outputs,
                        _keeps_float32(dtype))
        return self._finish(outputs, dtype)

    def rebuild(self, base: np.ndarray, unified: np.ndarray, packed: np.ndarray, rescaler: float, *,
                out: np.ndarray | None = None) -> np.ndarray:
        """fusion.reference.rebuild in numpy on the packed bits, in place in `out` (float32 (n,)) if given.

        `out` may be `unified` itself (a caller that reads u into its output buffer first).
        """
        n = np.size(unified)
        bits = np.unpackbits(np.reshape(packed, -1), count=n, bitorder="little")  # (n,) uint8 0/1
        keep = np.negative(bits, dtype=np.int32)  # (n,) all 32 bits set where the mask is on, else none
        result = np.empty(n, dtype=np.float32) if out is None else out
        np.multiply(as_float32(unified), np.float32(rescaler), out=result)  # u * lambda, one rounding
        # where(M, u * lambda, +0.0) exactly, as a bit mask (a select in numpy is several times slower)
        np.bitwise_and(result.view(np.int32), keep, out=result.view(np.int32))
        # `base + 0` (not a copy) where the mask is off: -0.0 + 0.0 is +0.0, as in the reference
        np.add(as_float32(base), result, out=result)
        return result

    def fidelity_sums(self, unified: np.ndarray, packed: np.ndarray, original: np.ndarray) -> np.ndarray:
        """fusion.reference.fidelity_sums in one pass: (5,) float64 A, E, D, Z, C."""
        out = np.zeros(NUM_SUMS, dtype=np.float64)
        u = np.ascontiguousarray(as_float32(unified).reshape(-1))  # (n,)
        o = np.ascontiguousarray(as_float32(original).reshape(-1))  # (n,)
        _fidelity_pass(u, np.ascontiguousarray(np.reshape(packed, -1), dtype=np.uint8), o, out)
        return out

    def warm(self) -> None:
        """Load (or compile) the machine code of the float32 signatures: the first call's cost, paid now."""
        deltas = np.zeros((2, 16), dtype=np.float32)
        result = self.elect(deltas)
        self.continual(result.unified, result.packed_masks, np.ones(2), deltas[:1])
        self.fidelity_sums(result.unified, result.packed_masks[0], deltas[0])

    def _runs(self, n: int) -> int:
        """Contiguous runs of blocks handed to threads: a few per thread, for load balance."""
        return max(1, min(-(-n // self.block), 4 * numba.get_num_threads()))

    def _outputs(self, num_tasks: int, n: int):
        num_blocks = max(1, -(-n // self.block))
        unified = np.empty(n, dtype=np.float32)  # (n,)
        packed = np.empty((num_tasks, -(-n // 8)), dtype=np.uint8)  # (T, n/8)
        delta_l1 = np.zeros((num_blocks, num_tasks), dtype=np.float64)  # per-block partials
        masked_l1 = np.zeros((num_blocks, num_tasks), dtype=np.float64)
        return unified, packed, delta_l1, masked_l1

    def _finish(self, outputs, dtype) -> ChunkResult:
        unified, packed, delta_l1, masked_l1 = outputs
        if not _keeps_float32(dtype):  # round u to the stored dtype first: the rescalers rebuild what is stored
            unified = round_through(unified, dtype)
            _masked_l1_pass(unified, packed, self.block, masked_l1)
        return ChunkResult(unified, packed, delta_l1.sum(axis=0), masked_l1.sum(axis=0))

    def __repr__(self) -> str:
        return f"CpuKernel(block={self.block})"


def _keeps_float32(dtype) -> bool:
    """Stored as float32 (or wider), u keeps its float32 values: the masked L1 is taken in the pass."""
    return dtype.itemsize >= 4


KERNEL = CpuKernel()
