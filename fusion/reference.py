"""The ConDU rules on flat tensors: the readable specification every fast path is tested against.

Every function here works on one chunk of a flattened tensor. Deltas of T tasks are stacked
as rows, `(T, n)`. The rules (REFERENCE.md, "Unify" and "The continual iteration"):

    s   = sign(sum_i delta_i)      an exact zero sum elects -1 (the official code's rule)
    mu  = max_i |delta_i| over the i with delta_i * s > 0   (0 where none agrees)
    u   = s * mu                   the unified delta
    M_i = delta_i * s > 0          strict: a zero entry never sets a mask

Numerics, fixed so that every implementation gives the same bits:
- inputs of any float dtype are computed in float32;
- the election sum runs sequentially in task order, in float32 (a pairwise or vectorised sum
  could round a near-tie to the other sign);
- a rebuilt delta is `where(M_i, u * float32(lambda_i), 0)`, one rounding;
- L1 sums are accumulated in float64 and are compared to a tolerance, not bit for bit.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "ChunkResult",
    "elect_sign",
    "elect",
    "reconstruct",
    "reconstruct_all",
    "continual_chunk",
    "pack_bits",
    "unpack_bits",
]


class ChunkResult(NamedTuple):
    """What one unify pass produces for one chunk of one tensor."""

    unified: torch.Tensor  # (n,) float32, already rounded to the store's dtype
    packed_masks: torch.Tensor  # (T, ceil(n / 8)) uint8, numpy little-endian bit order
    delta_l1: torch.Tensor  # (T,) float64: sum |delta_i| over the chunk
    masked_l1: torch.Tensor  # (T,) float64: sum |M_i * u| over the chunk


def elect_sign(deltas: torch.Tensor) -> torch.Tensor:
    """Sign of the sequential float32 sum over tasks; an exact zero elects -1."""
    deltas = deltas.float()  # (T, n)
    total = deltas[0].clone()  # (n,)
    for row in deltas[1:]:
        total += row
    return torch.where(total > 0, 1.0, -1.0)  # (n,)


def elect(deltas: torch.Tensor, *, unified_dtype: torch.dtype = torch.float32) -> ChunkResult:
    """Unify stacked deltas `(T, n)`: elect signs and magnitudes, derive masks and L1 sums.

    `unified_dtype` is the dtype the unified delta is stored in; the masked L1 sums are taken
    on the stored (rounded) values so that rescalers rebuild exactly what is on disk.
    """
    if deltas.dim() != 2:
        raise ValueError(f"elect expects stacked deltas of shape (T, n), got {tuple(deltas.shape)}")
    deltas = deltas.float()  # (T, n)
    sign = elect_sign(deltas)  # (n,)
    # Masks: strict agreement with the elected sign.
    masks = ((deltas > 0) & (sign > 0)) | ((deltas < 0) & (sign < 0))  # (T, n) bool
    # Magnitude: the largest agreeing |delta|.
    magnitude = torch.where(masks, deltas.abs(), 0.0).amax(dim=0)  # (n,)
    unified = (sign * magnitude).to(unified_dtype).float()  # (n,)
    # L1 sums for the rescalers, in float64.
    delta_l1 = deltas.double().abs().sum(dim=1)  # (T,)
    masked_l1 = torch.where(masks, unified.abs(), 0.0).double().sum(dim=1)  # (T,)
    return ChunkResult(unified, pack_bits(masks), delta_l1, masked_l1)


def reconstruct(unified: torch.Tensor, mask: torch.Tensor, rescaler: float) -> torch.Tensor:
    """Decouple one task: `lambda * M * u`, in float32. `mask` is bool `(n,)`."""
    scaled = unified.float() * torch.tensor(rescaler, dtype=torch.float32)  # (n,)
    return torch.where(mask, scaled, 0.0)  # (n,)


def reconstruct_all(unified: torch.Tensor, packed_masks: torch.Tensor, rescalers: torch.Tensor) -> torch.Tensor:
    """Decouple every stored task of a chunk: `(T, n)` from `u (n,)`, packed masks and `(T,)` rescalers."""
    n = unified.numel()
    masks = unpack_bits(packed_masks, n)  # (T, n) bool
    rows = [reconstruct(unified, masks[i], float(rescalers[i])) for i in range(masks.shape[0])]
    return torch.stack(rows) if rows else unified.new_zeros((0, n), dtype=torch.float32)


def continual_chunk(
    unified: torch.Tensor,
    packed_masks: torch.Tensor,
    rescalers: torch.Tensor,
    new_deltas: torch.Tensor,
    *,
    unified_dtype: torch.dtype = torch.float32,
) -> ChunkResult:
    """The ConDU step on one chunk: rebuild the stored tasks, then unify them with the new ones.

    unified (n,), packed_masks (T_old, ceil(n/8)) uint8, rescalers (T_old,), new_deltas (T_new, n).
    T_new may be 0: that re-unifies the stored tasks alone (used by `remove` and to study
    convergence). Row order of the result: stored tasks first, then the new ones.
    """
    rebuilt = reconstruct_all(unified, packed_masks, rescalers)  # (T_old, n)
    stacked = torch.cat([rebuilt, new_deltas.float().reshape(-1, unified.numel())])  # (T, n)
    return elect(stacked, unified_dtype=unified_dtype)


def pack_bits(masks: torch.Tensor) -> torch.Tensor:
    """Bool `(T, n)` -> uint8 `(T, ceil(n/8))`; element 8j+b sits at bit b of byte j."""
    t, n = masks.shape
    padded = torch.zeros((t, -(-n // 8) * 8), dtype=torch.uint8)
    padded[:, :n] = masks.to(torch.uint8)
    weights = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8)  # (8,)
    # Explicit sizes, not -1: a view of zero tasks cannot infer its width.
    return (padded.view(t, padded.shape[1] // 8, 8) * weights).sum(dim=2, dtype=torch.uint8)  # (T, n/8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 `(T, ceil(n/8))` -> bool `(T, n)`, the inverse of `pack_bits`."""
    shifts = torch.arange(8, dtype=torch.uint8)  # (8,)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # (T, n/8, 8)
    return bits.reshape(packed.shape[0], packed.shape[1] * 8)[:, :n].bool()  # (T, n)
