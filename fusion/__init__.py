"""ConDU model fusion: one unified delta plus a bit mask and a rescaler per task.

Layers, inside out: `reference` (the rules on flat tensors), `kernels` (the same, fast),
`engine` (one streaming pass over many tensors), `fuse` (in-memory state dicts).
"""

from .engine import DEFAULT_CHUNK, L1Tables, StoredChunk, TensorSpec, chunk_ranges, fuse_pass
from .fuse import FusedDeltas, add, apply_delta, is_fusable, remove, task_delta, unify
from .kernels import KERNELS, get_kernel
from .reference import ChunkResult, pack_bits, unpack_bits
from .rescale import RESCALER_MODES, compute_rescalers
from .store import Store, StoreLockedError, TaskRecord
from . import hub, io

__version__ = "0.1.0"

__all__ = [
    "ChunkResult",
    "DEFAULT_CHUNK",
    "FusedDeltas",
    "KERNELS",
    "L1Tables",
    "RESCALER_MODES",
    "Store",
    "StoreLockedError",
    "StoredChunk",
    "TaskRecord",
    "TensorSpec",
    "add",
    "apply_delta",
    "chunk_ranges",
    "compute_rescalers",
    "fuse_pass",
    "get_kernel",
    "hub",
    "io",
    "is_fusable",
    "pack_bits",
    "remove",
    "task_delta",
    "unify",
    "unpack_bits",
]
