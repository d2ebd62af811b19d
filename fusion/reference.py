"""The ConDU rules on flat numpy arrays: the readable specification every fast path is tested against.

Every function here works on one chunk of a flattened tensor. Deltas of T tasks are stacked
as rows, `(T, n)`. The rules (REFERENCE.md, "Unify" and "The continual iteration"):

    s   = sign(sum_i delta_i)      an exact zero sum elects -1 (the official code's rule)
    mu  = max_i |delta_i| over the i with delta_i * s > 0   (0 where none agrees)
    u   = s * mu                   the unified delta
    M_i = delta_i * s > 0          strict: a zero entry never sets a mask
    theta_i = theta0 + lambda_i * M_i * u   (decouple)

Numerics, fixed so that every implementation gives the same bits:
- inputs of any float dtype are computed in float32;
- the election sum runs sequentially in task order, in float32 (a pairwise or vectorised sum
  could round a near-tie to the other sign);
- u is rounded to its storage form before the masked L1 sums, so rescalers rebuild what is stored:
  a float dtype, or block-quantized (`quantize_blocks`: per block of 64 one float32 scale and
  integer codes; u is then the dequantized `code * scale`), the chunk starting at a block boundary;
- a rebuilt delta is `where(M_i, u * float32(lambda_i), 0)`, one rounding; theta0 is added after;
- L1 and fidelity sums are accumulated in float64 and are compared to a tolerance, not bit for bit;
- masks are packed 8 to a byte, element 8j+b at bit b of byte j (numpy's little bit order).

Inputs are float32, float16 or float64 numpy arrays, or `ml_dtypes.bfloat16` arrays.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .dtypes import F32, BlockQuant, as_float32, round_through, unified_form
from .errors import InputError

__all__ = [
    "ChunkResult",
    "Originals",
    "NOT_MEASURED",
    "OWN_ROW",
    "elect_sign",
    "elect",
    "reconstruct",
    "reconstruct_all",
    "continual_chunk",
    "rebuild",
    "fidelity_sums",
    "quantize_blocks",
    "dequantize_blocks",
    "stored_form",
    "pack_bits",
    "unpack_bits",
]


class ChunkResult(NamedTuple):
    """What one unify pass produces for one chunk of one tensor."""

    unified: np.ndarray  # (n,) float32, already rounded to the store's dtype
    packed_masks: np.ndarray  # (T, ceil(n / 8)) uint8, numpy little-endian bit order
    delta_l1: np.ndarray  # (T,) float64: sum |delta_i| over the chunk
    masked_l1: np.ndarray  # (T,) float64: sum |M_i * u| over the chunk
    fidelity: np.ndarray | None = None  # (T, 5) float64 fidelity sums where asked for (zeros elsewhere)
    drift: np.ndarray | None = None  # (T, 5) float64 sums against each task's own input row, when asked for
    scales: np.ndarray | None = None  # (ceil(n / 64),) float32 block scales of a block-quantized u, else None


NOT_MEASURED, OWN_ROW = -1, -2


class Originals(NamedTuple):
    """Which tasks' own deltas a chunk's fidelity sums are measured against.

    `index[i]` for task i of the result: NOT_MEASURED; OWN_ROW, its own row of the new deltas
    (a new task's delta is its original); or r >= 0, row r of `rows` (a stored task whose
    fine-tune is still at hand). With `base` given, `rows` hold fine-tuned weights as well.

    `drift=True` also asks for every task's sums against the row it entered the pass as
    (`ChunkResult.drift`): a stored task's rebuild from the stored generation, a new task's delta.
    They say how far a change moves each stored task's rebuild (fusion.store.guard).
    """

    rows: np.ndarray  # (R, n)
    index: np.ndarray  # (T,) int64
    drift: bool = False


# ---- unify ----------------------------------------------------------------------------------------


def elect_sign(deltas: np.ndarray) -> np.ndarray:
    """Sign of the sequential float32 sum over tasks; an exact zero elects -1."""
    deltas = as_float32(deltas)  # (T, n)
    total = deltas[0].copy()  # (n,)
    with np.errstate(invalid="ignore"):  # inf - inf is NaN, which elects -1 as any sum that is not > 0
        for row in deltas[1:]:
            total += row  # one float32 rounding per task, in task order
    return np.where(total > 0, np.float32(1.0), np.float32(-1.0))  # (n,)


def agreement_masks(deltas: np.ndarray, sign: np.ndarray) -> np.ndarray:
    """M_i: strict agreement of each task's entry with the elected sign (a zero never agrees)."""
    return ((deltas > 0) & (sign > 0)) | ((deltas < 0) & (sign < 0))  # (T, n) bool


def task_deltas(rows: np.ndarray, base: np.ndarray | None) -> np.ndarray:
    """Rows as float32 deltas: `rows - base` (one rounding) when they are fine-tuned weights."""
    rows = as_float32(rows)  # (T, n)
    return rows if base is None else rows - as_float32(base)  # (T, n)


def elect(deltas: np.ndarray, *, unified_dtype=F32, base: np.ndarray | None = None,
          originals: Originals | None = None) -> ChunkResult:
    """Unify stacked deltas `(T, n)`: elect signs and magnitudes, derive masks and L1 sums.

    `unified_dtype` (a fusion.dtypes.DType, a BlockQuant, or a name: fusion.dtypes.unified_form) is
    how the unified delta is stored; the masked L1 sums are taken on the stored (rounded) values, and
    a block-quantized u comes with its block scales (`scales`). With `base` (n,), the rows
    are fine-tuned weights and their deltas are `rows - base`. With `originals`, the result
    carries each measured task's fidelity sums.
    """
    if np.ndim(deltas) != 2 or len(deltas) == 0:
        raise InputError(f"elect expects stacked deltas of shape (T, n) with T >= 1, got {np.shape(deltas)}; "
                         "stack one flattened chunk per task as rows")
    deltas = task_deltas(deltas, base)  # (T, n)
    sign = elect_sign(deltas)  # (n,)
    masks = agreement_masks(deltas, sign)  # (T, n)
    # Magnitude: the largest agreeing |delta| (0 where none agrees).
    magnitude = np.where(masks, np.abs(deltas), np.float32(0.0)).max(axis=0)  # (n,)
    unified, scales = stored_form(sign * magnitude, unified_dtype)  # (n,) as stored
    # L1 sums for the rescalers, in float64.
    delta_l1 = np.abs(deltas.astype(np.float64)).sum(axis=1)  # (T,)
    masked_l1 = np.where(masks, np.abs(unified), np.float32(0.0)).astype(np.float64).sum(axis=1)  # (T,)
    packed = pack_bits(masks)
    fidelity = None if originals is None else fidelity_table(unified, packed, deltas, originals, base)
    drift = drift_table(unified, packed, deltas) if originals is not None and originals.drift else None
    return ChunkResult(unified, packed, delta_l1, masked_l1, fidelity, drift, scales)


# ---- the stored form of u -----------------------------------------------------------------------------


def stored_form(unified: np.ndarray, form) -> tuple[np.ndarray, np.ndarray | None]:
    """u (n,) float32 as its storage form keeps it, and the block scales of a quantized form (else None)."""
    form = unified_form(form)
    if isinstance(form, BlockQuant):
        codes, scales = quantize_blocks(unified, form)
        return dequantize_blocks(codes, scales, form), scales
    return round_through(unified, form), None


# The smallest normal float32: a block whose scale would be smaller is stored as zeros, so every
# scale is 0 or normal and `code * scale` never lands among subnormals (which hardware may flush).
_SMALLEST_SCALE = np.float32(2.0**-126)


def quantize_blocks(x: np.ndarray, form: BlockQuant) -> tuple[np.ndarray, np.ndarray]:
    """float32 x (n,), from a block boundary on -> int8 codes (n,) and float32 scales (ceil(n/block),).

    Per block: scale = float32(max |x| / qmax) (0 when that is below the smallest normal float32),
    code = clip(rint(x / scale), -qmax, qmax) rounding half to even (0 where the scale is 0). Every
    step is one float32 operation, so every implementation gives the same codes and scales. The
    block's largest |x| codes to +-qmax exactly."""
    x = as_float32(x).reshape(-1)  # (n,)
    n, block = x.size, form.block
    padded = np.zeros(-(-n // block) * block, dtype=np.float32)
    padded[:n] = x
    blocks = padded.reshape(-1, block)  # (nb, block); the padding's zeros change no block's maximum
    scales = np.abs(blocks).max(axis=1) / np.float32(form.qmax)  # (nb,) float32
    scales = np.where(scales >= _SMALLEST_SCALE, scales, np.float32(0.0)).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1.0))[:, None]  # (nb, 1); zero blocks divide by 1, then clip to 0
    with np.errstate(invalid="ignore"):  # a non-finite block gives NaN codes: the pass refuses its u
        steps = np.rint(blocks / safe) * (scales[:, None] > 0)  # (nb, block) float32
    codes = np.clip(np.nan_to_num(steps), -form.qmax, form.qmax).astype(np.int8)
    return codes.reshape(-1)[:n], scales


def dequantize_blocks(codes: np.ndarray, scales: np.ndarray, form: BlockQuant) -> np.ndarray:
    """The values codes (n,) and scales (ceil(n/block),) stand for: float32(code) * scale, one rounding."""
    n = np.size(codes)
    per_element = np.repeat(np.asarray(scales, dtype=np.float32), form.block)[:n]  # (n,)
    return np.asarray(codes, dtype=np.float32) * per_element  # (n,) float32


# ---- decouple ---------------------------------------------------------------------------------------


def reconstruct(unified: np.ndarray, mask: np.ndarray, rescaler: float) -> np.ndarray:
    """Decouple one task: `where(M, u * float32(lambda), 0)`, float32 (n,). `mask` is bool (n,)."""
    scaled = as_float32(unified) * np.float32(rescaler)  # (n,) one rounding
    return np.where(mask, scaled, np.float32(0.0))  # (n,)


def reconstruct_all(unified: np.ndarray, packed_masks: np.ndarray, rescalers: np.ndarray) -> np.ndarray:
    """Decouple every stored task of a chunk: `(T, n)` from u (n,), packed masks and (T,) rescalers."""
    n = np.size(unified)
    masks = unpack_bits(packed_masks, n)  # (T, n) bool
    rows = [reconstruct(unified, masks[i], float(rescalers[i])) for i in range(len(masks))]
    return np.stack(rows) if rows else np.zeros((0, n), dtype=np.float32)  # (T, n)


def continual_chunk(unified: np.ndarray, packed_masks: np.ndarray, rescalers: np.ndarray,
                    new_deltas: np.ndarray, *, unified_dtype=F32, base: np.ndarray | None = None,
                    originals: Originals | None = None) -> ChunkResult:
    """The ConDU step on one chunk: rebuild the stored tasks, then unify them with the new ones.

    unified (n,), packed_masks (T_old, ceil(n/8)) uint8, rescalers (T_old,), new_deltas (T_new, n)
    (fine-tuned weights with `base`, as in `elect`). T_new may be 0: that re-unifies the stored
    tasks alone (used by `remove` and to study convergence). Row order of the result: stored
    tasks first, then the new ones.
    """
    n = np.size(unified)
    rebuilt = reconstruct_all(unified, packed_masks, rescalers)  # (T_old, n)
    stacked = np.concatenate([rebuilt, task_deltas(np.reshape(new_deltas, (-1, n)), base)])  # (T, n)
    shifted = None if originals is None else _shifted(originals, base)
    return elect(stacked, unified_dtype=unified_dtype, originals=shifted)


def rebuild(base: np.ndarray, unified: np.ndarray, packed: np.ndarray, rescaler: float) -> np.ndarray:
    """A decoupled weight chunk: theta0 (n,) + lambda * M * u (n,), M from packed bits (ceil(n/8),).

    float32 (n,): the product rounds once, the sum with theta0 once. Where the mask is off the sum
    is `theta0 + 0.0`, which turns a -0.0 of theta0 into +0.0.
    """
    mask = unpack_bits(np.reshape(packed, (1, -1)), np.size(unified))[0]  # (n,) bool
    return as_float32(base) + reconstruct(unified, mask, rescaler)  # (n,)


# ---- fidelity ----------------------------------------------------------------------------------------


def fidelity_sums(unified: np.ndarray, packed: np.ndarray, original: np.ndarray) -> np.ndarray:
    """(5,) float64 sums A, E, D, Z, C of one chunk: u (n,), one task's packed mask, its delta o (n,).

    A = sum_M u^2, E = sum_M u (u - o), D = sum_M (u - o)^2, Z = sum_~M o^2, C = sum o^2
    (fusion.fidelity.finish turns the totals into a cosine and a relative L2 error).
    """
    mask = unpack_bits(np.reshape(packed, (1, -1)), np.size(unified))[0]  # (n,) bool
    u, o = as_float32(unified).astype(np.float64), as_float32(original).astype(np.float64)  # (n,)
    um, om = u[mask], o[mask]
    with np.errstate(invalid="ignore", over="ignore"):  # a non-finite original gives NaN sums; callers refuse it
        return np.array([(um * um).sum(), (um * (um - om)).sum(), ((um - om) ** 2).sum(),
                         (o[~mask] ** 2).sum(), (o * o).sum()])  # (5,)


def fidelity_table(unified: np.ndarray, packed_masks: np.ndarray, deltas: np.ndarray, originals: Originals,
                   base: np.ndarray | None) -> np.ndarray:
    """(T, 5) fidelity sums: each measured task's rebuilt delta against its own original delta."""
    table = np.zeros((len(packed_masks), 5), dtype=np.float64)  # (T, 5)
    for i, r in enumerate(np.asarray(originals.index)):
        if r != NOT_MEASURED:
            original = deltas[i] if r == OWN_ROW else task_deltas(originals.rows[r : r + 1], base)[0]  # (n,)
            table[i] = fidelity_sums(unified, packed_masks[i], original)
    return table


def drift_table(unified: np.ndarray, packed_masks: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """(T, 5) sums of each task's new rebuild against the row it was unified from, `deltas[i]`."""
    return np.stack([fidelity_sums(unified, packed_masks[i], deltas[i]) for i in range(len(deltas))])  # (T, 5)


def _shifted(originals: Originals, base: np.ndarray | None) -> Originals:
    """The originals of a continual step as `elect` on the stacked (already subtracted) rows sees them."""
    return originals._replace(rows=task_deltas(originals.rows, base))


# ---- mask bits ---------------------------------------------------------------------------------------


def pack_bits(masks: np.ndarray) -> np.ndarray:
    """Bool `(T, n)` -> uint8 `(T, ceil(n/8))`; element 8j+b sits at bit b of byte j."""
    return np.packbits(np.asarray(masks, dtype=bool), axis=1, bitorder="little")  # (T, n/8)


def unpack_bits(packed: np.ndarray, n: int) -> np.ndarray:
    """uint8 `(T, ceil(n/8))` -> bool `(T, n)`, the inverse of `pack_bits`."""
    return np.unpackbits(packed, axis=1, count=n, bitorder="little").astype(bool)  # (T, n)
