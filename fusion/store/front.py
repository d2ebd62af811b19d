"""`Store`: the ConDU store folder, a thin front end over the modules that do the work.

    store = Store.unify("condu-store", "base/", ["ft_a/", "ft_b/"])   # generation 0
    record = store.add("ft_c/", name="sst2")                          # the continual step
    store.decouple("sst2", "sst2/")                                   # a folder from_pretrained loads
    weights = store.load_task(3)                                      # numpy arrays, or torch on a device
    store.remove(2)                                                   # tasks 1 and 3 keep their numbers
    assert store.verify().ok

Tasks are chosen by number (an int, or a string of digits) or by name; names are never
numbers, so the two cannot be confused, and a task keeps its number for life.

Every checkpoint argument (the base included) may be a hub id, `org/name[@revision]`
(fusion.store.inputs); without a base, `unify` takes the one the checkpoints record. A PEFT
LoRA adapter is a checkpoint too (fusion.store.adapters): with an adapter as the base the store
fuses adapters in factor space, with a model as the base it counts each adapter as its dense delta.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..dtypes import DType, FLOAT_NAMES, parse_dtype, unified_form
from ..engine import DEFAULT_CHUNK
from ..errors import InputError
from ..fuse import FusedDeltas
from ..io import as_array, open_checkpoint
from ..io.files import atomic_write_bytes
from ..io.integrity import digest_file
from ..device import DeviceStage, resolve_device
from ..kernels import get_kernel
from ..kernels.host import rebuild_into
from ..torch_compat import is_torch, to_torch
from . import layout
from .export import ArrayTarget, TaskStream, check_output, default_output, model_card, write_file, write_folder
from .adapters import plan_input
from .generation import (PASS_ELEMENTS, Runner, check_unify_args, create, file_table, next_generation, no_store_yet,
                         refuse_related, replaced)
from .inputs import InferredBase, Input, infer_base, resolve_input
from .inspect import Health, audit, info
from .manifest import Manifest, ManifestError, TaskEntry, load_manifest, read_manifest_file
from .memory import (check_fused_args, check_new_store, checkpoint_inputs, host_array, read_fused, refuse_memory_base,
                     write_fused)
from .plan import FusedTensor, check_missing
from .records import TaskRecord, default_task_name, select_task
from .snapshot import open_base, open_snapshot, reading
from .transaction import change, remove_new_store, writer_lock

__all__ = ["Store", "TaskRecord", "DEFAULT_SHARD_SIZE", "DEFAULT_MODEL_SHARD_SIZE", "PASS_ELEMENTS"]

DEFAULT_SHARD_SIZE = 2 << 30  # unified delta shards
DEFAULT_MODEL_SHARD_SIZE = 5 << 30  # decoupled model shards, as save_pretrained


def _rebuild(name: str | None, stage: DeviceStage | None = None):
    """Decouple's rebuild: on a device torch's; else the kernel asked for, or the host's numpy one
    (no kernel to load)."""
    if stage is not None:
        from .. import reference_torch

        return reference_torch.rebuild
    return rebuild_into if name in (None, "cpu") else get_kernel(name).rebuild


def _output_stage(device) -> DeviceStage | None:
    """Where load_task rebuilds: a device stage for a CUDA device (or one given), else the host."""
    if isinstance(device, DeviceStage):
        return device
    if device is None or str(device) == "cpu":
        return None
    resolved = resolve_device(str(device))
    return None if resolved == "cpu" else DeviceStage(resolved, kernel=None)


class Store:
    """A ConDU store folder. Create one with `Store.unify`, open one with `Store.open`."""

    def __init__(self, path: str | os.PathLike, *, kernel: str | None = None, chunk: int | None = None,
                 device: str | DeviceStage = "auto"):
        """`device`: where passes (unify, add, remove) run: auto (CUDA when there is one), cpu, cuda,
        cuda:N, or a fusion.device.DeviceStage; `kernel` picks a kernel by name instead."""
        self.path = Path(path)
        self.kernel = kernel
        self.chunk = chunk  # None: sized by the task count
        self.device = device
        self.last_pass: dict = {}  # where the last pass ran, and the device memory it peaked at
        self.inferred_base: InferredBase | None = None  # unify without a base: the one the checkpoints record
        self._manifest = load_manifest(self.path)

    @classmethod
    def open(cls, path: str | os.PathLike, **options) -> "Store":
        return cls(path, **options)

    @classmethod
    def exists(cls, path: str | os.PathLike) -> bool:
        """Whether `path` holds a store, whole or not: its manifest, or the backup a repair restores
        it from. Where it does, `unify` refuses and `open` opens it or says what to do."""
        path = Path(path)
        return (path / layout.MANIFEST).is_file() or (path / layout.BACKUP).is_file()

    # -- reading -----------------------------------------------------------------------------

    def manifest(self) -> Manifest:
        self._manifest = load_manifest(self.path)
        return self._manifest

    @property
    def generation(self) -> int:
        return self.manifest().generation

    @property
    def rescaler_mode(self) -> str:
        return self.manifest().rescaler

    @property
    def tasks(self) -> list[TaskRecord]:
        return [TaskRecord.of(t) for t in self.manifest().tasks]

    def task(self, task: int | str) -> TaskRecord:
        """A task by number or by name."""
        return TaskRecord.of(select_task(self.manifest(), task, self.path))

    def info(self) -> dict:
        manifest = self.manifest()
        return info(self.path, manifest, [TaskRecord.of(t) for t in manifest.tasks])

    def verify(self) -> Health:
        """Read every file and the base in full, check every block; per task, what is whole."""
        return audit(self.path, self.manifest())

    # -- decouple ----------------------------------------------------------------------------

    def _stream(self, task: int | str, dtype, *, side: bool = False, stage: DeviceStage | None = None):
        """Open the generation's unified delta and the task's files, and the base; yield a TaskStream."""
        chosen: list[TaskEntry] = []

        def select(m: Manifest) -> list[str]:
            entry = select_task(m, task, self.path)
            chosen[:] = [entry]
            return [*m.unified.files, entry.triggers, *([entry.private] if entry.private else [])]

        def side_files(m: Manifest) -> list[str]:
            return list(select_task(m, task, self.path).files.values()) if side else []

        snapshot = open_snapshot(self.path, select, side=side_files)
        try:
            base = open_base(snapshot.manifest)
        except BaseException:
            snapshot.close()
            raise
        stream = TaskStream(snapshot, base, chosen[0], dtype=parse_dtype(dtype) if dtype else None,
                            rebuild=_rebuild(self.kernel, stage), chunk=self.chunk or DEFAULT_CHUNK, stage=stage)
        return snapshot, base, stream

    @contextlib.contextmanager
    def _opened(self, task, dtype, *, side: bool = False, stage: DeviceStage | None = None):
        snapshot, base, stream = self._stream(task, dtype, side=side, stage=stage)
        try:
            yield snapshot, base, stream
        finally:
            snapshot.close()
            base.close()

    def decouple(self, task: int | str, out: str | os.PathLike | None = None, *, dtype=None, force: bool = False,
                 progress: bool = False, max_shard_size: int = DEFAULT_MODEL_SHARD_SIZE) -> Path:
        """Write one task's full model: `out` ending in .safetensors is one file, anything else a model
        folder (default: a folder named after the task in the current directory). In factor space
        the folder is an adapter folder that PeftModel.from_pretrained loads. Float tensors are written
        in `dtype`, by default in the task's own (its fine-tune's, recorded when it was added)."""
        if dtype is not None and parse_dtype(dtype).name not in FLOAT_NAMES:
            raise InputError(f"dtype {dtype!r}: decouple writes one of {', '.join(FLOAT_NAMES)}")
        to_folder = out is None or Path(out).suffix != ".safetensors"  # a lone weights file reads no side files
        with self._opened(task, dtype, side=to_folder) as (snapshot, base, stream):
            out = Path(out) if out is not None else default_output(stream.task.name, self._protected(snapshot.manifest))
            if out.suffix.lower() in (".bin", ".pt", ".pth", ".ckpt"):
                raise InputError(f"{out}: decouple writes safetensors only; name the output .safetensors or a folder")
            check_output(out, self._protected(snapshot.manifest), force=force)
            if out.suffix == ".safetensors":
                return write_file(stream, out, progress=progress)
            manifest, entry = snapshot.manifest, stream.task
            side = {Path(rel).name: snapshot.raw[rel] for rel in entry.files.values()}
            out_dtype = stream.main_dtype
            base_folder = base.path if base.is_folder else None
            return write_folder(stream, out, side=side, base_folder=base_folder,
                                card=model_card(self.path, manifest, entry, out_dtype), config_dtype=out_dtype,
                                max_shard_size=max_shard_size, progress=progress, adapter=manifest.space == "factors")

    def _protected(self, manifest: Manifest) -> dict[str, Path]:
        protected = {"the store": self.path, "the base": Path(manifest.base.path)}
        protected.update({f"the source of task {t.number}": Path(t.source.path) for t in manifest.tasks})
        return protected

    def load_task(self, task: int | str, *, dtype=None, device=None) -> dict:
        """A task's rebuilt full state dict in memory: numpy arrays, or torch tensors on `device`.

        On a CUDA device the weights are rebuilt there, chunk by chunk, from the checked host
        reads: the model never exists whole in host memory."""
        stage = _output_stage(device)
        if stage is not None:
            return self._load_onto(task, dtype, stage)
        with self._opened(task, dtype) as (_, _, stream):
            target = ArrayTarget(stream.layout)  # chunks are rebuilt in place, never copied
            stream.fill(target, progress=False)
            out = {name: (target.flat[name].reshape(shape), d) for name, d, shape in stream.layout}
        return _as_user_arrays(out, device)

    def _load_onto(self, task, dtype, stage: DeviceStage) -> dict:
        torch = stage.torch
        with self._opened(task, dtype, stage=stage) as (_, _, stream):
            out = {name: torch.empty(int(np.prod(shape)), dtype=getattr(torch, d.name), device=stage.device)
                   for name, d, shape in stream.layout}
            kinds = {name: d for name, d, _ in stream.layout}
            filled = dict.fromkeys(out, 0)

            def write(name: str, piece) -> None:
                piece = piece if is_torch(piece) else to_torch(piece, kinds[name])
                out[name][filled[name] : filled[name] + piece.numel()].copy_(piece)
                filled[name] += piece.numel()

            stream.write_all(write, progress=False)
            return {name: out[name].reshape(shape) for name, _, shape in stream.layout}

    # -- changes -----------------------------------------------------------------------------

    @classmethod
    def unify(cls, path: str | os.PathLike, base: str | os.PathLike | None,
              checkpoints: Sequence[str | os.PathLike | Mapping],
              *, names: Sequence[str] | None = None, rescaler: str = "model", dtype=None, missing: str = "error",
              kernel: str | None = None, chunk: int | None = None, progress: bool = False,
              max_shard_size: int = DEFAULT_SHARD_SIZE, device: str | DeviceStage = "auto",
              allow_degrade: bool = False) -> "Store":
        """A new store from `base` and a one-shot (EMR-style) unify of the checkpoints' deltas.

        `base` and the checkpoints are paths or hub ids, and a checkpoint may be a state dict too
        (numpy arrays or torch tensors; named `task<N>` unless `names` says; recorded as in memory,
        fusion.store.memory). `base=None` takes the base the checkpoints record, when they all
        record the same one and it resolves (the store's `inferred_base` says which record). Two
        checkpoints of the same content are refused unless `names` is given. A delta out of all
        proportion to the base is refused unless `allow_degrade` (fusion.store.guard). `dtype` is how
        the unified delta is stored: float32, float16 or bfloat16 (default: the base's), or the compact
        int8 / int4 (blocks of 64 elements, each with a float32 scale: 8.5 or 4.5 bits an element,
        rounded inside every pass as 16-bit dtypes are; fusion.reference.quantize_blocks)."""
        store_dir = Path(path)
        check_unify_args(store_dir, checkpoints, names, rescaler, missing, dtype)
        refuse_memory_base(base, checkpoints)
        inferred = infer_base(checkpoints) if base is None else None
        base_input = resolve_input(base if base is not None else inferred.base)
        numbers = range(1, len(checkpoints) + 1)
        labels, default_names = [f"state dict {k}" for k in numbers], [f"task{k}" for k in numbers]
        created, had_lock = not store_dir.exists(), (store_dir / layout.LOCK).exists()
        runner = Runner(kernel, device)
        with checkpoint_inputs(checkpoints, labels, default_names) as inputs:
            store_dir.mkdir(parents=True, exist_ok=True)
            try:
                with change(store_dir, lambda: no_store_yet(store_dir)) as tx:
                    create(tx, base_input, inputs, names, rescaler, unified_form(dtype) if dtype else None, missing,
                           runner, chunk, progress, max_shard_size, allow_degrade=allow_degrade)
            except BaseException:
                remove_new_store(store_dir, created, had_lock)
                raise
        store = cls(store_dir, kernel=kernel, chunk=chunk, device=device)
        store.last_pass, store.inferred_base = runner.report, inferred
        return store

    def add(self, checkpoint: str | os.PathLike | Mapping, *, name: str | None = None, missing: str | None = None,
            progress: bool = False, allow_degrade: bool = False) -> TaskRecord:
        """The ConDU continual step: rebuild every task, unify them with the new checkpoint's delta.
        `checkpoint` is a path, a hub id or a state dict (named `task<N>` unless `name` says); the
        content of a stored task is refused unless `name` is given, and a change that would damage
        a stored task (fusion.store.guard) unless `allow_degrade`."""
        default = f"task{self.manifest().next_number}"  # a state dict's name (a commit in between only shifts it)
        with checkpoint_inputs([checkpoint], ["the state dict"], [default]) as (source,):
            return self._add(source, name, missing, progress, allow_degrade)

    def _add(self, source: Input, name: str | None, missing: str | None, progress: bool,
             allow_degrade: bool = False) -> TaskRecord:
        named = name is not None
        with change(self.path, lambda: load_manifest(self.path)) as tx:
            manifest = tx.current
            fused = [FusedTensor.of(e) for e in manifest.tensors]
            runner = Runner(self.kernel, self.device)
            runner.start(fused, len(manifest.tasks) + 1)
            with open_base(manifest) as base, open_checkpoint(source.path) as ckpt:
                name = name or default_task_name(source.default_name(ckpt.name), [t.name for t in manifest.tasks])
                if manifest.task_by_name(name):
                    raise InputError(f"{self.path}: a task named {name!r} exists already; pass another --name")
                refuse_related(source.path, self.path, "the checkpoint", "the store")
                new = plan_input(ckpt, base, fused, space=manifest.space, base_config=manifest.base.adapter_config,
                                 name=name, number=manifest.next_number,
                                 missing=check_missing(missing or manifest.missing), source=source.source, hub=source.hub)
                self._manifest = next_generation(tx, base, fused, list(manifest.tasks), [new], runner, self.chunk,
                                                  progress, keep_copies=named, allow_degrade=allow_degrade)
        self.last_pass = runner.report
        return TaskRecord.of(self._manifest.tasks[-1])

    def remove(self, task: int | str, *, progress: bool = False, allow_degrade: bool = False) -> TaskRecord:
        """Drop a task and re-unify the others from their reconstructions; its files are never read.
        Refused if that would damage another task (fusion.store.guard), unless `allow_degrade`."""
        with change(self.path, lambda: load_manifest(self.path)) as tx:
            manifest = tx.current
            gone = select_task(manifest, task, self.path)
            if len(manifest.tasks) == 1:
                raise InputError(f"{self.path}: task {gone.number} ({gone.name}) is the only one; delete the store "
                                 "folder instead")
            keep = [t for t in manifest.tasks if t.number != gone.number]
            fused = [FusedTensor.of(e) for e in manifest.tensors]
            runner = Runner(self.kernel, self.device)
            runner.start(fused, len(keep))
            with open_base(manifest) as base:
                self._manifest = next_generation(tx, base, fused, keep, [], runner, self.chunk, progress,
                                                  operation="remove", removed=gone, allow_degrade=allow_degrade)
        self.last_pass = runner.report
        return TaskRecord.of(gone)

    @classmethod
    def from_fused(cls, path: str | os.PathLike, base: str | os.PathLike, state: FusedDeltas, *,
                   names: Sequence[str] | None = None, max_shard_size: int = DEFAULT_SHARD_SIZE, **options) -> "Store":
        """A new store holding an in-memory `state` (fusion.FusedDeltas) as it is, bit for bit: its
        unified delta, masks, rescalers and private tensors; task t of the state is task t here,
        named `names[t - 1]` (default `task<t>`). `base` is the path or hub id of the base the
        deltas were taken from; the state must fuse what a store of it fuses (fusion.unify with
        base=). `options` open the store (Store's keywords)."""
        store_dir = Path(path)
        names = check_fused_args(state, names)
        check_new_store(store_dir)
        refuse_memory_base(base, [])
        base_input = resolve_input(base)
        created, had_lock = not store_dir.exists(), (store_dir / layout.LOCK).exists()
        store_dir.mkdir(parents=True, exist_ok=True)
        try:
            with change(store_dir, lambda: no_store_yet(store_dir)) as tx:
                write_fused(tx, base_input, state, names, max_shard_size)
        except BaseException:
            remove_new_store(store_dir, created, had_lock)
            raise
        return cls(store_dir, **options)

    def fused(self) -> FusedDeltas:
        """The current generation as a fusion.FusedDeltas of numpy arrays (read whole, every block
        checked): task t of the state is the t-th stored task, `self.tasks[t - 1]`. Its L1 tables
        are None: the store keeps per task only their total."""
        return read_fused(self.path)

    def attach(self, task: int | str, name: str, tensors: Mapping[str, np.ndarray]) -> None:
        """Keep named data with a task (the driver's class prototypes); the store does not interpret it."""
        layout.check_token(name, "an attachment name")
        with change(self.path, lambda: load_manifest(self.path)) as tx:
            manifest = tx.current
            entry = select_task(manifest, task, self.path)
            rel = layout.attachment_name(entry.number, name, tx.generation)
            arrays = {k: _host_array(v) for k, v in tensors.items()}
            with tx.writer(rel, [(k, d, a.shape) for k, (a, d) in arrays.items()], metadata={"format": "condu-store"}) as w:
                for k, (a, _) in arrays.items():
                    w.write(k, a)
            tx.finished(rel, w)
            attachments = {**entry.attachments, name: rel}
            tasks = [t if t.number != entry.number else replaced(t, attachments=attachments) for t in manifest.tasks]
            self._manifest = tx.commit(replaced(manifest, generation=tx.generation, tasks=tasks,
                                             files=file_table(tx, manifest.unified.files, tasks)))

    def attachment(self, task: int | str, name: str) -> dict[str, np.ndarray] | None:
        """Data kept with a task under `name`, or None."""
        def select(m: Manifest) -> list[str]:
            rel = select_task(m, task, self.path).attachments.get(name)
            return [rel] if rel else []

        with reading(self.path, select) as snapshot:
            if not snapshot.files:
                return None
            (f,) = snapshot.files.values()
            return {n: _user_array(f.read(n), f.info(n).dtype) for n in f.keys()}

    def set_base(self, path: str | os.PathLike) -> None:
        """Point the store at a moved or copied base (a path or a hub id); accepted only if its content is the same."""
        new_input = resolve_input(path)
        new = new_input.path
        with change(self.path, lambda: load_manifest(self.path)) as tx:
            manifest = tx.current
            with open_checkpoint(new) as ckpt:
                files = set(ckpt.files)
            if files != set(manifest.base.files):
                raise InputError(f"{new}: holds the files {sorted(files)}, the store's base {sorted(manifest.base.files)}; "
                                 "point it at a copy of the same base")
            for name, recorded in manifest.base.files.items():
                found = digest_file(new / name if new.is_dir() else new, block=recorded.block)
                if recorded.file_digests().first_mismatch(found) is not None:
                    raise InputError(f"{new}: {name} differs from the base the store was made from; point it at a "
                                     "copy of the same base")
            base = replaced(manifest.base, path=new_input.source, hub=new_input.hub)
            self._manifest = tx.commit(replaced(manifest, generation=tx.generation, base=base,
                                             files=dict(manifest.files)))

    @staticmethod
    def repair(path: str | os.PathLike) -> str:
        """Restore condu.json from condu.backup.json (when the backup is whole and the main copy is not), or
        the backup from a whole condu.json."""
        return _repair(Path(path))

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, generation={self._manifest.generation}, tasks={len(self._manifest.tasks)})"


# ---- helpers of the changes -----------------------------------------------------------------


def _repair(store_dir: Path) -> str:
    """condu.json from a whole backup, or the backup from a whole condu.json; under the writer lock."""
    if not any((store_dir / name).exists() for name in (layout.MANIFEST, layout.BACKUP)):
        raise InputError(f"{store_dir}: no store here (neither {layout.MANIFEST} nor {layout.BACKUP}); check --store")
    with writer_lock(store_dir):
        try:
            read_manifest_file(store_dir / layout.MANIFEST)
        except (ManifestError, FileNotFoundError):
            return _restore_manifest(store_dir)
        return _restore_backup(store_dir)


def _restore_backup(store_dir: Path) -> str:
    """A whole condu.json: the backup made equal to it again when it is missing, damaged or stale."""
    main, backup = store_dir / layout.MANIFEST, store_dir / layout.BACKUP
    if backup.is_file() and backup.read_bytes() == main.read_bytes():
        return f"{main}: whole, and so is {layout.BACKUP}; nothing to repair"
    if backup.is_dir() and any(backup.iterdir()):  # not a file the store wrote: never deleted
        raise InputError(f"{backup}: a folder with files in it; move it out of the store, then run repair again")
    if backup.is_dir():
        backup.rmdir()
    atomic_write_bytes(backup, main.read_bytes())
    return f"{backup}: rewritten from {layout.MANIFEST}, which is whole"


def _restore_manifest(store_dir: Path) -> str:
    main, backup = store_dir / layout.MANIFEST, store_dir / layout.BACKUP
    try:
        manifest = read_manifest_file(backup)
    except FileNotFoundError:
        raise InputError(f"{backup}: missing; the manifest cannot be restored") from None
    missing = [rel for rel in manifest.files if not (store_dir / rel).is_file()]
    if missing:
        raise InputError(f"{backup}: names {missing[0]}, which is gone; the manifest cannot be restored")
    atomic_write_bytes(main, backup.read_bytes())
    return f"{main}: restored from {layout.BACKUP} (generation {manifest.generation})"


# ---- arrays for the caller ------------------------------------------------------------------


_host_array = host_array  # a numpy array (or a torch tensor, brought to the host) and its dtype, for writing


def _user_array(raw: np.ndarray, dtype: DType) -> np.ndarray:
    return as_array(raw, dtype)


def _as_user_arrays(arrays: dict[str, tuple[np.ndarray, DType]], device) -> dict:
    if device is None:
        return {n: _user_array(a, d) for n, (a, d) in arrays.items()}
    return {n: to_torch(a, d, device) for n, (a, d) in arrays.items()}
