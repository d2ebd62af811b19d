"""Names shared by the library, the `condu-fuse` command and `cl_driver`: each defined here once."""

from __future__ import annotations

__all__ = ["RESCALER_MODES", "KERNELS", "MISSING_MODES"]

# How a task's rescaler is taken (fusion.rescale): the paper's whole-model scalar, the official
# code's sum of per-tensor means, or one per tensor.
RESCALER_MODES = ("model", "tensor-mean", "tensor")

# Implementations of the chunk operations (fusion.kernels): the readable numpy rules, C (or numba)
# on CPU threads, Triton on CUDA.
KERNELS = ("reference", "cpu", "triton")

# What a fine-tune lacking a base tensor means: an error, or an unchanged tensor (a zero delta).
MISSING_MODES = ("error", "zero")
