"""Tiny checkpoints on disk for store and I/O tests: a base, fine-tunes of it, in every layout.

Layouts: `file` (one .safetensors), `folder` (a Hugging Face folder with model.safetensors, a
config.json and a tokenizer_config.json), `sharded` (model-0000k-of-0000n.safetensors plus
model.safetensors.index.json). Values are small integers times 2**-6, so deltas are exact in
every float dtype and hold exact zeros and sign ties. Arrays are numpy float32 (int64 for the
`position_ids` buffer); `write_checkpoint` stores float tensors in any dtype, bfloat16 included.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from ..dtypes import DType, dtype_of, from_float32, parse_dtype
from ..io import SafetensorsWriter

__all__ = ["SHAPES", "tiny_base", "tiny_finetune", "write_checkpoint", "snapshot"]

SHAPES = {"embed.weight": (12, 8), "layer.0.weight": (8, 8), "layer.0.bias": (8,), "norm.weight": (8,),
          "head.weight": (3, 8)}


def tiny_base(*, seed: int = 0, shapes: Mapping[str, tuple] = SHAPES, buffers: bool = True) -> dict[str, np.ndarray]:
    """A base state dict: float32 tensors of `shapes` and an int64 `position_ids` buffer."""
    rng = np.random.default_rng(seed)
    tensors = {name: (rng.integers(-64, 65, shape) / 64).astype(np.float32) for name, shape in shapes.items()}
    if buffers:
        tensors["position_ids"] = np.arange(6, dtype=np.int64)
    return tensors


def tiny_finetune(base: Mapping[str, np.ndarray], *, seed: int, zero_fraction: float = 0.3) -> dict[str, np.ndarray]:
    """base + a sparse delta of small multiples of 2**-6 on every float tensor; buffers copied."""
    rng = np.random.default_rng(1000 + seed)
    out = {}
    for name, t in base.items():
        if t.dtype.kind != "f":
            out[name] = t.copy()
            continue
        delta = rng.integers(-8, 9, t.shape) / 64
        delta = np.where(rng.random(t.shape) < zero_fraction, 0.0, delta)
        out[name] = (t + delta).astype(np.float32)
    return out


def _write_file(tensors: Mapping[str, np.ndarray], path: Path, dtype: DType | None, metadata=None) -> None:
    """Float tensors in `dtype` (default: as they are), others as they are."""
    def stored(array):
        kind = dtype_of(array)
        return (dtype, from_float32(array.astype(np.float32), dtype)) if dtype and kind.is_float else (kind, array)

    items = {name: stored(np.require(a, requirements="C")) for name, a in tensors.items()}
    with SafetensorsWriter(path, [(n, d, a.shape) for n, (d, a) in items.items()], metadata=metadata,
                           checksums=False) as writer:
        for name, (_, array) in items.items():
            writer.write(name, array)


def write_checkpoint(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, *, layout: str = "file",
                     shards: int = 2, dtype=None) -> Path:
    """Write `tensors` as one file, a model folder, or a sharded model folder with an index."""
    path, dtype = Path(path), parse_dtype(dtype) if dtype is not None else None
    if layout == "file":
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_file(tensors, path, dtype)
        return path
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "tiny", "hidden_size": 8}))
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 6}))
    if layout == "folder":
        _write_file(tensors, path / "model.safetensors", dtype, {"format": "pt"})
        return path
    assert layout == "sharded", f"unknown layout {layout!r}"
    names = list(tensors)
    weight_map = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        group = names[k::shards]
        _write_file({n: tensors[n] for n in group}, path / file, dtype, {"format": "pt"})
        weight_map.update({n: file for n in group})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def snapshot(folder: str | os.PathLike) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder` (empty if it does not exist)."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
