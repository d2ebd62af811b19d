"""Decouple: one task's full model streamed out of the store, to a file, a model folder, or memory.

theta_i = theta0 + lambda_i * M_i * u, tensor by tensor and chunk by chunk, with the task's
private tensors in place of their base namesakes and the base's integer buffers as they are.
A folder is a model folder (from_pretrained loads it, and it never holds an adapter_config.json,
which would make it an adapter) or, for a factor-space store, an adapter folder (PeftModel
loads it: adapter_model.safetensors and the task's own adapter_config.json).
Every byte read is checked (fusion.store.snapshot), and the output is written under a temporary
name and renamed only when complete: a damaged store or base never leaves a model behind.

Outputs never destroy data: an existing file or non-empty folder is replaced only with
`force=True`, and never when the output would land on or inside the store, the base or a
recorded source (or contain one of them), forced or not.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np

from ..dtypes import DType, F32, from_float32, to_float32
from ..engine import chunk_ranges
from ..io import HF_INDEX, HF_WEIGHTS, Checkpoint, SafetensorsWriter, ShardedWriter
from ..io.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from ..io.files import atomic_write_text, copy_file_durably, fsync_dir, model_side_files
from ..io.format import TensorInfo
from ..progress import progress_bar
from .manifest import Manifest, TaskEntry
from .snapshot import Snapshot

__all__ = ["TaskStream", "write_file", "write_folder", "check_output", "model_card"]


class TaskStream:
    """A task's full state dict as a stream of flat chunks, in the output dtype's storage."""

    def __init__(self, snapshot: Snapshot, base: Checkpoint, task: TaskEntry, *, dtype: DType | None, kernel,
                 chunk: int):
        self.snapshot, self.base, self.task, self.dtype, self.kernel, self.chunk = (
            snapshot, base, task, dtype, kernel, chunk)
        self.fused = {t.name: t for t in snapshot.fused}
        self.private = snapshot.private(task)
        own = self.private.entries if self.private else {}
        # Output order: the base's tensors (a private one replaces its namesake), then new ones.
        self.sources: dict[str, TensorInfo] = {n: own.get(n) or base.info(n) for n in base.keys()}
        self.sources.update({n: i for n, i in own.items() if n not in self.sources})
        self.layout = [(n, self.out_dtype(i.dtype), i.shape) for n, i in self.sources.items()]
        largest = min(chunk, max((t.numel for t in snapshot.fused), default=0))
        self._base32 = np.empty(largest, dtype=np.float32)
        self._theta = np.empty(largest, dtype=np.float32)
        self._unified32 = np.empty(largest, dtype=np.float32)

    def out_dtype(self, dtype: DType) -> DType:
        return self.dtype if self.dtype is not None and dtype.is_float else dtype

    @property
    def numel(self) -> int:
        return sum(int(np.prod(shape)) for _, _, shape in self.layout)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(shape)) * dtype.itemsize for _, dtype, shape in self.layout)

    def chunks(self, name: str) -> Iterator[np.ndarray]:
        """Flat chunks of one output tensor; each is valid until the next one is asked for."""
        if self.private is not None and name in self.private.entries:
            yield from self._copied(self.private, self.private.entries[name])
        elif name not in self.fused:  # an integer or bool buffer: the base's
            yield from self._copied(self.base, self.base.info(name))
        else:
            for lo, hi in chunk_ranges(self.fused[name].numel, self.chunk):
                yield self._rebuilt(name, lo, hi)

    def _rebuilt(self, name: str, lo: int, hi: int) -> np.ndarray:
        n, spec = hi - lo, self.fused[name]
        base = self.base.read_flat_into(name, lo, hi, self._base32[:n])  # (n,) checked
        unified = self.snapshot.unified(name, lo, hi)
        if spec.unified_dtype is not F32:
            unified = to_float32(unified, spec.unified_dtype, out=self._unified32[:n])
        packed = self.snapshot.packed(self.task, name, lo, hi)
        theta = self.kernel.rebuild(base, unified, packed, self.task.rescaler_of(name), out=self._theta[:n])
        return from_float32(theta, self.out_dtype(spec.dtype))  # float32 out: the buffer itself

    def _copied(self, source, info: TensorInfo) -> Iterator[np.ndarray]:
        out = self.out_dtype(info.dtype)
        for lo, hi in chunk_ranges(info.numel, self.chunk):
            raw = source.view_flat(info.name, lo, hi)
            yield raw if out is info.dtype else from_float32(to_float32(raw, info.dtype), out)

    def write_all(self, write, *, progress: bool) -> None:
        bar = progress_bar(progress, self.numel, "decouple")
        try:
            for name, _, _ in self.layout:
                for piece in self.chunks(name):
                    write(name, piece)
                    if bar:
                        bar.update(piece.size)
        finally:
            if bar:
                bar.close()


# ---- where an output may go -----------------------------------------------------------------


def _related(a: Path, b: Path) -> bool:
    """One path is the other, or lies inside it."""
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def check_output(out: Path, protected: dict[str, Path], *, force: bool) -> None:
    """Refuse an output that would touch the store, the base or a source; or, without force, anything."""
    target = out.resolve()
    for what, path in protected.items():
        if _related(target, path.resolve()):
            raise ValueError(f"{out}: would write on or around {what} ({path}); choose an output elsewhere")
    if out.suffix == ".safetensors":
        if out.exists() and (out.is_dir() or not force):
            raise ValueError(f"{out}: exists; pass --force to replace it, or choose another name")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ValueError(f"{out}: exists and is not an empty folder; pass --force to replace it, or choose another")
    elif out.exists() and not out.is_dir():
        raise ValueError(f"{out}: is a file; a folder decouple needs a folder name (or name the output .safetensors)")


# ---- writers --------------------------------------------------------------------------------


def write_file(stream: TaskStream, out: Path, *, progress: bool) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with SafetensorsWriter(out, stream.layout, metadata={"format": "pt"}, checksums=False) as writer:
        stream.write_all(writer.write, progress=progress)
    fsync_dir(out.parent)
    return out


def _write_side_files(tmp: Path, side: dict[str, bytes], base_folder: Path | None, *, adapter: bool) -> None:
    """The task's own small files, or (for a task added from a lone file or as a dense adapter) the
    base folder's; an adapter_config.json only in an adapter folder."""
    wanted = (lambda name: True) if adapter else (lambda name: name != ADAPTER_CONFIG)
    if side:
        for name, data in side.items():
            if wanted(name):
                (tmp / name).write_bytes(data)
    elif base_folder is not None:
        for p in model_side_files(base_folder):
            if wanted(p.name):
                copy_file_durably(p, tmp / p.name)


def _set_config_dtype(tmp: Path, dtype: DType) -> None:
    """config.json says the dtype the weights were written in (`dtype`; `torch_dtype` if present)."""
    config = tmp / "config.json"
    if not config.is_file():
        return
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        content = json.loads(config.read_text(encoding="utf-8"))
        if isinstance(content, dict):
            content["dtype"] = dtype.name
            if "torch_dtype" in content:
                content["torch_dtype"] = dtype.name
            config.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def _replace_folder(tmp: Path, out: Path) -> None:
    """Put `tmp` at `out`; an existing `out` (allowed by force) is moved aside first, then deleted."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_folder(stream: TaskStream, out: Path, *, side: dict[str, bytes], base_folder: Path | None, card: str,
                 config_dtype: DType, max_shard_size: int, progress: bool, adapter: bool = False) -> Path:
    """A folder from_pretrained loads: model.safetensors (or shards and index), the task's files, a card.
    With `adapter`, a PEFT adapter folder: adapter_model.safetensors, one file (PEFT reads no shards)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights, max_shard_size = (ADAPTER_WEIGHTS, stream.nbytes + 1) if adapter else (HF_WEIGHTS, max_shard_size)
    try:
        with ShardedWriter(tmp, stream.layout, single=weights, max_shard_size=max_shard_size,
                           shard_name=lambda k, n: f"model-{k:05d}-of-{n:05d}.safetensors",
                           metadata={"format": "pt"}, checksums=False) as writer:
            stream.write_all(writer.write, progress=progress)
        if len(writer.shards) > 1:
            index = {"metadata": {"total_size": writer.total_size}, "weight_map": writer.weight_map}
            atomic_write_text(tmp / HF_INDEX, json.dumps(index, indent=2) + "\n")
        _write_side_files(tmp, side, base_folder, adapter=adapter)
        _set_config_dtype(tmp, config_dtype)
        atomic_write_text(tmp / "README.md", card)
        fsync_dir(tmp)
        _replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def model_card(store_dir: Path, manifest: Manifest, task: TaskEntry, dtype: DType) -> str:
    """A short README.md: what this folder is and where it came from."""
    fidelity = task.fidelity
    rescaler = (f"{min(task.rescaler.values()):.4f}..{max(task.rescaler.values()):.4f} (one per tensor)"
                if isinstance(task.rescaler, dict) else f"{task.rescaler:.6f}")
    cosine = "-" if fidelity.cosine is None else f"{fidelity.cosine:.4f}"
    rel = "-" if fidelity.rel_l2 is None else f"{fidelity.rel_l2:.4f}"
    source = task.source.hub.id if task.source.hub else task.source.path
    kind = {("factors", "adapter"): "LoRA adapter, fused in factor space (theta: its factors)",
            ("dense", "adapter"): "LoRA adapter, fused as its dense delta scaling * B @ A (theta: the full model)",
            }.get((manifest.space, task.kind), "full checkpoint")
    return (f"# {task.name}\n\n"
            f"Rebuilt from a ConDU store: theta = theta0 + lambda * M * u, the base plus this task's masked,\n"
            f"rescaled share of the unified delta. It approximates the fine-tune it came from.\n\n"
            f"| | |\n|---|---|\n"
            f"| store | `{store_dir.resolve()}` (generation {manifest.generation}) |\n"
            f"| task | {task.number} `{task.name}` |\n"
            f"| kind | {kind} |\n"
            f"| source | `{source}` |\n"
            f"| base | `{manifest.base.hub.id if manifest.base.hub else manifest.base.path}` |\n"
            f"| rescaler | {manifest.rescaler}: {rescaler} |\n"
            f"| mask density | {task.mask_density:.4f} |\n"
            f"| fidelity | cosine {cosine}, relative L2 error {rel} (measured at generation {fidelity.generation}) |\n"
            f"| dtype | {dtype.name} |\n")
