"""One generation of a store, opened for reading: every read checked, never broken by a writer.

A reader reads `condu.json`, then opens the files it needs at once and keeps them open. A
writer deletes a generation's files only after it has swapped in the next manifest, and files
are never rewritten in place, so once a file is open its content is the generation's for as
long as it is read. If a file is gone before it could be opened, either a commit happened in
between (then the reader starts over on the new manifest) or the file is lost (then the error
names it and the task it belongs to). Every file is opened with its block checksums, and the
base with the checksums of its content, so every byte read is verified.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from ..dtypes import F32, dequantize_raw, to_float32
from ..errors import InputError
from ..io import Checkpoint, IntegrityError, SafetensorsFile
from ..io.integrity import BlockHasher
from . import faults
from .manifest import Manifest, TaskEntry, load_manifest
from .plan import FusedTensor

__all__ = ["Snapshot", "open_snapshot", "open_base", "describe"]

_ATTEMPTS = 8  # commits a reader may race before it gives up (each one is a whole pass of a writer)


def describe(manifest: Manifest, rel: str) -> str:
    """A store file and what depends on it, for error messages."""
    for task in manifest.tasks:
        if rel in task.paths():
            return f"{rel} (task {task.number} {task.name})"
    if rel in manifest.unified.files:
        return f"{rel} (the unified delta: every task)"
    return rel


def open_base(manifest: Manifest, *, path: str | None = None) -> Checkpoint:
    """The base, every read checked against the content checksums the store recorded."""
    base = manifest.base
    where = f"base {path or base.path}"
    try:
        return Checkpoint(path or base.path, digests={n: d.file_digests() for n, d in base.files.items()}, where=where)
    except IntegrityError:
        raise
    except (ValueError, OSError) as err:
        raise InputError(f"{where}: cannot be read ({err}); restore it, or point the store at a copy with "
                         "`condu-fuse set-base PATH`") from None


@dataclass
class Snapshot:
    """Open files of one generation: the unified shards and the chosen tasks' files."""

    store_dir: Path
    manifest: Manifest
    files: dict[str, SafetensorsFile] = field(default_factory=dict)
    raw: dict[str, bytes] = field(default_factory=dict)  # small side files, read whole
    fused: list[FusedTensor] = field(default_factory=list)
    tensors: dict[str, FusedTensor] = field(default_factory=dict)

    def __post_init__(self):
        self.fused = [FusedTensor.of(e) for e in self.manifest.tensors]
        self.tensors = {t.name: t for t in self.fused}

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def __enter__(self) -> "Snapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reads -------------------------------------------------------------------------------

    def unified(self, name: str, lo: int, hi: int) -> np.ndarray:
        """Elements [lo, hi) of u, in its storage dtype (a block-quantized u: the bytes of their records;
        lo a block boundary): a verified view until the next read of its file."""
        tensor, where = self.tensors[name], self.files[self.manifest.unified.weight_map[name]]
        if tensor.quantized:
            return where.view_flat(name, *tensor.unified_dtype.byte_range(lo, hi, tensor.numel))
        return where.view_flat(name, lo, hi)

    def unified_float32(self, name: str, lo: int, hi: int, *, out: np.ndarray) -> np.ndarray:
        """Elements [lo, hi) of u as float32: the reader's verified view where u is stored in float32,
        else widened or dequantized (code * scale) into `out` (hi - lo,)."""
        tensor, raw = self.tensors[name], self.unified(name, lo, hi)
        if tensor.quantized:
            return dequantize_raw(raw, hi - lo, tensor.unified_dtype, out=out)
        return raw if tensor.unified_dtype is F32 else to_float32(raw, tensor.unified_dtype, out=out)

    def packed(self, task: TaskEntry, name: str, lo: int, hi: int) -> np.ndarray:
        """Mask bytes of `task` covering elements [lo, hi); lo is a multiple of 8."""
        return self.files[task.triggers].view_flat(name, lo // 8, -(-hi // 8))

    def private(self, task: TaskEntry) -> SafetensorsFile | None:
        return self.files[task.private] if task.private else None


def _open_file(store_dir: Path, manifest: Manifest, rel: str) -> SafetensorsFile:
    return SafetensorsFile(store_dir / rel, digests=manifest.digests(rel), where=describe(manifest, rel))


def _open_all(snapshot: Snapshot, rels: Iterable[str], side: Iterable[str]) -> None:
    for rel in rels:
        snapshot.files[rel] = _open_file(snapshot.store_dir, snapshot.manifest, rel)
    for rel in side:  # small files: read and verified at once, so a later commit cannot take them away
        snapshot.raw[rel] = _read_side_file(snapshot.store_dir, snapshot.manifest, rel)


def _read_side_file(store_dir: Path, manifest: Manifest, rel: str) -> bytes:
    data = (store_dir / rel).read_bytes()
    hasher = BlockHasher(manifest.files[rel].block)
    hasher.update(data)
    if hasher.finish() != manifest.digests(rel):
        raise IntegrityError(f"{describe(manifest, rel)}: does not match its checksum (damaged or changed)")
    return data


def open_snapshot(store_dir: Path, select, *, side=lambda m: ()) -> Snapshot:
    """Open the files `select(manifest)` names (and read `side(manifest)` whole), retrying on a commit."""
    for _ in range(_ATTEMPTS):
        manifest = load_manifest(store_dir)
        faults.hit("manifest-read")
        snapshot = Snapshot(store_dir, manifest)
        try:
            _open_all(snapshot, select(manifest), side(manifest))
            return snapshot
        except FileNotFoundError as err:
            snapshot.close()
            if load_manifest(store_dir).generation != manifest.generation:
                continue  # a writer committed in between: read the new generation
            rel = Path(err.filename).relative_to(store_dir).as_posix() if err.filename else "a file"
            raise InputError(f"{describe(manifest, rel)}: missing from {store_dir}; restore it, or drop the task with "
                             "`condu-fuse remove`") from None
        except BaseException:
            snapshot.close()
            raise
    raise InputError(f"{store_dir}: changed {_ATTEMPTS} times while it was being opened; try again")


@contextlib.contextmanager
def reading(store_dir: Path, select, *, side=lambda m: ()):
    snapshot = open_snapshot(store_dir, select, side=side)
    try:
        yield snapshot
    finally:
        snapshot.close()
