"""How well a rebuilt delta `lambda * M * u` matches the original delta `o` of its task.

The rescaler is only known after the whole pass, so the pass accumulates, per task and tensor,
sums that do not depend on it (float64; `fusion.reference.fidelity_sums` and the kernels'
`fidelity_sums` give them chunk by chunk), and the statistics are finished afterwards:

    A = sum_M u^2       E = sum_M u (u - o)      D = sum_M (u - o)^2
    Z = sum_~M o^2      C = sum o^2

    ||lambda M u - o||^2 = (lambda - 1)^2 A + 2 (lambda - 1) E + D + Z
    <lambda M u, o>      = lambda (A - E)          ||lambda M u||^2 = lambda^2 A

Written around lambda = 1 this has no cancellation where the rebuild is exact (one task:
lambda = 1, u = o on the mask, o = 0 off it, so the error is D + Z = 0 exactly).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["NUM_SUMS", "finish"]

NUM_SUMS = 5  # A, E, D, Z, C


def finish(sums: np.ndarray, rescalers: np.ndarray) -> tuple[float, float | None]:
    """cosine and relative L2 error of one task from its (K, 5) sums and its (K,) rescalers."""
    lam = np.asarray(rescalers, dtype=np.float64).astype(np.float32).astype(np.float64)  # (K,) as decouple multiplies
    a, e, d, z, c = np.asarray(sums, dtype=np.float64).T  # each (K,)
    error2 = float(((lam - 1) ** 2 * a + 2 * (lam - 1) * e + d + z).sum())
    dot, hat2, orig2 = float((lam * (a - e)).sum()), float((lam * lam * a).sum()), float(c.sum())
    if hat2 == 0 or orig2 == 0:
        cosine = 1.0 if hat2 == orig2 else 0.0
    else:
        cosine = max(-1.0, min(1.0, dot / math.sqrt(hat2 * orig2)))
    rel_l2 = math.sqrt(max(error2, 0.0) / orig2) if orig2 > 0 else (0.0 if hat2 == 0 else None)
    return cosine, rel_l2
