"""The numba backend of the cpu kernel: the fused block loops, compiled by numba (fusion.kernels.cpu).

The backend where the C library was not built (fusion.kernels.cpu_native is the other): the
same loops, block for block, as LLVM code that numba compiles once (~15 s) and caches next to
this file (`cache=True`). A process pays numba's import and the load of that code at its first
call: about 0.7 s of CPU time on the 2-core development machine.

Options measured before numba was chosen (elect, T = 8, 16M-element float32 deltas per task, on
the shared 2-core development machine at a load average of 8 to 11, so only the order of
magnitude is firm; `python benchmarks/kernels.py` gives the figures of record):
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
Two things LLVM makes of numba code that cost 3x, found by reading the machine code: an in-place
`m = x if x > m else m` becomes masked stores (slow on x86), and a load inside a conditional
becomes a masked load; the loops below store unconditionally and load before they select.
"""

from __future__ import annotations

import numpy as np

try:
    import numba
    from numba import njit, prange
    from numba.extending import overload
except ImportError as error:  # an optional extra: the backend where the C library was not built
    raise ImportError(f"{__name__} needs numba ({error}): pip install 'condu[numba]'") from error

from ..reference import OWN_ROW

__all__ = ["NAME", "unify", "fidelity_sums"]

NAME = "numba"

# The election sum, the magnitudes and the rebuilt values are computed without fast-math, so they
# match the reference bit for bit; only the sums (_SUMS, below) may be reordered.
_JIT = dict(cache=True, nogil=True)


# ---- block phases (njit, inlined by LLVM into the drivers) -------------------------------------


@njit(**_JIT)
def _stage_rows(src, table, base, lo, m, stage, row0):
    """stage[row0 + t, :m] = src[t, lo:lo+m] as float32 (decoded through `table` for 16-bit codes),
    minus base[lo:lo+m] when a base is given (one float32 rounding, as `rows - base`)."""
    for t in range(src.shape[0]):
        if base.shape[0]:
            _decode_minus(src[t, lo : lo + m], table, base[lo : lo + m], stage[row0 + t], m)
        else:
            _decode(src[t, lo : lo + m], table, stage[row0 + t], m)


def _decode(codes, table, out, m):
    """out[:m] = codes as float32: a copy, or a table lookup for 16-bit float codes."""


@overload(_decode, jit_options=_JIT)
def _decode_impl(codes, table, out, m):
    if codes.dtype == numba.types.uint16:

        def lookup(codes, table, out, m):
            for j in range(m):
                out[j] = table[codes[j]]

        return lookup

    def copy(codes, table, out, m):
        for j in range(m):
            out[j] = codes[j]

    return copy


def _decode_minus(codes, table, base, out, m):
    """out[:m] = codes as float32 minus base: the decode and the subtraction in one loop."""


@overload(_decode_minus, jit_options=_JIT)
def _decode_minus_impl(codes, table, base, out, m):
    if codes.dtype == numba.types.uint16:

        def lookup(codes, table, base, out, m):
            for j in range(m):
                out[j] = table[codes[j]] - base[j]

        return lookup

    def subtract(codes, table, base, out, m):
        for j in range(m):
            out[j] = codes[j] - base[j]

    return subtract


@njit(**_JIT)
def _elect_sign(rows, m, sign):
    """sign[:m] = +1 where the sequential float32 sum over tasks is > 0, else -1."""
    total = sign[:m]
    total[:] = rows[0, :m]
    for t in range(1, rows.shape[0]):  # task order, one rounding per task: the reference's sum
        row = rows[t, :m]
        for j in range(m):
            total[j] += row[j]
    for j in range(m):
        sign[j] = np.float32(1.0) if sign[j] > 0 else np.float32(-1.0)


@njit(**_JIT)
def _magnitude(rows, m, sign, magnitude, spare):
    """magnitude[:m] = the largest |value| over tasks that agrees strictly with sign, else +0.0.

    sign is +-1, so x * sign is exact and equals |x| exactly where x agrees, <= 0 elsewhere: the
    largest of them, started from +0.0, is the largest agreeing |x|, or +0.0 (a -0.0 never wins
    the strict comparison). The running maximum goes back and forth between `magnitude` and
    `spare`, read from one and written to the other: an in-place `m = x if x > m else m` compiles
    to masked stores, three times slower on x86 than the unconditional stores of this loop."""
    count = rows.shape[0]
    read, write = (magnitude, spare) if count % 2 == 0 else (spare, magnitude)  # the last write lands in magnitude
    read[:m] = 0.0
    for t in range(count):
        row, old, new = rows[t, :m], read[:m], write[:m]
        for j in range(m):
            agreeing = row[j] * sign[j]
            current = old[j]
            new[j] = agreeing if agreeing > current else current
        read, write = write, read


@njit(**_JIT)
def _round_bf16(bits):
    """float32 bits rounded to bfloat16 (nearest, ties to even), as float32 bits; u is finite."""
    return ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)) << np.uint32(16)


@njit(**_JIT)
def _f16_bits(bits):
    """float32 bits -> float16 bits, rounded to nearest, ties to even (numpy's astype(float16))."""
    sign = (bits >> np.uint32(16)) & np.uint32(0x8000)
    exponent = np.int64((bits >> np.uint32(23)) & np.uint32(0xFF)) - 127 + 15
    mantissa = np.int64(bits & np.uint32(0x7FFFFF))
    if exponent >= 31:  # beyond float16's range (u is finite): infinity, caught by the pass
        return sign | np.uint32(0x7C00)
    if exponent <= 0:  # a float16 subnormal, or zero
        if exponent < -10:
            return sign
        mantissa |= 0x800000
        shift = 14 - exponent
        half = np.int64(1) << (shift - 1)
        rounded = (mantissa + half - 1 + ((mantissa >> shift) & 1)) >> shift
        return sign | np.uint32(rounded)
    rounded = (mantissa + 0xFFF + ((mantissa >> 13) & 1)) >> 13  # may carry into the exponent: still right
    return sign | np.uint32((exponent << 10) + rounded)


@njit(**_JIT)
def _round_block(u, m, rounding, f16_table):
    """u[:m] rounded to the store's dtype and widened back (0: float32, 1: float16, 2: bfloat16)."""
    if rounding == 0:
        return
    bits = u[:m].view(np.uint32)
    for j in range(m):
        if rounding == 2:
            bits[j] = _round_bf16(bits[j])
        else:
            u[j] = f16_table[_f16_bits(bits[j])]


_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23: adding and subtracting it rounds half to even (|x| < 2**22)
_SMALLEST_SCALE = np.float32(2.0**-126)


@njit(**_JIT)
def _quantize_block(u, m, qb, qmax, scales):
    """u[:m] block-quantized and dequantized in place, m from a block boundary (cpu_native.c's
    quantize_block, fusion.reference.quantize_blocks); scales[k] is block k's scale."""
    for k in range((m + qb - 1) // qb):
        lo = k * qb
        end = min(lo + qb, m)
        amax = np.float32(0.0)
        for j in range(lo, end):
            a = abs(u[j])
            amax = a if a > amax else amax
        scale = amax / qmax
        if not scale >= _SMALLEST_SCALE:
            scale = np.float32(0.0)
        scales[k] = scale
        if scale == 0:
            for j in range(lo, end):
                u[j] = np.float32(0.0)
            continue
        for j in range(lo, end):
            code = (u[j] / scale + _MAGIC) - _MAGIC
            code = qmax if code > qmax else (-qmax if code < -qmax else code)
            u[j] = code * scale


_BIT_GATHER = np.uint64(0x0102040810204080)  # moves byte b's low bit to bit 56 + b, without carries


@njit(**_JIT)
def _pack_masks(masks, m, packed, byte_lo):
    """Byte masks (T, m) of 0/1 -> bits: element 8k+b at bit b of byte k (numpy little-endian).
    Eight mask bytes read as one little-endian uint64, times _BIT_GATHER, hold the byte in their
    top eight bits."""
    full = m // 8
    for t in range(masks.shape[0]):
        words, out = masks[t, : 8 * full].view(np.uint64), packed[t, byte_lo : byte_lo + (m + 7) // 8]
        for k in range(full):
            out[k] = np.uint8((words[k] * _BIT_GATHER) >> np.uint64(56))
        if m % 8:  # the last, partial byte of the chunk: missing elements are 0 bits
            byte = 0
            for b in range(m % 8):
                byte |= np.int32(masks[t, 8 * full + b]) << b
            out[full] = byte


# The L1 and fidelity sums may be reordered (vectorised); they are compared with the reference to
# a tolerance. The masks computed beside them are comparisons of exact products, which none of
# these flags changes (no `nnan`: a NaN never agrees).
_SUMS = dict(cache=True, nogil=True, fastmath={"reassoc", "nsz", "contract"})


@njit(inline="always")
def _fidelity_terms(uj, oj, on):
    """One element's A, E, D, Z, C terms (fusion.fidelity) in float64, from float32 u and o."""
    u, o = np.float64(uj), np.float64(oj)
    diff = u - o
    return (u * u if on else 0.0, u * diff if on else 0.0, diff * diff if on else 0.0,
            0.0 if on else o * o, o * o)


@njit(inline="always")
def _add_sums(out, a, e, d, z, c):
    out[0] += a
    out[1] += e
    out[2] += d
    out[3] += z
    out[4] += c


@njit(**_SUMS)
def _fidelity_block(u, mask, original, base, lo, m, out):
    """out += A, E, D, Z, C of one block (fusion.fidelity); `original` minus base when one is given."""
    a = e = d = z = c = 0.0
    for j in range(m):
        o = original[j] - base[lo + j] if base.shape[0] else original[j]  # the same float32 rounding
        da, de, dd, dz, dc = _fidelity_terms(u[j], o, mask[j] != 0)
        a, e, d, z, c = a + da, e + de, d + dd, z + dz, c + dc
    _add_sums(out, a, e, d, z, c)


@njit(inline="always")
def _agreement_terms(x, sign, u):
    """Element j of a task's block: whether x agrees strictly with sign, |x| in float64, and |u| in
    float64 where it agrees, else 0. u arrives loaded whatever the mask: no masked loads."""
    size = abs(np.float64(u))
    on = x * sign > 0
    return on, abs(np.float64(x)), size if on else 0.0


@njit(**_SUMS)
def _agreement(row, sign, u, m, mask):
    """One task's block: mask[j] = row[j] agrees strictly with sign[j]; returns the float64 sums
    of |row| (its delta's L1) and of |u| where it agrees (the masked L1)."""
    delta_l1 = masked_l1 = 0.0
    for j in range(m):
        on, size, agreeing = _agreement_terms(row[j], sign[j], u[j])
        mask[j] = np.uint8(on)
        delta_l1, masked_l1 = delta_l1 + size, masked_l1 + agreeing
    return delta_l1, masked_l1


@njit(**_SUMS)
def _agreement_fidelity(row, sign, u, m, mask, original, base, lo, out):
    """_agreement, and the task's fidelity sums against `original` (minus base when one is given)
    added to out, in the same loop."""
    delta_l1 = masked_l1 = a = e = d = z = c = 0.0
    for j in range(m):
        on, size, agreeing = _agreement_terms(row[j], sign[j], u[j])
        mask[j] = np.uint8(on)
        delta_l1, masked_l1 = delta_l1 + size, masked_l1 + agreeing
        o = original[j] - base[lo + j] if base.shape[0] else original[j]
        da, de, dd, dz, dc = _fidelity_terms(u[j], o, on)
        a, e, d, z, c = a + da, e + de, d + dd, z + dz, c + dc
    _add_sums(out, a, e, d, z, c)
    return delta_l1, masked_l1


@njit(**_JIT)
def _elect_block(stage, m, out_lo, scratch, out, b, rounding, f16_table, orig, index, base, quant_block, scales):
    """Elect one block of stacked deltas stage[:, :m] into the outputs at element out_lo."""
    unified, packed, delta_l1, masked_l1, fidelity, drift = out
    measure_drift = drift.shape[0] > 0  # against each task's own row: asked for, or an empty table
    sign, magnitude, spare, masks = scratch
    _elect_sign(stage, m, sign)
    _magnitude(stage, m, sign, magnitude, spare)
    u = unified[out_lo : out_lo + m]
    for j in range(m):
        u[j] = sign[j] * magnitude[j]
    if rounding >= 3:  # int8 / int4 blocks: masked L1 and fidelity see the stored (dequantized) values
        qmax = np.float32(127.0) if rounding == 3 else np.float32(7.0)
        _quantize_block(u, m, quant_block, qmax, scales[out_lo // quant_block :])
    else:
        _round_block(u, m, rounding, f16_table)  # the store's dtype: masked L1 and fidelity see what is stored
    for t in range(stage.shape[0]):
        r = index[t]
        if r == OWN_ROW:
            sums = _agreement_fidelity(stage[t], sign, u, m, masks[t], stage[t], _NO_BASE, 0, fidelity[b, t])
            if measure_drift:  # its row is its original
                drift[b, t, :] = fidelity[b, t, :]
        elif r >= 0:
            sums = _agreement_fidelity(stage[t], sign, u, m, masks[t], orig[r, out_lo : out_lo + m], base, out_lo,
                                       fidelity[b, t])
            if measure_drift:
                _fidelity_block(u, masks[t], stage[t], _NO_BASE, 0, m, drift[b, t])
        elif measure_drift:  # against its own row: a stored task's rebuild from the stored generation
            sums = _agreement_fidelity(stage[t], sign, u, m, masks[t], stage[t], _NO_BASE, 0, drift[b, t])
        else:
            sums = _agreement(stage[t], sign, u, m, masks[t])
        delta_l1[b, t], masked_l1[b, t] = sums
    _pack_masks(masks, m, packed, out_lo // 8)


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
    """One thread's buffers: signs (block,), magnitudes and their spare (block,), byte masks (T, block)."""
    sign = np.empty(block, dtype=np.float32)
    magnitude = np.empty(block, dtype=np.float32)
    spare = np.empty(block, dtype=np.float32)
    masks = np.empty((num_tasks, block), dtype=np.uint8)
    return sign, magnitude, spare, masks


_NO_BASE = np.zeros(0, dtype=np.float32)


# ---- the parallel driver: blocks spread over threads, scratch per thread ------------------------


@njit(parallel=True, **_JIT)
def _unify_pass(stored_u, stored_packed, lam, src, table, base, block, runs, out, rounding, f16_table, orig, index,
                quant_block, scales):
    """elect (no stored task) or the continual step over one chunk: rows are the T_old stored tasks
    rebuilt, then the new rows (minus base), all staged a block at a time into per-thread scratch."""
    num_old, n = stored_packed.shape[0], out[0].shape[0]
    num_tasks = num_old + src.shape[0]
    num_blocks = (n + block - 1) // block
    for run in prange(runs):
        scratch = _new_scratch(num_tasks, block)
        stage = np.empty((num_tasks, block), dtype=np.float32)  # (T, block)
        for b in range(run * num_blocks // runs, (run + 1) * num_blocks // runs):
            lo = b * block
            m = min(block, n - lo)
            _rebuild_block(stored_u, stored_packed, lam, lo, m, stage)
            _stage_rows(src, table, base, lo, m, stage, num_old)
            _elect_block(stage, m, lo, scratch, out, b, rounding, f16_table, orig, index, base, quant_block, scales)


def unify(stored_u, stored_packed, lam, src, table, base, block, out, rounding, f16_table, orig, index,
          quant_block, scales) -> None:
    """One chunk's pass (the arguments of fusion.kernels.cpu's drivers) into `out`; `scales` receives the
    block scales of a quantized u (rounding 3, 4; an empty array otherwise)."""
    runs = max(1, min(-(-out[0].shape[0] // block), 4 * numba.get_num_threads()))  # a few per thread
    _unify_pass(stored_u, stored_packed, lam, src, table, base, block, runs, out, rounding, f16_table, orig, index,
                max(quant_block, 1), scales)


def fidelity_sums(unified: np.ndarray, mask: np.ndarray, original: np.ndarray, out: np.ndarray) -> None:
    """out (5,) += A, E, D, Z, C of float32 u against `original` under the 0/1 byte mask."""
    _fidelity_block(unified, mask, original, _NO_BASE, 0, unified.size, out)
