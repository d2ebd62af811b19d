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
from typing import NamedTuple

import numpy as np

from ..dtypes import DTYPES, DType, F32, from_float32, to_float32
from ..device import DeviceStage
from ..engine import TensorSpec, check_aligned, chunk_ranges
from ..errors import InputError
from ..kernels.host import rebuild_as, rebuild_into
from ..pipeline import RESULTS_IN_FLIGHT, run_stages
from ..io import HF_INDEX, HF_WEIGHTS, Checkpoint, SafetensorsWriter, ShardedWriter
from ..io.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from ..io.bounded_json import JsonLimits, loads
from ..io.files import copy_file_durably, fsync_dir, model_side_files
from ..io.format import TensorInfo
from ..progress import progress_bar
from .manifest import Manifest, TaskEntry
from .snapshot import Snapshot

__all__ = ["TaskStream", "ArrayTarget", "write_file", "write_folder", "check_output", "default_output", "model_card"]


class _Piece(NamedTuple):
    """One chunk of one output tensor."""

    name: str
    lo: int
    hi: int
    rebuilt: bool  # theta0 + lambda * M * u; else copied (a private tensor, or an integer buffer)


class _Ring:
    """Byte buffers handed out in turn: one per result that may still be in flight (fusion.pipeline)."""

    def __init__(self, count: int):
        self.buffers = [np.empty(0, dtype=np.uint8) for _ in range(count)]
        self.turn = 0

    def next(self, nbytes: int) -> np.ndarray:
        k, self.turn = self.turn, (self.turn + 1) % len(self.buffers)
        if self.buffers[k].size < nbytes:
            self.buffers[k] = np.empty(nbytes, dtype=np.uint8)
        return self.buffers[k][:nbytes]


def _as_float32(view: np.ndarray, dtype: DType, buffers: _Ring, n: int) -> np.ndarray:
    return view if dtype is F32 else to_float32(view, dtype, out=buffers.next(4 * n).view(np.float32))


class TaskStream:
    """A task's full state dict as a stream of flat chunks, in the output dtype's storage.

    Reading (and checking) the next chunk, rebuilding this one and writing the last overlap
    (fusion.pipeline), so the checks cost little time beside the copies they ride on. `fill`
    rebuilds each chunk in the place its bytes go (a direct writer's buffer, or the caller's
    array), so nothing is copied between the rebuild and the disk.
    """

    def __init__(self, snapshot: Snapshot, base: Checkpoint, task: TaskEntry, *, dtype: DType | None, rebuild,
                 chunk: int, stage: DeviceStage | None = None):
        """`rebuild(base, unified, packed, rescaler, *, out)`: a kernel's rebuild (fusion.kernels); with a
        device `stage`, rebuilt chunks are computed there and come out as torch tensors on it."""
        self.snapshot, self.base, self.task, self.dtype, self.rebuild, self.chunk, self.stage = (
            snapshot, base, task, dtype, rebuild, chunk, stage)
        self.fused = {t.name: t for t in snapshot.fused}
        check_aligned([TensorSpec(t.name, t.numel, t.unified_dtype) for t in snapshot.fused], chunk)
        self.private = snapshot.private(task)
        own = self.private.entries if self.private else {}
        # Output order: the base's tensors (a private one replaces its namesake), then new ones.
        self.sources: dict[str, TensorInfo] = {n: own.get(n) or base.info(n) for n in base.keys()}
        self.sources.update({n: i for n, i in own.items() if n not in self.sources})
        self.layout = [(n, self.out_dtype(n), i.shape) for n, i in self.sources.items()]
        self.slots, self.results = [_Ring(3), _Ring(3)], _Ring(RESULTS_IN_FLIGHT)

    def out_dtype(self, name: str) -> DType:
        """What tensor `name` is written in: the dtype asked for (floats only); else a rebuilt tensor in
        the task's own dtype where the store recorded it, and everything else as it is stored."""
        dtype = self.sources[name].dtype
        if not dtype.is_float:
            return dtype
        if self.dtype is not None:
            return self.dtype
        own = self.task.dtype_of(name) if self._rebuilt(name) else None
        return DTYPES[own] if own else dtype

    def _rebuilt(self, name: str) -> bool:
        return name in self.fused and not (self.private and name in self.private.entries)

    @property
    def main_dtype(self) -> DType:
        """The float dtype most of the output's elements are written in (config.json's `dtype`)."""
        counts: dict[DType, int] = {}
        for _, dtype, shape in self.layout:
            if dtype.is_float:
                counts[dtype] = counts.get(dtype, 0) + int(np.prod(shape))
        return max(counts, key=counts.get) if counts else F32

    @property
    def numel(self) -> int:
        return sum(int(np.prod(shape)) for _, _, shape in self.layout)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(shape)) * dtype.itemsize for _, dtype, shape in self.layout)

    def pieces(self) -> list[_Piece]:
        return [_Piece(name, lo, hi, self._rebuilt(name)) for name, _, _ in self.layout
                for lo, hi in chunk_ranges(self.sources[name].numel, self.chunk)]

    # -- the three stages ------------------------------------------------------------------------

    def _read(self, piece: _Piece, slot: int) -> tuple:
        """The chunk's inputs, copied into the slot's buffers (a reader's window is reused next read)."""
        name, lo, hi, n = piece.name, piece.lo, piece.hi, piece.hi - piece.lo
        buffers = self.slots[slot]
        if not piece.rebuilt:
            source = self.private if self.private and name in self.private.entries else self.base
            return (source.view_flat(name, lo, hi),)
        # Checked views outlive the next read of their file: enough for a reader one chunk ahead.
        base = _as_float32(self.base.view_flat(name, lo, hi), self.base.info(name).dtype, buffers, n)  # (n,)
        if self.fused[name].unified_dtype is F32:
            unified = self.snapshot.unified(name, lo, hi)  # (n,) the checked view
        else:  # widened, or dequantized (code * scale), into a buffer of the slot
            unified = self.snapshot.unified_float32(name, lo, hi, out=buffers.next(4 * n).view(np.float32))
        return base, unified, self.snapshot.packed(self.task, name, lo, hi)

    def _read_for(self, piece: _Piece, slot: int) -> tuple:
        inputs = self._read(piece, slot)
        return self.stage.upload_arrays(inputs) if self.stage and piece.rebuilt else inputs

    def _compute(self, piece: _Piece, inputs: tuple):
        """The chunk in the output dtype, in a buffer of its own until it is written (a device tensor
        for a rebuilt chunk on a device stage)."""
        if piece.rebuilt and self.stage:
            base, unified, packed = inputs
            theta = self.rebuild(base, unified, packed, self.task.rescaler_of(piece.name))  # (n,) float32 there
            return theta.to(getattr(self.stage.torch, self.out_dtype(piece.name).name))
        itemsize = self.out_dtype(piece.name).itemsize
        return self._compute_into(piece, inputs, self.results.next((piece.hi - piece.lo) * itemsize))

    def _compute_into(self, piece: _Piece, inputs: tuple, into: np.ndarray) -> np.ndarray:
        """The chunk in the output dtype's storage, written into `into` (bytes or that storage)."""
        info = self.sources[piece.name]
        out = self.out_dtype(piece.name)
        into = into.view(out.storage)  # (n,)
        if piece.rebuilt and self.rebuild is rebuild_into:  # the host's: rounded to `out` in the same pass
            base, unified, packed = inputs
            return rebuild_as(base, unified, packed, self.task.rescaler_of(piece.name), into, out)
        if piece.rebuilt:
            base, unified, packed = inputs
            scratch = into.view(np.float32) if out is F32 else self.results.next(4 * into.size).view(np.float32)
            theta = self.rebuild(base, unified, packed, self.task.rescaler_of(piece.name), out=scratch)  # (n,)
            return into if out is F32 else from_float32(theta, out, out=into)
        (raw,) = inputs
        if out is info.dtype:
            into[...] = raw
            return into
        return from_float32(to_float32(raw, info.dtype), out, out=into)

    def write_all(self, write, *, progress: bool) -> None:
        """write(name, flat chunk) for every chunk, in layout order (on a writer thread); a chunk's
        buffer is reused once `write` returns."""
        bar = progress_bar(progress, self.numel, "decouple")

        def finish(piece: _Piece, data: np.ndarray) -> None:
            write(piece.name, data)
            if bar:
                bar.update(data.size)

        try:
            run_stages(self.pieces(), self._read_for, self._compute, finish)
        finally:
            if bar:
                bar.close()

    def fill(self, target, *, progress: bool) -> None:
        """Every chunk computed straight into `target.reserve(name, count)` and then committed, in
        layout order: no copy between the rebuild and the writer's (or the caller's) buffers."""
        assert self.stage is None, "fill rebuilds on the host; a device stage streams through write_all"
        bar = progress_bar(progress, self.numel, "decouple")

        def compute(piece: _Piece, inputs: tuple) -> None:
            count = piece.hi - piece.lo
            self._compute_into(piece, inputs, target.reserve(piece.name, count))
            target.commit(piece.name, count)
            if bar:
                bar.update(count)

        try:
            run_stages(self.pieces(), self._read, compute, None)  # compute writes: no writer stage
        finally:
            if bar:
                bar.close()


class ArrayTarget:
    """A stream's chunks straight into one flat array per tensor, in its storage dtype (load_task)."""

    def __init__(self, layout):
        self.flat = {name: np.empty(int(np.prod(shape)), dtype=dtype.storage) for name, dtype, shape in layout}
        self.filled = dict.fromkeys(self.flat, 0)

    def reserve(self, name: str, count: int) -> np.ndarray:
        return self.flat[name][self.filled[name] : self.filled[name] + count]

    def commit(self, name: str, count: int) -> None:
        self.filled[name] += count


# ---- where an output may go -----------------------------------------------------------------


def _related(a: Path, b: Path) -> bool:
    """One path is the other, or lies inside it."""
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def default_output(name: str, protected: dict[str, Path]) -> Path:
    """./<task name>/, or ./<task name>-decoupled/ where the first is the store, the base or a source
    (fine-tunes often sit in folders named after their tasks)."""
    out = Path.cwd() / name
    if any(_related(out.resolve(), path.resolve()) for path in protected.values()):
        out = Path.cwd() / f"{name}-decoupled"
    return out


def check_output(out: Path, protected: dict[str, Path], *, force: bool) -> None:
    """Refuse an output that would touch the store, the base or a source; or, without force, anything."""
    target = out.resolve()
    for what, path in protected.items():
        if _related(target, path.resolve()):
            raise InputError(f"{out}: would write on or around {what} ({path}); choose an output elsewhere")
    if out.suffix == ".safetensors":
        if out.exists() and (out.is_dir() or not force):
            raise InputError(f"{out}: exists; pass --force to replace it, or choose another name")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise InputError(f"{out}: exists and is not an empty folder; pass --force to replace it, or choose another")
    elif out.exists() and not out.is_dir():
        raise InputError(f"{out}: is a file; a folder decouple needs a folder name (or name the output .safetensors)")


# ---- writers --------------------------------------------------------------------------------


def write_file(stream: TaskStream, out: Path, *, progress: bool) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with SafetensorsWriter(out, stream.layout, metadata={"format": "pt"}, checksums=False, direct=True) as writer:
        stream.fill(writer, progress=progress)
    fsync_dir(out.parent)
    return out


def _write_side_files(tmp: Path, side: dict[str, bytes], base_folder: Path | None, *, adapter: bool,
                      dtype: DType) -> None:
    """The task's own small files, or (for a task added from a lone file or as a dense adapter) the
    base folder's, copied with their checks and permissions; an adapter_config.json only in an
    adapter folder; config.json saying the dtype the weights were written in. Each fsynced."""
    wanted = (lambda name: True) if adapter else (lambda name: name != ADAPTER_CONFIG)
    if side:
        for name, data in side.items():
            if wanted(name):
                _write_durably(tmp / name, _config_with_dtype(data, dtype) if name == "config.json" else data)
    elif base_folder is not None:
        for p in model_side_files(base_folder):
            if wanted(p.name):
                copy_file_durably(p, tmp / p.name)
                if p.name == "config.json":  # rewritten in place: the copy keeps its permissions
                    _write_durably(tmp / p.name, _config_with_dtype((tmp / p.name).read_bytes(), dtype))


_CONFIG_LIMITS = JsonLimits(depth=16, brackets=1 << 20, commas=1 << 20)  # a config.json is shallow and small


def _config_with_dtype(data: bytes, dtype: DType) -> bytes:
    """config.json saying the dtype the weights were written in (`dtype`; `torch_dtype` if present)."""
    with contextlib.suppress(InputError):  # not a JSON object within bounds: written as it was given
        content = loads(data, _CONFIG_LIMITS, where="config.json", what="config", fix="")
        if isinstance(content, dict):
            content["dtype"] = dtype.name
            if "torch_dtype" in content:
                content["torch_dtype"] = dtype.name
            return (json.dumps(content, indent=2) + "\n").encode("utf-8")
    return data


def _write_durably(path: Path, data: bytes) -> None:
    """A new file in the temporary folder, fsynced: the folder is renamed into place only when whole."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


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
                           metadata={"format": "pt"}, checksums=False, direct=True) as writer:
            stream.fill(writer, progress=progress)
        if len(writer.shards) > 1:
            index = {"metadata": {"total_size": writer.total_size}, "weight_map": writer.weight_map}
            _write_durably(tmp / HF_INDEX, (json.dumps(index, indent=2) + "\n").encode("utf-8"))
        _write_side_files(tmp, side, base_folder, adapter=adapter, dtype=config_dtype)
        _write_durably(tmp / "README.md", card.encode("utf-8"))
        fsync_dir(tmp)  # the files above are fsynced as written; the rename below is the atomic step
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
