"""Kernel dispatch: the same two chunk operations, implemented three ways.

A kernel is any object with
    elect(deltas (T, n), *, unified_dtype) -> ChunkResult
    continual(unified (n,), packed_masks (T_old, n/8), rescalers (T_old,), new_deltas (T_new, n),
              *, unified_dtype) -> ChunkResult
`reference` is the readable specification (fusion.reference); `cpu` and `triton` are fast paths
proven equal to it by property tests (masks and signs bit for bit, L1 sums to float tolerance).
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import torch

from .. import reference

__all__ = ["KERNELS", "get_kernel", "default_kernel_name"]

KERNELS = ("reference", "cpu", "triton")

REFERENCE = SimpleNamespace(name="reference", elect=reference.elect, continual=reference.continual_chunk)


def _load(name: str):
    if name == "reference":
        return REFERENCE
    module = importlib.import_module(f"{__name__}.{'cpu' if name == 'cpu' else 'triton_kernels'}")
    return module.KERNEL


def default_kernel_name(device: torch.device | str = "cpu") -> str:
    """The fastest kernel for a device: Triton on CUDA, the chunked CPU path otherwise."""
    return "triton" if torch.device(device).type == "cuda" else "cpu"


def get_kernel(name: str | None = None, *, device: torch.device | str = "cpu"):
    """Return a kernel by name (`reference`, `cpu`, `triton`), or the fastest one for `device`."""
    if name is None:
        try:
            return _load(default_kernel_name(device))
        except ImportError:  # Triton not installed: the CPU path still works everywhere
            return _load("cpu")
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; use one of {', '.join(KERNELS)}")
    return _load(name)
