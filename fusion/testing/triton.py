"""The Triton kernel module for tests: compiled on CUDA, interpreted (TRITON_INTERPRET=1) elsewhere.

Triton reads TRITON_INTERPRET when a @triton.jit decorator runs, so without CUDA the kernel
module is imported (or reloaded) with the variable set, and the variable is restored right
after: other test modules see the environment they started with. Triton itself must already
be imported, as the environment had it (a triton imported under the variable breaks once it
is unset).
"""

from __future__ import annotations

import importlib
import os

__all__ = ["kernel_module"]

MODULE = "fusion.kernels.triton_kernels"


def kernel_module():
    """fusion.kernels.triton_kernels, interpreted when there is no CUDA."""
    import torch

    if torch.cuda.is_available():
        return importlib.import_module(MODULE)
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        module = importlib.import_module(MODULE)
        if not module.is_interpreted():  # imported earlier without the interpreter
            module = importlib.reload(module)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return module
