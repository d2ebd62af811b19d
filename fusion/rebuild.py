"""The store's elementwise chunk work, both ways between weights and deltas, in float32.

- decouple: theta = theta0 + lambda * M * u. `rebuild_flat` is the readable rule
  (fusion.reference.reconstruct, then the base added); `rebuild_flat_fast` does the same with
  numpy on the packed mask bits. Both round like the reference: the product `u * float32(lambda)`
  once, then the sum with theta0 once.
- a new task's delta: `subtract_` computes theta - theta0 in place.

The fast versions run on one thread, in numpy, without torch's intra-op thread pool: these
passes are memory-bound, and on a busy machine a thread barrier per call costs more than the
work (measured: a 1M-element `sub_` took 23 ms with two threads, 1.2 ms with one). They need no
compilation either, so a short `decouple` does not pay a JIT's start-up. They are tested bit for
bit against the torch versions.
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


def rebuild_flat_fast(base: torch.Tensor, unified: torch.Tensor, packed: torch.Tensor, rescaler: float, *,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """`rebuild_flat` in numpy, in place in `out` (float32 (n,), reused by the caller) if given."""
    n = unified.numel()
    lam = np.float32(torch.tensor(rescaler, dtype=torch.float32).item())
    bits = np.unpackbits(packed.contiguous().numpy(), count=n, bitorder="little")  # (n,) uint8 0/1
    keep = np.negative(bits, dtype=np.int32)  # (n,) all 32 bits set where the mask is on, else none
    result = np.empty(n, dtype=np.float32) if out is None else out.numpy()
    np.multiply(unified.float().contiguous().numpy(), lam, out=result)  # u * lambda, one rounding
    # where(M, u * lambda, +0.0) exactly, as a bit mask (a select in numpy is several times slower)
    np.bitwise_and(result.view(np.int32), keep, out=result.view(np.int32))
    # `base + 0` (not a copy) where the mask is off: -0.0 + 0.0 is +0.0, as in the reference
    np.add(base.float().contiguous().numpy(), result, out=result)
    return torch.from_numpy(result) if out is None else out


def subtract_(out: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """out -= base, in place, for contiguous (n,) tensors of one dtype: a new task's delta."""
    if out.dtype != base.dtype or not out.is_contiguous():
        return out.sub_(base)
    np.subtract(out.numpy(), base.contiguous().numpy(), out=out.numpy())
    return out
