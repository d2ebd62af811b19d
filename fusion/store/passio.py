"""One generation's pass: read the base, the stored generation and new checkpoints chunk by chunk,
unify (fusion.engine.fuse_pass), write the unified delta and every task's triggers, and gather
the statistics the manifest keeps (L1 norms, mask density, reconstruction fidelity).

Memory is bounded by the chunk buffers: per chunk, one row of float32 for each task, whatever
the model's size. Reads are checked: the stored files against their block checksums, the base
against its content checksums (recorded by the first pass, which reads the base anyway).
New checkpoints are read on a small thread pool (preadv and the hash release the GIL) and hashed
as they are read, so the store can tell later whether a source still holds the same content.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..dtypes import DTYPES, from_float32, to_float32
from ..engine import StoredChunk, TensorSpec, fuse_pass
from ..fidelity import NUM_SUMS, finish as finish_fidelity
from ..io import Checkpoint
from ..reference import ChunkResult
from ..rescale import compute_rescalers
from . import faults, layout
from .manifest import TaskEntry
from .plan import FusedTensor, NewTask
from ..progress import progress_bar
from .snapshot import Snapshot
from .sources import DeltaSource
from .transaction import Transaction

__all__ = ["PassPlan", "PassResult", "OldSource", "run_pass"]

# Threads that read new checkpoints side by side: copies out of the page cache bound a pass.
_READER_THREADS = min(4, os.cpu_count() or 1)
_U8 = DTYPES["U8"]


@dataclass
class OldSource:
    """A kept task's fine-tune, still on disk with the same layout: its fidelity is measured again."""

    deltas: DeltaSource
    zero: set[str]  # fused tensors it did not contribute (their original delta is 0)
    content: str  # the content digest recorded when it was added


@dataclass
class PassPlan:
    """Everything one pass reads."""

    base: Checkpoint
    fused: list[FusedTensor]
    old: Snapshot | None  # the current generation (None for a first unify)
    keep: list[TaskEntry]  # stored tasks carried over, in order
    new: list[NewTask]
    sources: list[OldSource | None]  # per kept task
    mode: str
    kernel: object
    chunk: int
    max_shard_size: int

    @property
    def num_tasks(self) -> int:
        return len(self.keep) + len(self.new)


@dataclass
class PassResult:
    rescalers: np.ndarray  # (T, K) float64
    delta_l1: np.ndarray  # (T, K) float64
    mask_bits: np.ndarray  # (T,) int64
    fidelity: list[tuple[float | None, float | None] | None]  # per task, None where not measured
    contents: list[str]  # per new task: the digest of its fused bytes
    triggers: list[str]  # per task: its trigger file
    unified_files: list[str]
    weight_map: dict[str, str]


class _Sink:
    """The unified shards and one trigger file per task, written as the chunks arrive."""

    def __init__(self, plan: PassPlan, tx: Transaction, numbers: list[int]):
        self.fused = {t.name: t for t in plan.fused}
        meta = {"format": "condu-store", "generation": str(tx.generation)}
        self.unified = tx.unified_writer([(t.name, t.unified_dtype, t.shape) for t in plan.fused],
                                         max_shard_size=plan.max_shard_size, metadata=meta)
        self.trigger_names = [layout.trigger_name(n, tx.generation) for n in numbers]
        masks = [(t.name, _U8, (t.mask_bytes,)) for t in plan.fused]
        self.triggers = [tx.writer(rel, masks, metadata=meta) for rel in self.trigger_names]
        self.tx = tx

    def write(self, name: str, result: ChunkResult) -> None:
        self.unified.write(name, from_float32(result.unified, self.fused[name].unified_dtype))
        for writer, packed in zip(self.triggers, result.packed_masks):
            writer.write(name, packed)

    def finish(self) -> None:
        for rel, writer in self.unified.finish().items():
            self.tx.finished(rel, writer)
        for rel, writer in zip(self.trigger_names, self.triggers):
            writer.finish()
            self.tx.finished(rel, writer)


class _Reads:
    """The pass's sources: base chunks, new deltas, stored chunks, and originals for fidelity."""

    def __init__(self, plan: PassPlan):
        self.plan = plan
        self.spec = {t.name: t for t in plan.fused}
        rows = len(plan.new) * min(plan.chunk, max((t.numel for t in plan.fused), default=0))
        self.rows = np.empty(rows, dtype=np.float32)  # new deltas, reused every chunk
        self.base = np.empty(min(plan.chunk, max((t.numel for t in plan.fused), default=0)), dtype=np.float32)
        self.base_at: tuple[str, int] | None = None
        self.pool = ThreadPoolExecutor(max_workers=_READER_THREADS, thread_name_prefix="condu-read")

    def base_flat(self, name: str, lo: int, hi: int) -> np.ndarray:
        """theta0 on [lo, hi) in float32, read (and checked) once per chunk."""
        if self.base_at != (name, lo):
            self.plan.base.read_flat_into(name, lo, hi, self.base[: hi - lo])
            self.base_at = (name, lo)
        return self.base[: hi - lo]

    def new_deltas(self, name: str, lo: int, hi: int) -> np.ndarray:
        new = self.plan.new
        rows = self.rows[: len(new) * (hi - lo)].reshape(len(new), hi - lo)  # (T_new, n)
        base = self.base_flat(name, lo, hi)

        def load(j: int) -> None:
            if name in new[j].zero:
                rows[j] = 0.0
            else:
                new[j].deltas.read_delta(name, lo, hi, base, rows[j])

        list(self.pool.map(load, range(len(new))))  # each task's file on its own thread
        return rows

    def stored(self, name: str, lo: int, hi: int) -> StoredChunk:
        old, keep = self.plan.old, self.plan.keep
        unified = to_float32(old.unified(name, lo, hi), self.spec[name].unified_dtype)  # (n,)
        packed = np.stack([old.packed(t, name, lo, hi) for t in keep]) if keep else np.empty((0, -(-(hi - lo) // 8)), np.uint8)
        rescalers = np.array([t.rescaler_of(name) for t in keep], dtype=np.float64)  # (T_old,)
        return StoredChunk(unified, packed, rescalers)

    def originals(self, name: str, lo: int, hi: int, fresh: np.ndarray) -> dict[int, np.ndarray]:
        """Original deltas on [lo, hi) of the tasks whose fine-tune is at hand, by row of the pass."""
        t_old = len(self.plan.keep)
        found = {t_old + j: fresh[j] for j in range(len(self.plan.new))}
        for i, source in enumerate(self.plan.sources):
            if source is not None:
                row = np.zeros(hi - lo, dtype=np.float32)
                if name not in source.zero:
                    source.deltas.read_delta(name, lo, hi, self.base_flat(name, lo, hi), row)
                found[i] = row
        return found

    def close(self) -> None:
        self.pool.shutdown()


class _Stats:
    """Per task: mask bits set, and per tensor the fidelity sums (fusion.fidelity), in float64."""

    def __init__(self, num_tasks: int, num_tensors: int, kernel):
        self.bits = np.zeros(num_tasks, dtype=np.int64)
        self.sums = np.zeros((num_tasks, num_tensors, NUM_SUMS), dtype=np.float64)
        self.kernel = kernel

    def count(self, packed: np.ndarray) -> None:
        self.bits += np.bitwise_count(packed).sum(axis=1, dtype=np.int64)  # (T,)

    def add(self, rows: dict[int, np.ndarray], k: int, result: ChunkResult, pool) -> None:
        items = list(rows.items())

        def sums(item):
            return self.kernel.fidelity_sums(result.unified, result.packed_masks[item[0]], item[1])

        for (i, _), chunk_sums in zip(items, pool.map(sums, items)):  # the fast kernel releases the GIL
            self.sums[i, k] += chunk_sums


def _check_finite(plan: PassPlan, name: str, delta_l1: np.ndarray) -> None:
    """A NaN or Inf anywhere in a chunk's delta makes its L1 sum NaN or Inf: one cheap test."""
    for task, l1 in zip(plan.new, delta_l1.tolist()):
        if not math.isfinite(l1):
            raise ValueError(f"{task.where(name)}: tensor {name!r} has NaN or Inf in its delta; "
                             "fix or re-export the checkpoint")


def run_pass(plan: PassPlan, tx: Transaction, numbers: list[int], *, progress: bool) -> PassResult:
    """Stream every fused tensor through fuse_pass into generation tx.generation's files."""
    reads, stats = _Reads(plan), _Stats(plan.num_tasks, len(plan.fused), plan.kernel)
    sink = _Sink(plan, tx, numbers)
    column = {t.name: k for k, t in enumerate(plan.fused)}
    fresh: list[np.ndarray] = []

    def new_deltas(name, lo, hi):
        fresh[:] = [reads.new_deltas(name, lo, hi)]
        return fresh[0]

    def emit(name, lo, hi, result: ChunkResult) -> None:
        _check_finite(plan, name, result.delta_l1[len(plan.keep):])
        sink.write(name, result)
        stats.count(result.packed_masks)
        stats.add(reads.originals(name, lo, hi, fresh[0]), column[name], result, reads.pool)
        faults.hit("pass-chunk")

    specs = [TensorSpec(t.name, t.numel, t.unified_dtype) for t in plan.fused]
    bar = progress_bar(progress, sum(t.numel for t in plan.fused), "fuse")
    try:
        tables = fuse_pass(specs, num_tasks=plan.num_tasks, new_deltas=new_deltas, emit=emit,
                           stored=None if plan.old is None else reads.stored, kernel=plan.kernel, chunk=plan.chunk,
                           progress=bar.update if bar else None)
    finally:
        reads.close()
        if bar:
            bar.close()
    sink.finish()
    numels = np.array([t.numel for t in plan.fused])
    rescalers = compute_rescalers(tables.delta_l1, tables.masked_l1, numels, plan.mode)
    return PassResult(rescalers, tables.delta_l1, stats.bits, _fidelities(plan, stats, rescalers),
                      [task.deltas.content() for task in plan.new], sink.trigger_names,
                      list(dict.fromkeys(sink.unified.weight_map.values())), dict(sink.unified.weight_map))


def _fidelities(plan: PassPlan, stats: _Stats, rescalers: np.ndarray) -> list:
    """cosine and rel L2 per task where the original was read whole and unchanged, else None."""
    out = []
    for i in range(plan.num_tasks):
        source = plan.sources[i] if i < len(plan.keep) else None
        measured = i >= len(plan.keep) or (source is not None and source.deltas.content() == source.content)
        out.append(finish_fidelity(stats.sums[i], rescalers[i]) if measured else None)
    return out
