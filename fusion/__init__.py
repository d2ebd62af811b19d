"""ConDU model fusion: one unified delta plus a bit mask and a rescaler per task.

Layers, inside out: `reference` (the rules on flat numpy arrays), `kernels` (the same, fast:
numba on CPU, Triton on CUDA), `engine` (one streaming pass over many tensors), `fuse`
(in-memory state dicts of numpy arrays or torch tensors). The CPU path imports no framework.
Everything else stays importable from its module.
"""

from .constants import KERNELS, MISSING_MODES, RESCALER_MODES
from .fuse import FusedDeltas, add, apply_delta, is_fusable, remove, task_delta, unify
from .kernels import get_kernel, preload

__version__ = "0.1.0"

__all__ = [
    "FusedDeltas",
    "KERNELS",
    "MISSING_MODES",
    "RESCALER_MODES",
    "add",
    "apply_delta",
    "get_kernel",
    "is_fusable",
    "preload",
    "remove",
    "task_delta",
    "unify",
]
