"""The ConDU store on disk: a base reference, one unified delta, and per task bit masks.

Layout (DESIGN.md, "The store on disk"), generation g written as new files:

    condu.json                          the manifest (format, generation, base, tensor table,
                                        rescaler mode, tasks, sha256 and size of every file)
    unified-g<g>[-<k>-of-<n>].safetensors   the unified delta u, in the tensors' shapes
    triggers/<uid>-g<g>.safetensors     a task's masks: uint8 (ceil(numel/8),) per fused tensor
    private/<uid>.safetensors           a task's tensors that cannot be fused (written once)
    prototypes/<uid>-g<g>.safetensors   optional tensors saved by the caller (class prototypes)
    condu.lock                          held (fcntl.flock) by the one writer

Every change streams through `fusion.engine.fuse_pass`, writes its files under temporary
names, fsyncs them, and then replaces `condu.json` atomically; files of the previous
generation are deleted only after that swap. Readers use only files the manifest names, so a
crash at any moment leaves the previous generation whole; the next writer removes leftovers.
The base checkpoint is not copied: the manifest keeps its path and fingerprint.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .engine import DEFAULT_CHUNK, StoredChunk, TensorSpec, chunk_ranges, fuse_pass
from .io import (
    HF_INDEX,
    HF_WEIGHTS,
    Checkpoint,
    SafetensorsFile,
    SafetensorsWriter,
    ShardedWriter,
    TensorInfo,
    atomic_write_text,
    copy_model_files,
    dtype_from_name,
    dtype_name,
    fsync_dir,
    open_checkpoint,
    sha256_file,
)
from .fidelity import NUM_SUMS, chunk_sums_fast
from .fidelity import finish as finish_fidelity
from .kernels import get_kernel
from .rebuild import rebuild_flat_fast, subtract_
from .reference import ChunkResult
from .rescale import check_mode, compute_rescalers

__all__ = ["Store", "TaskRecord", "StoreLockedError", "DEFAULT_SHARD_SIZE", "parse_dtype"]

FORMAT = "condu-store"
VERSION = 1
MANIFEST = "condu.json"
LOCK = "condu.lock"
SUBDIRS = ("triggers", "private", "prototypes")
DEFAULT_SHARD_SIZE = 2 << 30  # unified delta shards
DEFAULT_MODEL_SHARD_SIZE = 5 << 30  # decoupled model shards, as save_pretrained
MISSING_MODES = ("error", "zero")

_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


class StoreLockedError(OSError):
    """Another process is writing the store."""


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """None, a float torch dtype, or one of its names (float32, fp16, bf16, ...)."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in _DTYPE_NAMES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.lower()]
    raise ValueError(f"unsupported dtype {dtype!r}; use float32, float16 or bfloat16")


@dataclass(frozen=True)
class TaskRecord:
    """One stored task, as the manifest describes it."""

    index: int  # 1-based, in the order tasks were added
    name: str
    source: str  # the checkpoint it came from (absolute path)
    fingerprint: str  # of the source when it was added (fusion.io.Checkpoint.fingerprint)
    rescaler: float | dict[str, float]  # one per task, or one per tensor in `tensor` mode
    l1: float  # L1 norm of the delta this generation was unified from
    mask_density: float  # fraction of fused elements whose mask bit is set
    fidelity: dict  # cosine, rel_l2 (rebuilt vs original delta), generation measured at
    private: tuple[str, ...] = ()  # tensors kept whole (absent from the base, or another shape)
    zero_filled: tuple[str, ...] = ()  # base tensors the checkpoint lacked, taken as unchanged
    uid: str = ""
    has_prototypes: bool = False

    def rescaler_of(self, tensor: str) -> float:
        return self.rescaler[tensor] if isinstance(self.rescaler, dict) else self.rescaler


def _record(index: int, task: dict) -> TaskRecord:
    return TaskRecord(index, task["name"], task["source"], task["fingerprint"], task["rescaler"], task["l1"],
                      task["mask_density"], dict(task["fidelity"]), tuple(task["private"]["tensors"]),
                      tuple(task["zero_filled"]), task["uid"], task.get("prototypes") is not None)


# ---------------------------------------------------------------------------------------------
# Locking, manifest and cleanup
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _writer_lock(store_dir: Path) -> Iterator[None]:
    """Hold condu.lock exclusively for one writer; a second writer fails at once."""
    handle = open(store_dir / LOCK, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreLockedError(f"{store_dir}: another process is writing this store ({LOCK} is held); "
                                   "wait for it to finish") from None
        yield
    finally:
        handle.close()


def _read_manifest(store_dir: Path) -> dict:
    path = store_dir / MANIFEST
    if not path.is_file():
        raise ValueError(f"{store_dir}: no ConDU store here (no {MANIFEST}); create one with unify")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: unreadable manifest ({err})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{path}: not a {FORMAT} v{VERSION} manifest (format {manifest.get('format')!r}, "
                         f"version {manifest.get('version')!r})")
    return manifest


# Names a writer of this store gives its files (a temporary one adds `.tmp-<pid>`). Cleanup
# touches nothing else, so a user's files in the store folder are never removed.
_OWNED = re.compile(r"(unified-g\d{6}(-\d{5}-of-\d{5})?\.safetensors|triggers/t\d{4,}-g\d{6}\.safetensors"
                    r"|private/t\d{4,}\.safetensors|prototypes/t\d{4,}-g\d{6}\.safetensors)(\.tmp-\d+)?"
                    r"|condu\.json\.tmp-\d+")


def _owned_files(store_dir: Path) -> Iterator[Path]:
    """Files a writer of this store may have created (never anything a user put there)."""
    for folder in (store_dir, *(store_dir / sub for sub in SUBDIRS)):
        if folder.is_dir():
            yield from (p for p in folder.iterdir()
                        if p.is_file() and _OWNED.fullmatch(p.relative_to(store_dir).as_posix()))


def _cleanup(store_dir: Path, manifest: dict | None) -> None:
    """Delete files of older generations and temporary files of dead writers."""
    keep = set(manifest["files"]) if manifest else set()
    for p in _owned_files(store_dir):
        if p.relative_to(store_dir).as_posix() not in keep:
            p.unlink(missing_ok=True)


def _cleanup_after_failure(store_dir: Path) -> None:
    """Remove what a failed change wrote, keeping every file of the manifest now on disk."""
    _cleanup(store_dir, _read_manifest(store_dir) if (store_dir / MANIFEST).exists() else None)


def _gen(g: int) -> str:
    return f"g{g:06d}"


# ---------------------------------------------------------------------------------------------
# Planning: which tensors are fused, private or zero-filled, checked before anything is written
# ---------------------------------------------------------------------------------------------


@dataclass
class _Fused:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # the base's
    unified_dtype: torch.dtype

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": dtype_name(self.dtype),
                "unified_dtype": dtype_name(self.unified_dtype)}


def _fused_from_json(entry: dict) -> _Fused:
    return _Fused(entry["name"], tuple(entry["shape"]), dtype_from_name(entry["dtype"]),
                  dtype_from_name(entry["unified_dtype"]))


def _plan_tensors(base: Checkpoint, dtype: torch.dtype | None) -> list[_Fused]:
    """Every floating-point base tensor is fused, in the base's order."""
    fused = [_Fused(n, base.info(n).shape, base.info(n).dtype, dtype or base.info(n).dtype)
             for n in base.keys() if base.info(n).dtype.is_floating_point]
    if not fused:
        raise ValueError(f"{base.path}: the base has no floating-point tensors to fuse")
    return fused


@dataclass
class _NewTask:
    """A checkpoint to add: what it contributes and what it keeps aside."""

    checkpoint: Checkpoint
    name: str
    private: list[str] = field(default_factory=list)
    zero: set[str] = field(default_factory=set)  # fused tensors with a zero delta (missing or reshaped)
    zero_filled: list[str] = field(default_factory=list)


def _plan_task(ckpt: Checkpoint, base: Checkpoint, fused: list[_Fused], name: str, missing: str) -> _NewTask:
    """Sort a checkpoint's tensors: fused, private (absent from the base or reshaped), missing."""
    task = _NewTask(ckpt, name)
    task.private = [n for n in ckpt.keys() if n not in base or ckpt.info(n).shape != base.info(n).shape]
    for t in fused:
        if t.name not in ckpt:
            if missing != "zero":
                raise ValueError(f"{ckpt.path}: tensor {t.name!r} of the base is missing; "
                                 "re-save the checkpoint with it, or pass --missing zero to treat it as unchanged")
            task.zero.add(t.name)
            task.zero_filled.append(t.name)
        elif t.name in task.private:
            task.zero.add(t.name)
        elif not ckpt.info(t.name).dtype.is_floating_point:
            raise ValueError(f"{ckpt.file_of(t.name)}: tensor {t.name!r} is {ckpt.info(t.name).dtype} but float "
                             "in the base; the checkpoint does not fine-tune this base")
    return task


def _check_base(base: Checkpoint, manifest: dict) -> None:
    if base.fingerprint() != manifest["base"]["fingerprint"]:
        raise ValueError(f"{base.path}: the base checkpoint changed since the store was made "
                         "(fingerprint differs); restore the original base")


def _open_base(manifest: dict) -> Checkpoint:
    base = open_checkpoint(manifest["base"]["path"])
    _check_base(base, manifest)
    return base


def _source_if_unchanged(task: dict) -> tuple[Checkpoint, set[str]] | None:
    """A task's source checkpoint if it is still there with the same fingerprint, and the
    fused tensors it did not contribute (private or zero-filled: their original delta is 0)."""
    try:
        ckpt = open_checkpoint(task["source"])
    except (ValueError, OSError):
        return None
    if ckpt.fingerprint() != task["fingerprint"]:
        return None
    return ckpt, set(task["private"]["tensors"]) | set(task["zero_filled"])


# ---------------------------------------------------------------------------------------------
# Reading one generation
# ---------------------------------------------------------------------------------------------


class _Generation:
    """The files of one manifest, opened for reading."""

    def __init__(self, store_dir: Path, manifest: dict):
        self.manifest = manifest
        self.fused = [_fused_from_json(e) for e in manifest["tensors"]]
        self.column = {t.name: k for k, t in enumerate(self.fused)}
        self.unified = {rel: SafetensorsFile(store_dir / rel) for rel in manifest["unified"]["files"]}
        self.weight_map = manifest["unified"]["weight_map"]
        self.tasks = manifest["tasks"]
        self.triggers = [SafetensorsFile(store_dir / t["triggers"]) for t in self.tasks]
        self.store_dir = store_dir

    def unified_flat(self, name: str, lo: int, hi: int) -> torch.Tensor:
        return self.unified[self.weight_map[name]].read_flat(name, lo, hi).float()  # (n,)

    def packed(self, task: int, name: str, lo: int, hi: int) -> torch.Tensor:
        """Mask bytes covering [lo, hi); lo is a multiple of 8."""
        return self.triggers[task].read_flat(name, lo // 8, -(-hi // 8))  # (ceil(n/8),)

    def rescaler(self, task: int, name: str) -> float:
        r = self.tasks[task]["rescaler"]
        return float(r[name] if isinstance(r, dict) else r)

    def weights(self, task: int, name: str, lo: int, hi: int, base: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """theta0 + lambda * M * u on [lo, hi) into float32 `out` (hi - lo,); `base` is theta0 there.

        `out` also receives u first: one buffer, no allocation of the chunk's size.
        """
        unified = self.unified[self.weight_map[name]].read_flat_into(name, lo, hi, out)
        return rebuild_flat_fast(base, unified, self.packed(task, name, lo, hi), self.rescaler(task, name), out=out)

    def private(self, task: int) -> SafetensorsFile | None:
        rel = self.tasks[task]["private"]["file"]
        return SafetensorsFile(self.store_dir / rel) if rel else None

    def close(self) -> None:
        for f in [*self.unified.values(), *self.triggers]:
            f.close()


# ---------------------------------------------------------------------------------------------
# One generation's fusion pass
# ---------------------------------------------------------------------------------------------


def _popcount(packed: torch.Tensor) -> torch.Tensor:
    """Bits set per row of packed masks (T, nbytes) -> (T,) int64."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2: one vectorised pass
        return torch.from_numpy(np.bitwise_count(packed.numpy()).sum(axis=1, dtype=np.int64))
    return _POPCOUNT[packed.long()].sum(dim=1)


class _Stats:
    """Per task: mask bits set, and per tensor the fidelity sums (fusion.fidelity) in float64."""

    def __init__(self, num_tasks: int, num_tensors: int):
        self.bits = torch.zeros(num_tasks, dtype=torch.int64)
        self.sums = torch.zeros((num_tasks, num_tensors, NUM_SUMS), dtype=torch.float64)

    def count(self, packed: torch.Tensor) -> None:
        self.bits += _popcount(packed)  # (T,)

    def add(self, task: int, k: int, sums: torch.Tensor) -> None:
        self.sums[task, k] += sums  # (NUM_SUMS,) of one chunk, from fusion.fidelity.chunk_sums_fast

    def fidelity(self, task: int, rescalers: torch.Tensor) -> tuple[float, float | None]:
        """cosine and relative L2 of lambda * M * u against the original delta."""
        return finish_fidelity(self.sums[task], rescalers[task])


def _progress_bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="el", unit_scale=True, file=sys.stderr, leave=False)


def _resolve_kernel(name: str | None):
    try:
        return get_kernel(name)
    except ImportError:
        if name is not None:
            raise
        return get_kernel("reference")  # the fast kernels are not installed: the reference still works


@dataclass
class _PassInput:
    """Everything one generation's pass reads."""

    base: Checkpoint
    fused: list[_Fused]
    old: _Generation | None  # the current generation (None for a first unify)
    keep: list[int]  # 0-based indices of the old tasks carried over
    new: list[_NewTask]
    sources: list[tuple[Checkpoint, set[str]] | None]  # per carried task: its unchanged source, for fidelity
    mode: str
    kernel: object
    chunk: int


class _Sink:
    """Where one pass writes: the unified shards and one trigger file per task, streamed."""

    def __init__(self, store_dir: Path, g: int, fused: list[_Fused], uids: list[str], max_shard_size: int):
        layout = [(t.name, t.unified_dtype, t.shape) for t in fused]
        self.unified = ShardedWriter(store_dir, layout, single=f"unified-{_gen(g)}.safetensors",
                                     shard_name=lambda k, n: f"unified-{_gen(g)}-{k:05d}-of-{n:05d}.safetensors",
                                     max_shard_size=max_shard_size, metadata={"format": FORMAT, "generation": str(g)})
        mask_layout = [(t.name, torch.uint8, (-(-t.numel // 8),)) for t in fused]
        self.triggers: list[SafetensorsWriter] = []
        for uid in uids:  # opened one by one so that a failure leaves nothing open
            self.triggers.append(SafetensorsWriter(store_dir / "triggers" / f"{uid}-{_gen(g)}.safetensors", mask_layout,
                                                   metadata={"format": FORMAT, "generation": str(g)}))

    def write(self, name: str, result: ChunkResult, dtype: torch.dtype) -> None:
        self.unified.write(name, result.unified.to(dtype))
        for writer, packed in zip(self.triggers, result.packed_masks):
            writer.write(name, packed)

    def finish(self) -> dict[str, SafetensorsWriter]:
        """Close everything; {path relative to the store: finished writer}."""
        done = {name: w for name, w in self.unified.finish().items()}
        for w in self.triggers:
            w.finish()
            done[f"triggers/{w.path.name}"] = w
        return done

    def abort(self) -> None:
        self.unified.abort()
        for w in self.triggers:
            w.abort()


def _check_finite(new: list[_NewTask], name: str, delta_l1: torch.Tensor) -> None:
    """A NaN or Inf anywhere in a chunk's delta makes its L1 sum NaN or Inf: one cheap test."""
    for task, l1 in zip(new, delta_l1.tolist()):
        if not math.isfinite(l1):
            raise ValueError(f"{task.checkpoint.file_of(name)}: tensor {name!r} has NaN or Inf in its delta; "
                             "fix or re-export the checkpoint")


# Threads that read new checkpoints' chunks side by side: the copies out of the page cache, not
# the fusion, bound a store pass on a small machine.
_READER_THREADS = min(4, os.cpu_count() or 1)


class _PassIO:
    """The callbacks of fuse_pass: read checkpoints and the old generation lazily, write the sink."""

    def __init__(self, inp: _PassInput, sink: _Sink, stats: _Stats):
        self.inp, self.sink, self.stats = inp, sink, stats
        self.t_old = len(inp.keep)
        self.fused = {t.name: (k, t) for k, t in enumerate(inp.fused)}
        largest = max((t.numel for t in inp.fused), default=0)
        self.buffer = torch.empty(len(inp.new) * min(inp.chunk, largest))  # new deltas, reused every chunk
        self.base_key, self.base, self.fresh = None, None, None
        self.readers = ThreadPoolExecutor(max_workers=_READER_THREADS, thread_name_prefix="condu-read")

    def base_flat(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """theta0 on [lo, hi) in float32, read once per chunk: `(n,)`."""
        if self.base_key != (name, lo):
            self.base_key, self.base = (name, lo), self.inp.base.read_flat(name, lo, hi).float()
        return self.base

    def new_deltas(self, name: str, lo: int, hi: int) -> torch.Tensor:
        rows = self.buffer[: len(self.inp.new) * (hi - lo)].view(len(self.inp.new), hi - lo)  # (T_new, n)
        base = self.base_flat(name, lo, hi)  # read before the readers share it

        def load(task: _NewTask, row: torch.Tensor) -> None:
            if name in task.zero:
                row.zero_()
            else:
                subtract_(task.checkpoint.read_flat_into(name, lo, hi, row), base)

        # Each task reads its own file into its own row; preadv and numpy release the GIL, so the
        # page-cache copies of different tasks run on different cores.
        list(self.readers.map(load, self.inp.new, rows))
        self.fresh = rows
        return rows

    def stored(self, name: str, lo: int, hi: int) -> StoredChunk:
        old, keep = self.inp.old, self.inp.keep
        packed = [old.packed(i, name, lo, hi) for i in keep]
        packed = torch.stack(packed) if packed else torch.empty((0, -(-(hi - lo) // 8)), dtype=torch.uint8)
        rescalers = torch.tensor([old.rescaler(i, name) for i in keep], dtype=torch.float64)  # (T_old,)
        return StoredChunk(old.unified_flat(name, lo, hi), packed, rescalers)

    def emit(self, name: str, lo: int, hi: int, result: ChunkResult) -> None:
        k, spec = self.fused[name]
        _check_finite(self.inp.new, name, result.delta_l1[self.t_old:])
        self.sink.write(name, result, spec.unified_dtype)
        self.stats.count(result.packed_masks)
        originals = list(self._originals(name, lo, hi).items())
        unified, masks = result.unified.contiguous(), result.packed_masks

        def sums(item: tuple[int, torch.Tensor]) -> torch.Tensor:
            return chunk_sums_fast(unified, masks[item[0]], item[1])

        for (i, _), chunk_sums in zip(originals, self.readers.map(sums, originals)):  # numba, no GIL
            self.stats.add(i, k, chunk_sums)

    def _originals(self, name: str, lo: int, hi: int) -> dict[int, torch.Tensor]:
        """Original deltas on [lo, hi) of the tasks whose fine-tune is at hand, by row of the pass."""
        originals = {self.t_old + j: row for j, row in enumerate(self.fresh)}
        for j, source in enumerate(self.inp.sources):
            if source is not None:
                src, zero = source
                originals[j] = (torch.zeros(hi - lo) if name in zero
                                else subtract_(src.read_flat(name, lo, hi).float(), self.base_flat(name, lo, hi)))
        return originals


def _run_pass(inp: _PassInput, sink: _Sink, progress: bool) -> tuple[torch.Tensor, torch.Tensor, _Stats]:
    """Stream every fused tensor through fuse_pass; return rescalers (T, K), delta L1 (T, K), stats."""
    stats = _Stats(len(inp.keep) + len(inp.new), len(inp.fused))
    io = _PassIO(inp, sink, stats)
    specs = [TensorSpec(t.name, t.numel, t.unified_dtype) for t in inp.fused]
    bar = _progress_bar(progress, sum(t.numel for t in inp.fused), "fuse")
    try:
        tables = fuse_pass(specs, num_tasks=len(inp.keep) + len(inp.new), new_deltas=io.new_deltas, emit=io.emit,
                           stored=None if inp.old is None else io.stored, kernel=inp.kernel, chunk=inp.chunk,
                           progress=bar.update if bar else None)
    finally:
        io.readers.shutdown()
        if bar:
            bar.close()
    numels = torch.tensor([t.numel for t in inp.fused])
    return compute_rescalers(tables.delta_l1, tables.masked_l1, numels, inp.mode), tables.delta_l1, stats


def _write_private(store_dir: Path, task: _NewTask, uid: str, chunk: int) -> SafetensorsWriter | None:
    """Copy a task's private tensors into private/<uid>.safetensors, chunk by chunk."""
    if not task.private:
        return None
    ckpt = task.checkpoint
    layout = [(n, ckpt.info(n).dtype, ckpt.info(n).shape) for n in task.private]
    writer = SafetensorsWriter(store_dir / "private" / f"{uid}.safetensors", layout, metadata={"format": FORMAT})
    try:
        for name in task.private:
            for lo, hi in chunk_ranges(ckpt.info(name).numel, chunk):
                writer.write(name, ckpt.read_flat(name, lo, hi))
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    return writer


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------


class Store:
    """A ConDU store folder. Create with `Store.unify`, open with `Store.open`."""

    def __init__(self, store_dir: str | os.PathLike, *, kernel: str | None = None, chunk: int | None = None):
        self.path = Path(store_dir)
        self.kernel = kernel
        self.chunk = chunk  # None: sized by the task count (`_chunk_for`)
        self._manifest = _read_manifest(self.path)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def open(cls, store_dir: str | os.PathLike, *, kernel: str | None = None, chunk: int | None = None) -> "Store":
        return cls(store_dir, kernel=kernel, chunk=chunk)

    @classmethod
    def unify(cls, store_dir: str | os.PathLike, base: str | os.PathLike, checkpoints: Sequence[str | os.PathLike], *,
              names: Sequence[str] | None = None, rescaler: str = "model", dtype: torch.dtype | str | None = None,
              missing: str = "error", kernel: str | None = None, chunk: int | None = None, progress: bool = False,
              max_shard_size: int = DEFAULT_SHARD_SIZE) -> "Store":
        """One-shot (EMR-style) unify of the checkpoints' deltas from `base` into a new store."""
        store_dir = Path(store_dir)
        check_mode(rescaler)
        if missing not in MISSING_MODES:
            raise ValueError(f"unknown missing policy {missing!r}; use error or zero")
        if store_dir.exists() and not store_dir.is_dir():
            raise ValueError(f"{store_dir}: exists and is not a folder; choose another --store")
        if (store_dir / MANIFEST).exists():
            raise ValueError(f"{store_dir}: already holds a ConDU store; use add to add a task")
        if not checkpoints:
            raise ValueError("unify needs at least one checkpoint")
        if names is not None and len(names) != len(checkpoints):
            raise ValueError(f"got {len(names)} names for {len(checkpoints)} checkpoints; give one name each")
        created = not store_dir.exists()
        had_lock = (store_dir / LOCK).exists()
        store_dir.mkdir(parents=True, exist_ok=True)
        try:
            with _writer_lock(store_dir):
                if (store_dir / MANIFEST).exists():
                    raise ValueError(f"{store_dir}: already holds a ConDU store; use add to add a task")
                _create(store_dir, Path(base), [Path(c) for c in checkpoints], names, rescaler, parse_dtype(dtype),
                        missing, _resolve_kernel(kernel), chunk, progress, max_shard_size)
        except BaseException:
            if not (store_dir / MANIFEST).exists():
                _remove_empty_store(store_dir, created, had_lock)
            raise
        return cls(store_dir, kernel=kernel, chunk=chunk)

    # -- reading -----------------------------------------------------------------------------

    def _refresh(self) -> dict:
        self._manifest = _read_manifest(self.path)
        return self._manifest

    @property
    def generation(self) -> int:
        return self._refresh()["generation"]

    @property
    def rescaler_mode(self) -> str:
        return self._refresh()["rescaler"]

    @property
    def tasks(self) -> list[TaskRecord]:
        return [_record(i + 1, t) for i, t in enumerate(self._refresh()["tasks"])]

    def task(self, task: int | str) -> TaskRecord:
        """A task by 1-based index or by name."""
        index = self._index(task)
        return _record(index + 1, self._manifest["tasks"][index])

    def _index(self, task: int | str) -> int:
        """0-based position of a task given by 1-based index or by name."""
        tasks = self._refresh()["tasks"]
        names = [t["name"] for t in tasks]
        if isinstance(task, str) and task in names:
            return names.index(task)
        number = int(task) if isinstance(task, str) and task.strip().isdigit() else task
        if isinstance(number, int) and not isinstance(number, bool) and 1 <= number <= len(tasks):
            return number - 1
        choices = ", ".join(f"{i + 1} ({n})" for i, n in enumerate(names))
        raise ValueError(f"{self.path}: no task {task!r}; choose one of {choices}")

    def load_base(self) -> dict[str, torch.Tensor]:
        base = _open_base(self._refresh())
        try:
            return {name: base.read(name) for name in base.keys()}
        finally:
            base.close()

    def load_task(self, task: int | str, *, dtype: torch.dtype | str | None = None) -> dict[str, torch.Tensor]:
        """The rebuilt full state dict of a task: base + lambda * M * u, private tensors, int buffers."""
        out = {}
        with self._decoupler(task, parse_dtype(dtype)) as dec:
            for name, dt, shape in dec.layout:
                flat, pos = torch.empty(int(torch.Size(shape).numel()), dtype=dt), 0
                for piece in dec.chunks(name):  # pieces reuse one buffer: copy each out at once
                    flat[pos : pos + piece.numel()] = piece
                    pos += piece.numel()
                out[name] = flat.reshape(shape)
        return out

    def load_prototypes(self, task: int | str) -> dict[str, torch.Tensor] | None:
        rel = self._refresh()["tasks"][self._index(task)].get("prototypes")
        if rel is None:
            return None
        f = SafetensorsFile(self.path / rel)
        try:
            return {name: f.read(name) for name in f.keys()}
        finally:
            f.close()

    # -- decouple ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _decoupler(self, task: int | str, dtype: torch.dtype | None):
        index = self._index(task)
        manifest = self._manifest
        gen, base = _Generation(self.path, manifest), _open_base(manifest)
        private = gen.private(index)
        try:
            yield _Decoupler(gen, base, private, index, dtype, self.chunk or DEFAULT_CHUNK)
        finally:
            gen.close()
            base.close()
            if private:
                private.close()

    def decouple(self, task: int | str, out: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                 progress: bool = False, max_shard_size: int = DEFAULT_MODEL_SHARD_SIZE) -> Path:
        """Write one task's full model: `out` ending in .safetensors is one file, else a model folder."""
        out = Path(out)
        if out.suffix.lower() in (".bin", ".pt", ".pth", ".ckpt"):
            raise ValueError(f"{out}: decouple writes safetensors only; name the output .safetensors or a folder")
        if out.suffix != ".safetensors" and out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ValueError(f"{out}: exists and is not an empty folder; choose a new output folder")
        with self._decoupler(task, parse_dtype(dtype)) as dec:
            if out.suffix == ".safetensors":
                return _decouple_file(dec, out, progress)
            return _decouple_folder(dec, out, progress, max_shard_size, self._manifest["base"]["path"])

    # -- changes -----------------------------------------------------------------------------

    def add(self, checkpoint: str | os.PathLike, *, name: str | None = None, progress: bool = False) -> TaskRecord:
        """The ConDU continual step: rebuild every task, unify them with the new checkpoint's delta."""
        with _writer_lock(self.path):
            manifest = self._refresh()
            _cleanup(self.path, manifest)
            base = _open_base(manifest)
            ckpt = open_checkpoint(checkpoint)
            name = name or _unique_name(ckpt.name, [t["name"] for t in manifest["tasks"]])
            if name in [t["name"] for t in manifest["tasks"]]:
                raise ValueError(f"{self.path}: a task named {name!r} exists already; pass another --name")
            fused = [_fused_from_json(e) for e in manifest["tensors"]]
            new = _plan_task(ckpt, base, fused, name, manifest["missing"])
            keep = list(range(len(manifest["tasks"])))
            self._manifest = _next_generation(self.path, manifest, base, fused, keep, [new], _resolve_kernel(self.kernel),
                                              self.chunk, progress)
        return self.tasks[-1]

    def remove(self, task: int | str, *, progress: bool = False) -> None:
        """Drop a task and re-unify the others from their reconstructions."""
        with _writer_lock(self.path):
            manifest = self._refresh()
            index = self._index(task)
            if len(manifest["tasks"]) == 1:
                raise ValueError(f"{self.path}: cannot remove the only task; delete the store folder instead")
            _cleanup(self.path, manifest)
            base = _open_base(manifest)
            fused = [_fused_from_json(e) for e in manifest["tensors"]]
            keep = [i for i in range(len(manifest["tasks"])) if i != index]
            self._manifest = _next_generation(self.path, manifest, base, fused, keep, [], _resolve_kernel(self.kernel),
                                              self.chunk, progress)

    def save_prototypes(self, task: int | str, tensors: dict[str, torch.Tensor]) -> None:
        """Store tensors (class prototypes) with a task, as prototypes/<uid>-g<g>.safetensors."""
        with _writer_lock(self.path):
            manifest = self._refresh()
            index = self._index(task)
            _cleanup(self.path, manifest)
            g = manifest["generation"] + 1
            (self.path / "prototypes").mkdir(exist_ok=True)
            rel = f"prototypes/{manifest['tasks'][index]['uid']}-{_gen(g)}.safetensors"
            layout = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
            writer = SafetensorsWriter(self.path / rel, layout, metadata={"format": FORMAT})
            try:
                for n, t in tensors.items():
                    writer.write(n, t.detach().cpu())
                writer.finish()
                new = json.loads(json.dumps(manifest))
                new["generation"], new["tasks"][index]["prototypes"] = g, rel
                self._manifest = _commit(self.path, new, {rel: writer})
            except BaseException:
                writer.abort()
                _cleanup_after_failure(self.path)
                raise

    # -- reporting ---------------------------------------------------------------------------

    def info(self) -> dict:
        """Tasks, sizes, fidelity and savings, JSON-able."""
        manifest = self._refresh()
        return _info(self.path, manifest, [_record(i + 1, t) for i, t in enumerate(manifest["tasks"])])

    def verify(self) -> list[str]:
        """Problems found (missing or changed files, inconsistent manifest); empty means healthy."""
        try:
            manifest = self._refresh()
        except ValueError as err:
            return [str(err)]
        return _verify(self.path, manifest)

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, generation={self._manifest['generation']}, tasks={len(self._manifest['tasks'])})"


def _unique_name(name: str, taken: Sequence[str]) -> str:
    candidate, k = name, 2
    while candidate in taken:
        candidate, k = f"{name}-{k}", k + 1
    return candidate


def _remove_empty_store(store_dir: Path, created: bool, had_lock: bool) -> None:
    """Undo what a failed first unify created: leftovers, subfolders, the lock, the folder."""
    if not store_dir.is_dir():
        return
    _cleanup(store_dir, None)
    for sub in SUBDIRS:
        with contextlib.suppress(OSError):
            (store_dir / sub).rmdir()
    if not had_lock:
        (store_dir / LOCK).unlink(missing_ok=True)
    if created:
        with contextlib.suppress(OSError):
            store_dir.rmdir()


def _create(store_dir: Path, base_path: Path, paths: list[Path], names, mode: str, dtype, missing: str, kernel,
            chunk: int | None, progress: bool, max_shard_size: int) -> None:
    """Plan and check everything, then run the first generation's pass and commit it."""
    _cleanup(store_dir, None)
    base = open_checkpoint(base_path)
    fused = _plan_tensors(base, dtype)
    new, taken = [], []
    for k, path in enumerate(paths):
        ckpt = open_checkpoint(path)
        name = names[k] if names is not None else _unique_name(ckpt.name, taken)
        if name in taken:
            raise ValueError(f"task name {name!r} is given twice; give each checkpoint its own name")
        taken.append(name)
        new.append(_plan_task(ckpt, base, fused, name, missing))
    manifest = {
        "format": FORMAT, "version": VERSION, "generation": 0,
        "base": {"path": str(base_path.resolve()), "fingerprint": base.fingerprint(), "bytes": base.nbytes},
        "rescaler": mode, "missing": missing, "max_shard_size": max_shard_size,
        "tensors": [t.to_json() for t in fused], "next_uid": 1, "tasks": [], "files": {},
        "unified": {"files": [], "weight_map": {}},
    }
    _next_generation(store_dir, manifest, base, fused, [], new, kernel, chunk, progress, mode=mode)


# Elements of one chunk over all tasks: a pass holds a few arrays of this many float32 values
# (16 MiB each), whatever the task count, so its peak memory does not grow with T.
PASS_ELEMENTS = 4 * DEFAULT_CHUNK


def _chunk_for(num_tasks: int) -> int:
    """Elements per chunk and task: PASS_ELEMENTS shared by the tasks, a multiple of 8, >= 64Ki."""
    return max(1 << 16, PASS_ELEMENTS // max(num_tasks, 1) // 8 * 8)


def _next_generation(store_dir: Path, manifest: dict, base: Checkpoint, fused: list[_Fused], keep: list[int],
                     new: list[_NewTask], kernel, chunk: int | None, progress: bool, *, mode: str | None = None) -> dict:
    """Run one pass (carry `keep`, add `new`), write generation g+1 and commit it; return its manifest.

    On any failure the files this call wrote are removed; whatever manifest is on disk then
    (the old one, or the new one if the failure came after the swap) stays whole.
    """
    chunk = chunk or _chunk_for(len(keep) + len(new))
    for sub in SUBDIRS[:2]:
        (store_dir / sub).mkdir(exist_ok=True)
    old = _Generation(store_dir, manifest) if manifest["tasks"] else None
    sources = [_source_if_unchanged(manifest["tasks"][i]) for i in keep]
    sink: list[_Sink] = []
    try:
        result, written = _write_generation(store_dir, manifest, base, fused, old, keep, new, sources, sink,
                                            mode or manifest["rescaler"], kernel, chunk, progress)
        return _commit(store_dir, result, written)
    except BaseException:
        for s in sink:
            s.abort()
        _cleanup_after_failure(store_dir)
        raise
    finally:
        for opened in [old, *(src for src, _ in filter(None, sources))]:
            if opened:
                opened.close()


def _write_generation(store_dir: Path, manifest: dict, base: Checkpoint, fused: list[_Fused], old: _Generation | None,
                      keep: list[int], new: list[_NewTask], sources: list, sink_slot: list, mode: str, kernel,
                      chunk: int, progress: bool) -> tuple[dict, dict[str, SafetensorsWriter]]:
    """Write private files, unified shards and triggers of generation g+1; return its manifest and files."""
    g, uid0 = manifest["generation"] + 1, manifest["next_uid"]
    new_uids = [f"t{uid0 + j:04d}" for j in range(len(new))]
    old_tasks = [manifest["tasks"][i] for i in keep]
    uids = [t["uid"] for t in old_tasks] + new_uids
    written: dict[str, SafetensorsWriter] = {}
    for task, uid in zip(new, new_uids):
        writer = _write_private(store_dir, task, uid, chunk)
        if writer:
            written[f"private/{writer.path.name}"] = writer
    sink = _Sink(store_dir, g, fused, uids, manifest.get("max_shard_size", DEFAULT_SHARD_SIZE))
    sink_slot.append(sink)
    inp = _PassInput(base, fused, old, keep, new, sources, mode, kernel, chunk)
    rescalers, delta_l1, stats = _run_pass(inp, sink, progress)
    written.update(sink.finish())
    tasks = [dict(t) for t in old_tasks] + [_new_task_entry(t, uid, g) for t, uid in zip(new, new_uids)]
    total = sum(t.numel for t in fused)
    for i, task in enumerate(tasks):
        _update_task(task, i, rescalers, delta_l1, stats, total, g, uids[i],
                     measured=i >= len(old_tasks) or sources[i] is not None)
    _set_rescalers(tasks, fused, rescalers, mode)
    weight_map = dict(sink.unified.weight_map)
    result = dict(manifest, generation=g, next_uid=uid0 + len(new), tasks=tasks, rescaler=mode,
                  unified={"files": list(dict.fromkeys(weight_map.values())), "weight_map": weight_map})
    return result, written


def _new_task_entry(task: _NewTask, uid: str, g: int) -> dict:
    private_file = f"private/{uid}.safetensors" if task.private else None
    return {"uid": uid, "name": task.name, "source": str(task.checkpoint.path.resolve()),
            "fingerprint": task.checkpoint.fingerprint(), "added_generation": g,
            "private": {"file": private_file, "tensors": list(task.private)}, "zero_filled": list(task.zero_filled),
            "prototypes": None}


def _update_task(task: dict, i: int, rescalers: torch.Tensor, delta_l1: torch.Tensor,
                 stats: _Stats, total: int, g: int, uid: str, *, measured: bool) -> None:
    """Fill a task's manifest entry from the pass: L1, density, fidelity, trigger file."""
    task["l1"] = float(delta_l1[i].sum())
    task["mask_density"] = float(stats.bits[i]) / total if total else 0.0
    task["triggers"] = f"triggers/{uid}-{_gen(g)}.safetensors"
    if measured:
        cosine, rel_l2 = stats.fidelity(i, rescalers)
        task["fidelity"] = {"cosine": cosine, "rel_l2": rel_l2, "generation": g}


def _set_rescalers(tasks: list[dict], fused: list[_Fused], rescalers: torch.Tensor, mode: str) -> None:
    for i, task in enumerate(tasks):
        if mode == "tensor":
            task["rescaler"] = {t.name: float(rescalers[i, k]) for k, t in enumerate(fused)}
        else:
            task["rescaler"] = float(rescalers[i, 0])


def _commit(store_dir: Path, manifest: dict, written: dict[str, SafetensorsWriter]) -> dict:
    """Record the new files' sha256, fsync folders, swap condu.json, then drop the old files."""
    files = {rel: entry for rel, entry in manifest["files"].items() if _still_referenced(manifest, rel)}
    files.update({rel: {"sha256": w.sha256, "size": w.size} for rel, w in written.items()})
    manifest = dict(manifest, files=dict(sorted(files.items())))
    for sub in ("", *SUBDIRS):
        if (store_dir / sub).is_dir():
            fsync_dir(store_dir / sub)
    atomic_write_text(store_dir / MANIFEST, json.dumps(manifest, separators=(",", ":")) + "\n")  # compact: it counts in the store size
    _cleanup(store_dir, manifest)
    return manifest


def _still_referenced(manifest: dict, rel: str) -> bool:
    refs = set(manifest["unified"]["files"])
    for t in manifest["tasks"]:
        refs.update(r for r in (t.get("triggers"), t["private"]["file"], t.get("prototypes")) if r)
    return rel in refs


# ---------------------------------------------------------------------------------------------
# Decouple: stream a task's full model out, tensor by tensor and chunk by chunk
# ---------------------------------------------------------------------------------------------


class _Decoupler:
    """A task's full state dict as a stream: base + lambda * M * u, private tensors, int buffers."""

    def __init__(self, gen: _Generation, base: Checkpoint, private: SafetensorsFile | None, index: int,
                 dtype: torch.dtype | None, chunk: int):
        self.gen, self.base, self.private, self.index, self.dtype, self.chunk = gen, base, private, index, dtype, chunk
        self.fused = {t.name: t for t in gen.fused}
        self.buffers: dict[int, torch.Tensor] = {}
        own = private.entries if private else {}
        # Output order: the base's tensors (a private one replaces its base namesake), then new ones.
        sources = [own.get(n) or base.info(n) for n in base.keys()] + [i for n, i in own.items() if n not in base]
        self.layout = [(i.name, self._out(i.dtype), i.shape) for i in sources]

    def _out(self, dtype: torch.dtype) -> torch.dtype:
        return self.dtype if self.dtype is not None and dtype.is_floating_point else dtype

    @property
    def numel(self) -> int:
        return sum(int(torch.Size(shape).numel()) for _, _, shape in self.layout)

    def chunks(self, name: str) -> Iterator[torch.Tensor]:
        """Flat chunks of one output tensor, in its output dtype."""
        if self.private is not None and name in self.private.entries:
            yield from self._copied(self.private, self.private.entries[name])
        elif name not in self.fused:  # an integer or bool buffer: the base's
            yield from self._copied(self.base, self.base.info(name))
        else:
            for lo, hi in chunk_ranges(self.base.info(name).numel, self.chunk):
                base = self.base.read_flat_into(name, lo, hi, self._buffer(0, hi - lo, self.base.info(name).dtype))
                theta = self.gen.weights(self.index, name, lo, hi, base, self._buffer(1, hi - lo, torch.float32))
                yield theta.to(self._out(self.fused[name].dtype))  # (n,), valid until the next chunk

    def _buffer(self, slot: int, n: int, dtype: torch.dtype) -> torch.Tensor:
        """A reused (n,) buffer: chunks come one at a time, so two buffers serve them all."""
        if slot not in self.buffers or self.buffers[slot].dtype != dtype or self.buffers[slot].numel() < n:
            self.buffers[slot] = torch.empty(self.chunk, dtype=dtype)
        return self.buffers[slot][:n]

    def _copied(self, source, info: TensorInfo) -> Iterator[torch.Tensor]:
        for lo, hi in chunk_ranges(info.numel, self.chunk):
            yield source.read_flat(info.name, lo, hi).to(self._out(info.dtype))

    def write_all(self, write: Callable[[str, torch.Tensor], None], progress: bool) -> None:
        bar = _progress_bar(progress, self.numel, "decouple")
        try:
            for name, _, _ in self.layout:
                for piece in self.chunks(name):
                    write(name, piece)
                    if bar:
                        bar.update(piece.numel())
        finally:
            if bar:
                bar.close()


def _decouple_file(dec: _Decoupler, out: Path, progress: bool) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = SafetensorsWriter(out, dec.layout, metadata={"format": "pt"}, checksum=False)
    try:
        dec.write_all(writer.write, progress)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    fsync_dir(out.parent)
    return out


def _decouple_folder(dec: _Decoupler, out: Path, progress: bool, max_shard_size: int, base_path: str) -> Path:
    """A folder from_pretrained loads: model.safetensors (or shards + index) and the base's side files."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    writer = ShardedWriter(tmp, dec.layout, single=HF_WEIGHTS, max_shard_size=max_shard_size, metadata={"format": "pt"}, checksum=False,
                           shard_name=lambda k, n: f"model-{k:05d}-of-{n:05d}.safetensors")
    try:
        dec.write_all(writer.write, progress)
        writer.finish()
        if len(writer.shards) > 1:
            index = {"metadata": {"total_size": writer.total_size}, "weight_map": writer.weight_map}
            atomic_write_text(tmp / HF_INDEX, json.dumps(index, indent=2) + "\n")
        if Path(base_path).is_dir():
            copy_model_files(base_path, tmp)
        fsync_dir(tmp)
        os.rename(tmp, out)  # replaces an empty folder, atomically
        fsync_dir(out.parent)
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------------------------------------
# info and verify
# ---------------------------------------------------------------------------------------------


def _sizes(manifest: dict) -> dict[str, int]:
    sizes = {"unified": 0, "triggers": 0, "private": 0, "prototypes": 0}
    for rel, entry in manifest["files"].items():
        sizes["unified" if rel.startswith("unified-") else rel.split("/")[0]] += entry["size"]
    sizes["total"] = sum(sizes.values())
    return sizes


def _info(store_dir: Path, manifest: dict, records: list[TaskRecord]) -> dict:
    sizes = _sizes(manifest)
    separate = len(records) * manifest["base"]["bytes"]
    return {
        "store": str(store_dir.resolve()), "format": FORMAT, "version": VERSION, "generation": manifest["generation"],
        "base": dict(manifest["base"]), "rescaler": manifest["rescaler"],
        "tensors": len(manifest["tensors"]),
        "fused_parameters": sum(int(torch.Size(t["shape"]).numel()) for t in manifest["tensors"]),
        "tasks": [{"index": r.index, "name": r.name, "source": r.source, "rescaler": r.rescaler, "l1": r.l1,
                   "mask_density": r.mask_density, "fidelity": r.fidelity, "private": list(r.private),
                   "zero_filled": list(r.zero_filled), "prototypes": r.has_prototypes} for r in records],
        "sizes": sizes,
        "separate_checkpoints_bytes": separate,
        "savings": separate / sizes["total"] if sizes["total"] else None,
    }


def _check_files(store_dir: Path, manifest: dict) -> list[str]:
    problems = []
    for rel, entry in manifest["files"].items():
        path = store_dir / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{rel}: size {path.stat().st_size}, manifest says {entry['size']}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest (file changed or corrupt)")
    return problems


def _check_header(store_dir: Path, rel: str, expected: dict[str, tuple[torch.dtype, tuple]]) -> list[str]:
    """The file holds exactly the expected tensors with the expected dtypes and shapes."""
    try:
        entries = SafetensorsFile(store_dir / rel).entries
    except (ValueError, OSError) as err:
        return [f"{rel}: unreadable ({err})"]
    problems = [f"{rel}: tensor {n!r} missing" for n in expected if n not in entries]
    problems += [f"{rel}: tensor {n!r} is {entries[n].dtype} {list(entries[n].shape)}, expected {d} {list(s)}"
                 for n, (d, s) in expected.items() if n in entries and (entries[n].dtype, entries[n].shape) != (d, tuple(s))]
    return problems


def _check_tasks(store_dir: Path, manifest: dict, fused: list[_Fused], bad: set[str]) -> list[str]:
    problems = []
    masks = {t.name: (torch.uint8, (-(-t.numel // 8),)) for t in fused}
    names = [t["name"] for t in manifest["tasks"]]
    problems += [f"task name {n!r} appears twice" for n in set(names) if names.count(n) > 1]
    for i, task in enumerate(manifest["tasks"]):
        label = f"task {i + 1} ({task['name']})"
        r = task.get("rescaler")
        values = list(r.values()) if isinstance(r, dict) else [r]
        if isinstance(r, dict) and set(r) != set(masks):
            problems.append(f"{label}: per-tensor rescalers do not match the tensor table")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            problems.append(f"{label}: rescaler {r!r} is not a finite number")
        for rel in (task.get("triggers"), task["private"]["file"], task.get("prototypes")):
            if rel and rel not in manifest["files"]:
                problems.append(f"{label}: {rel} is not in the manifest's file table")
        if task.get("triggers") in manifest["files"] and task["triggers"] not in bad:
            problems += _check_header(store_dir, task["triggers"], masks)
        if task["private"]["file"] in manifest["files"] and task["private"]["file"] not in bad:
            entries = SafetensorsFile(store_dir / task["private"]["file"]).entries
            if set(entries) != set(task["private"]["tensors"]):
                problems.append(f"{label}: private tensors on disk differ from the manifest")
    return problems


def _verify(store_dir: Path, manifest: dict) -> list[str]:
    problems = _check_files(store_dir, manifest)
    bad = {p.split(":")[0] for p in problems}
    fused = [_fused_from_json(e) for e in manifest["tensors"]]
    weight_map = manifest["unified"]["weight_map"]
    problems += [f"unified delta: tensor {t.name!r} has no shard" for t in fused if t.name not in weight_map]
    for rel in manifest["unified"]["files"]:
        if rel not in manifest["files"]:
            problems.append(f"{rel}: not in the manifest's file table")
        elif rel not in bad:
            expected = {t.name: (t.unified_dtype, t.shape) for t in fused if weight_map.get(t.name) == rel}
            problems += _check_header(store_dir, rel, expected)
    problems += _check_tasks(store_dir, manifest, fused, bad)
    try:
        _open_base(manifest).close()
    except (ValueError, OSError) as err:
        problems.append(f"base: {err}")
    return problems
