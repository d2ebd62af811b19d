"""Checkpoint I/O on numpy: strict safetensors reading slice by slice, streaming atomic writing,
and block checksums computed as files are written and checked as they are read.

    format      the safetensors header, parsed strictly and encoded exactly
    integrity   block checksums (XXH3): FileDigests, BlockHasher, IntegrityError
    reader      SafetensorsFile: lazy, checked (or recording) slice reads
    checkpoint  Checkpoint: a file, a (sharded) Hugging Face model folder, or a PEFT adapter folder
    adapter     a PEFT adapter's config (the fields that fix its factors) and its tensors' roles
    writer      SafetensorsWriter, ShardedWriter, save: streaming, atomic, checksummed
    files       fsync, atomic small files, a model folder's side files
"""

from __future__ import annotations

import os

import numpy as np

from .checkpoint import HF_INDEX, HF_WEIGHTS, Checkpoint, open_checkpoint
from .format import TensorInfo
from .integrity import FileDigests, IntegrityError
from .reader import SafetensorsFile
from .writer import SafetensorsWriter, ShardedWriter, save

__all__ = ["Checkpoint", "FileDigests", "HF_INDEX", "HF_WEIGHTS", "IntegrityError", "SafetensorsFile",
           "SafetensorsWriter", "ShardedWriter", "TensorInfo", "load", "open_checkpoint", "save", "as_array"]


def as_array(raw: np.ndarray, dtype) -> np.ndarray:
    """Stored values as the numpy array a user expects: bfloat16 and float8 as `ml_dtypes` types."""
    if raw.dtype.kind == "u" and dtype.is_float:  # held as bits: give them their float type
        import ml_dtypes  # only when such a tensor is asked for: it takes about a second to import

        return raw.view(getattr(ml_dtypes, dtype.name))
    return raw


def load(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint (a file or a model folder), in memory, as numpy arrays."""
    with open_checkpoint(path) as checkpoint:
        return {name: as_array(checkpoint.read(name), checkpoint.info(name).dtype) for name in checkpoint.keys()}
