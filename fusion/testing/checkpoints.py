"""Tiny checkpoints on disk for store and I/O tests: a base, fine-tunes of it, in every layout.

Layouts: `file` (one .safetensors), `folder` (a Hugging Face folder with model.safetensors and
a config.json), `sharded` (model-0000k-of-0000n.safetensors plus model.safetensors.index.json).
Values are small integers times 2**-6 so deltas are exact in every float dtype and hold exact
zeros and sign ties.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

__all__ = ["SHAPES", "tiny_base", "tiny_finetune", "write_checkpoint", "snapshot"]

SHAPES = {"embed.weight": (12, 8), "layer.0.weight": (8, 8), "layer.0.bias": (8,), "norm.weight": (8,),
          "head.weight": (3, 8)}


def tiny_base(*, seed: int = 0, dtype: torch.dtype = torch.float32, shapes: Mapping[str, tuple] = SHAPES,
              buffers: bool = True) -> dict[str, torch.Tensor]:
    """A base state dict: float tensors of `shapes` and an int64 `position_ids` buffer."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: (torch.randint(-64, 65, shape, generator=gen).float() / 64).to(dtype) for name, shape in shapes.items()}
    if buffers:
        tensors["position_ids"] = torch.arange(6)
    return tensors


def tiny_finetune(base: Mapping[str, torch.Tensor], *, seed: int, dtype: torch.dtype | None = None,
                  zero_fraction: float = 0.3) -> dict[str, torch.Tensor]:
    """base + a sparse delta of small multiples of 2**-6 on every float tensor; buffers copied."""
    gen = torch.Generator().manual_seed(1000 + seed)
    out = {}
    for name, t in base.items():
        if not t.is_floating_point():
            out[name] = t.clone()
            continue
        delta = torch.randint(-8, 9, t.shape, generator=gen).float() / 64
        delta = torch.where(torch.rand(t.shape, generator=gen) < zero_fraction, 0.0, delta)
        out[name] = (t.float() + delta).to(dtype or t.dtype)
    return out


def write_checkpoint(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, *, layout: str = "file",
                     shards: int = 2) -> Path:
    """Write `tensors` as one file, a model folder, or a sharded model folder with an index."""
    path = Path(path)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if layout == "file":
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path))
        return path
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "tiny", "hidden_size": 8}))
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 6}))
    if layout == "folder":
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    assert layout == "sharded", f"unknown layout {layout!r}"
    names = list(tensors)
    groups = [names[k::shards] for k in range(shards)]
    weight_map = {}
    for k, group in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in group}, str(path / file), metadata={"format": "pt"})
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
