"""One generation's pass: read the base, the stored generation and new checkpoints chunk by chunk,
unify (fusion.engine.fuse_pass), write the unified delta and every task's triggers, and gather
the statistics the manifest keeps (L1 norms, mask density, reconstruction fidelity).

Memory is bounded by the chunk buffers: per chunk, one row of float32 for each task, whatever
the model's size. Reads are checked: the stored files against their block checksums, the base
against its content checksums (recorded by the first pass, which reads the base anyway).
New checkpoints are read on a small thread pool (preadv and the hash release the GIL) and hashed
as they are read, so the store can tell later whether a source still holds the same content;
when no row needs theta0 (the kernel subtracts it), the base and the stored generation are read
beside them, on the pass's reader thread (unify T = 8 x 64M: 1.81 s against 1.90 s, medians of
8 interleaved processes).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np

from ..dtypes import DTYPES, F32, BlockQuant, encode_blocks, from_float32, to_float32
from ..device import DeviceStage
from ..engine import ChunkInputs, StoredChunk, TensorSpec, fuse_pass
from ..errors import InputError, InvariantError
from ..fidelity import NUM_SUMS, finish as finish_fidelity
from ..io import Checkpoint
from ..reference import NOT_MEASURED, OWN_ROW, ChunkResult, Originals
from ..rescale import compute_rescalers
from . import faults, layout
from .guard import Finding, MagnitudeWatch
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
    device: DeviceStage | None = None  # a torch device the kernel runs on (None: the host)
    operation: str = "add"  # what the pass is for, as errors name it: unify, add, remove
    allow_degrade: bool = False  # record (instead of refusing) new deltas out of bounds (fusion.store.guard)

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
    drift: np.ndarray | None = None  # (T, K, 5) each task's sums against its input row (stored tasks only)
    findings: list[Finding] | None = None  # new deltas out of bounds, let through by allow_degrade


class _Sink:
    """The unified shards and one trigger file per task, written as the chunks arrive."""

    def __init__(self, plan: PassPlan, tx: Transaction, numbers: list[int]):
        self.fused = {t.name: t for t in plan.fused}
        meta = {"format": "condu-store", "generation": str(tx.generation)}
        self.unified = tx.unified_writer([(t.name, *t.unified_layout) for t in plan.fused],
                                         max_shard_size=plan.max_shard_size, metadata=meta)
        self.trigger_names = [layout.trigger_name(n, tx.generation) for n in numbers]
        masks = [(t.name, _U8, (t.mask_bytes,)) for t in plan.fused]
        self.triggers = [tx.writer(rel, masks, metadata=meta) for rel in self.trigger_names]
        self.tx = tx

    def write(self, name: str, result: ChunkResult) -> None:
        form = self.fused[name].unified_dtype
        if isinstance(form, BlockQuant):
            self.unified.write(name, quantized_records(name, result.unified, result.scales, form))
        else:
            self.unified.write(name, from_float32(result.unified, form))
        for writer, packed in zip(self.triggers, result.packed_masks):
            writer.write(name, packed)

    def finish(self) -> None:
        for rel, writer in self.unified.finish().items():
            self.tx.finished(rel, writer)
        for rel, writer in zip(self.trigger_names, self.triggers):
            writer.finish()
            self.tx.finished(rel, writer)


def quantized_records(name: str, unified: np.ndarray, scales: np.ndarray | None, form: BlockQuant) -> np.ndarray:
    """A chunk's records (fusion.dtypes.encode_blocks) from the pass's dequantized u (n,) and block
    scales: each code is rint(u / scale), and code * scale must give u back bit for bit (checked:
    these bytes are the only copy)."""
    u = np.ascontiguousarray(unified, dtype=np.float32)  # (n,)
    n = u.size
    if scales is None or np.size(scales) != -(-n // form.block):
        raise InvariantError(f"tensor {name!r}: the pass gave {np.size(scales) if scales is not None else 'no'} "
                             f"block scales for {n} elements of a {form.name} unified delta")
    scales = np.ascontiguousarray(scales, dtype=np.float32)
    if not (np.isfinite(u).all() and np.isfinite(scales).all()):
        raise InputError(f"tensor {name!r}: its unified delta overflows {form.name}; store it in float32 "
                         "(--dtype float32)")
    spread = np.repeat(scales, form.block)[:n]  # (n,) each element's scale
    steps = np.rint(np.divide(u, spread, out=np.zeros(n, np.float32), where=spread > 0))
    codes = np.clip(steps, -form.qmax, form.qmax).astype(np.int8)
    if not (np.array_equal(steps, codes) and np.array_equal((codes * spread).view(np.uint32), u.view(np.uint32))):
        raise InvariantError(f"tensor {name!r}: the pass's {form.name} unified delta is not code * scale")
    return encode_blocks(codes, scales, form)


class _Slot:
    """The arrays one chunk is read into; a pass alternates between two (fusion.pipeline)."""

    def __init__(self, plan: PassPlan, n: int, num_sources: int):
        empty = plan.device.host_buffer if plan.device else np.empty  # pinned for a device: async copies
        self.base = empty(n, np.float32)  # theta0
        self.new = empty(len(plan.new) * n, np.float32)  # new tasks' rows
        self.originals = empty(num_sources * n, np.float32)  # kept tasks' sources, for fidelity
        self.unified = empty(n if plan.old else 0, np.float32)
        self.packed = empty(len(plan.keep) * -(-n // 8), np.uint8)

    @staticmethod
    def rows(buffer: np.ndarray, count: int, n: int) -> np.ndarray:
        return buffer[: count * n].reshape(count, n)  # (count, n)


def _float32_view(checkpoint: Checkpoint, name: str, lo: int, hi: int, out: np.ndarray, *, copy: bool) -> np.ndarray:
    """Elements [lo, hi) as float32: the reader's own (checked) view when stored so, else (or with
    `copy`, for a device: pinned buffers copy up asynchronously) widened into `out`.

    A view outlives the next read of its file (fusion.io.reader), which is all a pipelined pass
    needs: the reader is one chunk ahead of the kernel at most."""
    view = checkpoint.view_flat(name, lo, hi)
    info = checkpoint.info(name)
    return view if info.dtype is F32 and not copy else to_float32(view, info.dtype, out=out)


class _Reads:
    """The pass's inputs, chunk by chunk: theta0, the new tasks' rows, the stored generation, and
    the sources of kept tasks whose fidelity is measured again.

    Rows are fine-tuned weights, and the kernel subtracts theta0 (`ChunkInputs.base`), when every
    source can read its weights; otherwise they are deltas (a dense adapter gives only those).
    Either way the delta is the same float32 subtraction.
    """

    def __init__(self, plan: PassPlan):
        self.plan = plan
        self.spec = {t.name: t for t in plan.fused}
        self.measured = [i for i, s in enumerate(plan.sources) if s is not None]  # kept tasks with a source
        sources = [t.deltas for t in plan.new] + [plan.sources[i].deltas for i in self.measured]
        self.weights = all(hasattr(source, "read_weights") for source in sources)
        largest = min(plan.chunk, max((t.numel for t in plan.fused), default=0))
        self.slots = [_Slot(plan, largest, len(self.measured)) for _ in range(2)]
        index = [NOT_MEASURED] * len(plan.keep) + [OWN_ROW] * len(plan.new)
        for r, i in enumerate(self.measured):
            index[i] = r
        self.index = np.array(index, dtype=np.int64)  # (T,)
        self.pool = ThreadPoolExecutor(max_workers=_READER_THREADS, thread_name_prefix="condu-read")
        self.watch = MagnitudeWatch(plan.new, {t.name: t.numel for t in plan.fused}, largest,
                                    operation=plan.operation, allow=plan.allow_degrade)

    def read(self, name: str, lo: int, hi: int, slot: int) -> ChunkInputs:
        buffers, n = self.slots[slot], hi - lo
        new = _Slot.rows(buffers.new, len(self.plan.new), n)  # (T_new, n)
        originals = _Slot.rows(buffers.originals, len(self.measured), n)  # (R, n)
        jobs = [(task.deltas, task.zero, new[j]) for j, task in enumerate(self.plan.new)]
        jobs += [(self.plan.sources[i].deltas, self.plan.sources[i].zero, originals[r]) for r, i in enumerate(self.measured)]
        read_base = lambda: _float32_view(self.plan.base, name, lo, hi, buffers.base[:n],  # noqa: E731
                                          copy=self.plan.device is not None)
        # theta0 first only where a row needs it (a zero delta, or a delta source); else it is read
        # beside the rows, on this thread, with the stored generation.
        base = read_base() if not self.weights or any(name in zero for _, zero, _ in jobs) else None
        rows = [self.pool.submit(self._row, name, lo, hi, base, *job) for job in jobs]  # each file on its own thread
        try:
            base = read_base() if base is None else base
            stored = self._stored(name, lo, hi, buffers)
        finally:
            wait(rows)  # no row is still being written into the slot when this returns or raises
        for row in rows:
            row.result()
        self.watch.chunk(name, new, base, self.weights)
        # drift: how far the pass moves each stored task's rebuild (fusion.store.guard)
        return ChunkInputs(new, base if self.weights else None, stored,
                           Originals(originals, self.index, drift=bool(self.plan.keep)))

    def _row(self, name: str, lo: int, hi: int, base: np.ndarray | None, source, zero: set[str], out: np.ndarray) -> None:
        """One task's row: its weights (or delta), or theta0 (a zero delta) for a tensor it lacks;
        `base` (theta0 on the chunk) is needed only for those two."""
        if name in zero:
            out[...] = base if self.weights else 0.0
        elif self.weights:
            source.read_weights(name, lo, hi, out)
        else:
            source.read_delta(name, lo, hi, base, out)

    def _stored(self, name: str, lo: int, hi: int, buffers: _Slot) -> StoredChunk | None:
        """The stored chunk, copied out of the readers' windows: the next read reuses them."""
        old, keep = self.plan.old, self.plan.keep
        if old is None:
            return None
        out = buffers.unified[: hi - lo]
        unified = old.unified_float32(name, lo, hi, out=out)  # checked: float32 as is, else widened or dequantized
        if self.plan.device is not None and unified is not out:  # a device copies up from the slot's pinned buffer
            np.copyto(out, unified)
            unified = out
        packed = _Slot.rows(buffers.packed, len(keep), -(-(hi - lo) // 8))  # (T_old, n/8)
        for i, task in enumerate(keep):
            packed[i] = old.packed(task, name, lo, hi)
        rescalers = np.array([t.rescaler_of(name) for t in keep], dtype=np.float64)  # (T_old,)
        return StoredChunk(unified, packed, rescalers)

    def close(self) -> None:
        self.pool.shutdown()


def _check_finite(plan: PassPlan, name: str, delta_l1: np.ndarray) -> None:
    """A NaN or Inf anywhere in a chunk's delta makes its L1 sum NaN or Inf: one cheap test."""
    for task, l1 in zip(plan.new, delta_l1.tolist()):
        if not math.isfinite(l1):
            raise InputError(f"{task.where(name)}: tensor {name!r} has NaN or Inf in its delta; "
                             "fix or re-export the checkpoint")


def run_pass(plan: PassPlan, tx: Transaction, numbers: list[int], *, progress: bool) -> PassResult:
    """Stream every fused tensor through fuse_pass into generation tx.generation's files."""
    reads, sink = _Reads(plan), _Sink(plan, tx, numbers)
    bits = np.zeros(plan.num_tasks, dtype=np.int64)
    sums = np.zeros((plan.num_tasks, len(plan.fused), NUM_SUMS), dtype=np.float64)  # (T, K, 5)
    drift = np.zeros_like(sums) if plan.keep else None  # (T, K, 5)
    column = {t.name: k for k, t in enumerate(plan.fused)}
    numel = {t.name: t.numel for t in plan.fused}

    def emit(name: str, lo: int, hi: int, result: ChunkResult) -> None:
        _check_finite(plan, name, result.delta_l1[len(plan.keep):])
        if hi == numel[name]:
            reads.watch.tensor_done(name)  # before anything of an out-of-bounds tensor is written
        sink.write(name, result)
        bits[:] += np.bitwise_count(result.packed_masks).sum(axis=1, dtype=np.int64)  # (T,)
        sums[:, column[name]] += result.fidelity
        if drift is not None:
            drift[:, column[name]] += result.drift
        faults.hit("pass-chunk")

    specs = [TensorSpec(t.name, t.numel, t.unified_dtype) for t in plan.fused]
    bar = progress_bar(progress, sum(t.numel for t in plan.fused), "fuse")
    try:
        tables = fuse_pass(specs, num_tasks=plan.num_tasks, read=reads.read, emit=emit, kernel=plan.kernel,
                           chunk=plan.chunk, progress=bar.update if bar else None, pipelined=True, device=plan.device)
    finally:
        reads.close()
        if bar:
            bar.close()
    sink.finish()
    numels = np.array([t.numel for t in plan.fused])
    rescalers = compute_rescalers(tables.delta_l1, tables.masked_l1, numels, plan.mode)
    return PassResult(rescalers, tables.delta_l1, bits, _fidelities(plan, sums, rescalers),
                      [task.deltas.content() for task in plan.new], sink.trigger_names,
                      list(dict.fromkeys(sink.unified.weight_map.values())), dict(sink.unified.weight_map),
                      drift, reads.watch.findings)


def _fidelities(plan: PassPlan, sums: np.ndarray, rescalers: np.ndarray) -> list:
    """cosine and rel L2 per task where the original was read whole and unchanged, else None."""
    out = []
    for i in range(plan.num_tasks):
        source = plan.sources[i] if i < len(plan.keep) else None
        measured = i >= len(plan.keep) or (source is not None and source.deltas.content() == source.content)
        out.append(finish_fidelity(sums[i], rescalers[i]) if measured else None)
    return out
