"""How well a rebuilt delta `lambda * M * u` matches the original delta `o` of its task.

The rescaler is only known after the whole pass, so the pass accumulates, per task and tensor,
sums that do not depend on it (float64), and the statistics are finished afterwards:

    A = sum_M u^2       E = sum_M u (u - o)      D = sum_M (u - o)^2
    Z = sum_~M o^2      C = sum o^2

    ||lambda M u - o||^2 = (lambda - 1)^2 A + 2 (lambda - 1) E + D + Z
    <lambda M u, o>      = lambda (A - E)          ||lambda M u||^2 = lambda^2 A

Written around lambda = 1 this has no cancellation where the rebuild is exact (one task:
lambda = 1, u = o on the mask, o = 0 off it, so the error is D + Z = 0 exactly).

`chunk_sums` is the readable version; `chunk_sums_fast` does the same in one pass over the
chunk (numba), and is tested equal to it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .reference import unpack_bits

__all__ = ["NUM_SUMS", "chunk_sums", "chunk_sums_fast", "finish"]

NUM_SUMS = 5  # A, E, D, Z, C


def chunk_sums(unified: torch.Tensor, packed: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """(5,) float64 sums A, E, D, Z, C of one chunk: u (n,), packed mask (ceil(n/8),), o (n,)."""
    n = unified.numel()
    mask = unpack_bits(packed.reshape(1, -1), n)[0]  # (n,) bool
    u, o = unified.double(), original.double()  # (n,)
    um, om = u[mask], o[mask]
    return torch.stack([(um * um).sum(), (um * (um - om)).sum(), ((um - om) ** 2).sum(),
                        (o[~mask] ** 2).sum(), (o * o).sum()])


try:
    from numba import njit
except ImportError:  # numba missing: the readable version does the same work
    njit = None

if njit is not None:

    # The sums may be reordered (vectorised); they are compared with the reference to a tolerance.
    @njit(cache=True, nogil=True, fastmath={"reassoc", "nsz", "contract"})
    def _sums(u, packed, o, out):  # pragma: no cover - compiled
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


def chunk_sums_fast(unified: torch.Tensor, packed: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """`chunk_sums` in one pass, without temporaries of the chunk's size."""
    if njit is None:
        return chunk_sums(unified, packed, original)
    out = np.zeros(NUM_SUMS, dtype=np.float64)
    _sums(unified.float().contiguous().numpy(), packed.contiguous().numpy(), original.float().contiguous().numpy(), out)
    return torch.from_numpy(out)


def finish(sums: torch.Tensor, rescalers: torch.Tensor) -> tuple[float, float | None]:
    """cosine and relative L2 error of one task from its (K, 5) sums and its (K,) rescalers."""
    lam = rescalers.float().double()  # (K,) the float32 value decouple multiplies by
    a, e, d, z, c = sums.double().unbind(dim=1)  # each (K,)
    error2 = float(((lam - 1) ** 2 * a + 2 * (lam - 1) * e + d + z).sum())
    dot, hat2, orig2 = float((lam * (a - e)).sum()), float((lam * lam * a).sum()), float(c.sum())
    if hat2 == 0 or orig2 == 0:
        cosine = 1.0 if hat2 == orig2 else 0.0
    else:
        cosine = max(-1.0, min(1.0, dot / math.sqrt(hat2 * orig2)))
    rel_l2 = math.sqrt(max(error2, 0.0) / orig2) if orig2 > 0 else (0.0 if hat2 == 0 else None)
    return cosine, rel_l2
