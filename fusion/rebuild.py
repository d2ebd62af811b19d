"""The store's elementwise chunk work, both ways between weights and deltas, in float32.

- decouple: theta = theta0 + lambda * M * u. `rebuild_flat` is the readable rule
  (fusion.reference.reconstruct, then the base added); `rebuild_flat_fast` does the same in one
  pass over the chunk, reading the packed mask bits in place (numba). Both round like the
  reference: the product `u * float32(lambda)` once, then the sum with theta0 once.
- a new task's delta: `subtract_` computes theta - theta0 in place.

The fast versions run on one thread, without torch's intra-op thread pool: these passes are
memory-bound, and on a busy machine a thread barrier per call costs more than the work.
They are tested bit for bit against the torch versions.
"""

from __future__ import annotations

import numpy as np
import torch

from .reference import reconstruct, unpack_bits

__all__ = ["rebuild_flat", "rebuild_flat_fast", "subtract_"]


def rebuild_flat(base: torch.Tensor, unified: torch.Tensor, packed: torch.Tensor, rescaler: float) -> torch.Tensor:
    """theta0 (n,) + lambda * M * u (n,) with M from packed bits (ceil(n/8),): float32 (n,)."""
    mask = unpack_bits(packed.reshape(1, -1), unified.numel())[0]  # (n,) bool
    return base.float() + reconstruct(unified, mask, rescaler)


try:
    from numba import njit
except ImportError:  # numba missing: the readable version does the same work
    njit = None

if njit is not None:

    @njit(cache=True, nogil=True)
    def _rebuild(base, u, packed, lam, out):  # pragma: no cover - compiled
        zero = np.float32(0.0)
        n = u.shape[0]
        for byte in range((n + 7) >> 3):  # byte by byte, with a select: no branch on random bits
            bits, lo = packed[byte], byte << 3
            for k in range(min(8, n - lo)):
                scaled = u[lo + k] * lam
                # `base + 0` (not a copy) where the mask is off: -0.0 + 0.0 is +0.0, as in the reference
                out[lo + k] = base[lo + k] + (scaled if (bits >> k) & 1 else zero)


    @njit(cache=True, nogil=True)
    def _subtract(out, base):  # pragma: no cover - compiled
        for j in range(out.shape[0]):
            out[j] -= base[j]


def subtract_(out: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """out -= base, in place, for contiguous float32 (n,) tensors: a new task's delta."""
    if njit is None or out.dtype != torch.float32 or base.dtype != torch.float32:
        return out.sub_(base)
    _subtract(out.numpy(), base.contiguous().numpy())
    return out


def rebuild_flat_fast(base: torch.Tensor, unified: torch.Tensor, packed: torch.Tensor, rescaler: float) -> torch.Tensor:
    """`rebuild_flat` in one pass, without temporaries beyond the float32 output."""
    if njit is None:
        return rebuild_flat(base, unified, packed, rescaler)
    out = torch.empty(unified.numel(), dtype=torch.float32)
    lam = np.float32(torch.tensor(rescaler, dtype=torch.float32).item())
    _rebuild(base.float().contiguous().numpy(), unified.float().contiguous().numpy(), packed.contiguous().numpy(),
             lam, out.numpy())
    return out
