"""The reference kernel: the readable numpy rules of `fusion.reference` behind the kernel contract.

It needs no compilation, so it starts at once; for small work it is the fastest kernel there is
(`fusion.kernels.SMALL_WORK`).
"""

from __future__ import annotations

import numpy as np

from .. import reference
from ..dtypes import F32
from ..reference import ChunkResult

__all__ = ["ReferenceKernel", "KERNEL"]


class ReferenceKernel:
    """`fusion.reference` as a kernel: numpy arrays in, numpy arrays out."""

    name = "reference"

    def elect(self, deltas: np.ndarray, *, unified_dtype=F32, base=None, originals=None) -> ChunkResult:
        return reference.elect(deltas, unified_dtype=unified_dtype, base=base, originals=originals)

    def continual(self, unified: np.ndarray, packed_masks: np.ndarray, rescalers: np.ndarray,
                  new_deltas: np.ndarray, *, unified_dtype=F32, base=None, originals=None) -> ChunkResult:
        return reference.continual_chunk(unified, packed_masks, rescalers, new_deltas, unified_dtype=unified_dtype,
                                         base=base, originals=originals)

    def rebuild(self, base: np.ndarray, unified: np.ndarray, packed: np.ndarray, rescaler: float, *,
                out: np.ndarray | None = None) -> np.ndarray:
        result = reference.rebuild(base, unified, packed, rescaler)  # (n,) float32
        if out is None:
            return result
        out[...] = result
        return out

    def fidelity_sums(self, unified: np.ndarray, packed: np.ndarray, original: np.ndarray) -> np.ndarray:
        return reference.fidelity_sums(unified, packed, original)

    def __repr__(self) -> str:
        return "ReferenceKernel()"


KERNEL = ReferenceKernel()
