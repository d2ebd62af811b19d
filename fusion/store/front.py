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
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import msgspec
import numpy as np

from ..constants import RESCALER_MODES
from ..dtypes import DType, FLOAT_NAMES, dtype_of, parse_dtype
from ..engine import DEFAULT_CHUNK, chunk_ranges
from ..io import Checkpoint, as_array, open_checkpoint
from ..io.files import atomic_write_bytes
from ..io.integrity import digest_file
from ..constants import KERNELS
from ..device import DeviceStage, resolve_device
from ..kernels import default_kernel_name, get_kernel, preload
from ..kernels.host import rebuild_into
from ..torch_compat import from_torch, is_torch, to_torch
from . import layout
from .adapters import base_adapter_config, dense_adapter_deltas, plan_input, space_of
from .export import TaskStream, check_output, default_output, model_card, write_file, write_folder
from .inputs import Input, infer_base, resolve_input
from .inspect import Health, audit, info
from .manifest import (BaseRef, Digests, Fidelity, HubRef, Manifest, ManifestError, SourceRef, TaskEntry, UnifiedEntry,
                       load_manifest, read_manifest_file)
from .passio import OldSource, PassPlan, PassResult, run_pass
from .plan import FusedTensor, NewTask, check_missing, plan_tensors
from .snapshot import open_base, open_snapshot, reading
from .sources import CheckpointDeltas
from .transaction import Transaction, change, remove_new_store

__all__ = ["Store", "TaskRecord", "DEFAULT_SHARD_SIZE", "DEFAULT_MODEL_SHARD_SIZE", "PASS_ELEMENTS"]

DEFAULT_SHARD_SIZE = 2 << 30  # unified delta shards
DEFAULT_MODEL_SHARD_SIZE = 5 << 30  # decoupled model shards, as save_pretrained
# Elements of one chunk over all tasks: a pass holds a few arrays of this many float32 values
# (16 MiB each), whatever the task count, so its peak memory does not grow with T.
PASS_ELEMENTS = 4 * DEFAULT_CHUNK


def _chunk_for(num_tasks: int) -> int:
    """Elements per chunk and task: PASS_ELEMENTS shared by the tasks, a multiple of 8, >= 64Ki."""
    return max(1 << 16, PASS_ELEMENTS // max(num_tasks, 1) // 8 * 8)


@dataclass(frozen=True)
class TaskRecord:
    """One stored task, as the manifest describes it."""

    number: int  # kept for life
    name: str
    source: str  # the checkpoint it came from: an absolute path, or a hub id
    added_generation: int
    rescaler: float | dict[str, float]  # one, or one per tensor (rescaler mode "tensor")
    l1: float  # L1 norm of the delta this generation was unified from
    mask_density: float  # fraction of fused elements whose mask bit is set
    fidelity: dict  # cosine, rel_l2 (rebuilt against the fine-tune's delta), generation measured at
    private: tuple[str, ...] = ()  # tensors kept whole (absent from the base, or another shape)
    zero_filled: tuple[str, ...] = ()  # base tensors the checkpoint lacked, counted as unchanged
    files: tuple[str, ...] = ()  # its own small files (config.json, tokenizer files)
    attachments: tuple[str, ...] = ()  # names of the data kept with it (fusion.Store.attach)
    kind: str = "model"  # "adapter": it came from a PEFT LoRA adapter
    hub: dict | None = None  # {"id", "revision", "commit"} when it came from the hub

    @classmethod
    def of(cls, task: TaskEntry) -> "TaskRecord":
        source = task.source.hub.id if task.source.hub else task.source.path
        fidelity = {"cosine": task.fidelity.cosine, "rel_l2": task.fidelity.rel_l2, "generation": task.fidelity.generation}
        rescaler = dict(task.rescaler) if isinstance(task.rescaler, dict) else task.rescaler
        return cls(task.number, task.name, source, task.added_generation, rescaler, task.l1, task.mask_density,
                   fidelity, tuple(task.private_tensors), tuple(task.zero_filled), tuple(task.files),
                   tuple(task.attachments), task.kind, msgspec.to_builtins(task.source.hub))

    def rescaler_of(self, tensor: str) -> float:
        return self.rescaler[tensor] if isinstance(self.rescaler, dict) else self.rescaler

    def as_dict(self) -> dict:
        return {"number": self.number, "name": self.name, "source": self.source,
                "added_generation": self.added_generation, "rescaler": self.rescaler, "l1": self.l1,
                "mask_density": self.mask_density, "fidelity": self.fidelity, "private": list(self.private),
                "zero_filled": list(self.zero_filled), "files": list(self.files), "attachments": list(self.attachments),
                "kind": self.kind, "hub": self.hub}


def _select(manifest: Manifest, task: int | str, store_dir: Path) -> TaskEntry:
    """A task by number (an int or a string of digits) or by name."""
    found = None
    if isinstance(task, int) and not isinstance(task, bool):
        found = manifest.task_by_number(task)
    elif isinstance(task, str):
        found = manifest.task_by_number(int(task)) if task.strip().isdigit() else manifest.task_by_name(task)
    if found is None:
        choices = ", ".join(f"{t.number} ({t.name})" for t in manifest.tasks)
        raise ValueError(f"{store_dir}: no task {task!r}; choose a number or a name: {choices}")
    return found


def _rebuild(name: str | None, stage: DeviceStage | None = None):
    """Decouple's rebuild: on a device torch's; else the kernel asked for, or the host's numpy one
    (no numba to load)."""
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


class _DeferredKernel:
    """The pass's kernel, fetched when the pass first computes: its reader starts meanwhile, so the
    kernel's start-up (preloaded on a thread) overlaps the first reads instead of delaying them."""

    def __init__(self, name: str | None, work: int):
        self.name, self.work, self._kernel = name, work, None

    def __getattr__(self, attribute: str):
        if self._kernel is None:
            try:
                self._kernel = get_kernel(self.name, work=self.work)
            except ImportError:
                if self.name is not None:
                    raise
                self._kernel = get_kernel("reference")  # no compiled kernel installed: the reference works
        return getattr(self._kernel, attribute)


class _Runner:
    """Where and with what a change's pass computes: chosen once, from the kernel and device asked for."""

    def __init__(self, kernel: str | None, device: str | DeviceStage):
        if kernel is not None and kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; use one of {', '.join(KERNELS)}")
        self.kernel_name, self.device = kernel, device
        self.stage: DeviceStage | None = None
        self.report: dict = {}

    def start(self, fused: list[FusedTensor], num_tasks: int) -> None:
        """Settle the device and start loading the kernel now, so that it overlaps planning and reading."""
        self.stage = self._stage()
        self.work = sum(t.numel for t in fused) * num_tasks
        if self.stage is None and self.kernel_name is None and default_kernel_name("cpu", self.work) == "cpu":
            preload("cpu")

    def _stage(self) -> DeviceStage | None:
        if isinstance(self.device, DeviceStage):
            return self.device
        if self.kernel_name in ("cpu", "reference"):
            if str(self.device) not in ("auto", "cpu"):
                raise ValueError(f"kernel {self.kernel_name!r} runs on the host, not on {self.device}; "
                                 "use --device cpu, or --kernel triton")
            return None
        wanted = "cuda" if self.kernel_name == "triton" and self.device == "auto" else self.device
        device = resolve_device(wanted)
        return None if device == "cpu" else DeviceStage(device, get_kernel("triton", device=device))

    def kernel(self):
        return self.stage.kernel if self.stage else _DeferredKernel(self.kernel_name, self.work)

    def done(self) -> None:
        self.report = {"device": str(self.stage.device) if self.stage else "cpu",
                       "peak_device_bytes": self.stage.peak_bytes if self.stage else None}


def _default_name(raw: str, taken: Sequence[str]) -> str:
    name, k = layout.clean_task_name(raw), 2
    candidate = name
    while candidate in taken:
        candidate, k = f"{name}-{k}", k + 1
    return candidate


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
        self._manifest = load_manifest(self.path)

    @classmethod
    def open(cls, path: str | os.PathLike, **options) -> "Store":
        return cls(path, **options)

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
        return TaskRecord.of(_select(self.manifest(), task, self.path))

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
            entry = _select(m, task, self.path)
            chosen[:] = [entry]
            return [*m.unified.files, entry.triggers, *([entry.private] if entry.private else [])]

        def side_files(m: Manifest) -> list[str]:
            return list(_select(m, task, self.path).files.values()) if side else []

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
        the folder is an adapter folder that PeftModel.from_pretrained loads."""
        if dtype is not None and parse_dtype(dtype).name not in FLOAT_NAMES:
            raise ValueError(f"dtype {dtype!r}: decouple writes one of {', '.join(FLOAT_NAMES)}")
        with self._opened(task, dtype, side=True) as (snapshot, base, stream):
            out = Path(out) if out is not None else default_output(stream.task.name, self._protected(snapshot.manifest))
            if out.suffix.lower() in (".bin", ".pt", ".pth", ".ckpt"):
                raise ValueError(f"{out}: decouple writes safetensors only; name the output .safetensors or a folder")
            check_output(out, self._protected(snapshot.manifest), force=force)
            if out.suffix == ".safetensors":
                return write_file(stream, out, progress=progress)
            manifest, entry = snapshot.manifest, stream.task
            side = {Path(rel).name: snapshot.raw[rel] for rel in entry.files.values()}
            out_dtype = parse_dtype(dtype) if dtype else snapshot.fused[0].dtype
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
            flat = {name: np.empty(int(np.prod(shape)), dtype=d.storage) for name, d, shape in stream.layout}
            filled = dict.fromkeys(flat, 0)

            def write(name: str, piece: np.ndarray) -> None:  # pieces are reused buffers: copy each out
                flat[name][filled[name] : filled[name] + piece.size] = piece
                filled[name] += piece.size

            stream.write_all(write, progress=False)
            out = {name: (flat[name].reshape(shape), d) for name, d, shape in stream.layout}
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
    def unify(cls, path: str | os.PathLike, base: str | os.PathLike | None, checkpoints: Sequence[str | os.PathLike],
              *, names: Sequence[str] | None = None, rescaler: str = "model", dtype=None, missing: str = "error",
              kernel: str | None = None, chunk: int | None = None, progress: bool = False,
              max_shard_size: int = DEFAULT_SHARD_SIZE, device: str | DeviceStage = "auto") -> "Store":
        """A new store from `base` and a one-shot (EMR-style) unify of the checkpoints' deltas.

        `base` and the checkpoints are paths or hub ids; `base=None` takes the base the
        checkpoints record, when they all record the same one and it resolves."""
        store_dir = Path(path)
        _check_unify_args(store_dir, checkpoints, names, rescaler, missing, dtype)
        base_input = resolve_input(base if base is not None else infer_base(checkpoints))
        inputs = [resolve_input(c) for c in checkpoints]
        created, had_lock = not store_dir.exists(), (store_dir / layout.LOCK).exists()
        runner = _Runner(kernel, device)
        store_dir.mkdir(parents=True, exist_ok=True)
        try:
            with change(store_dir, lambda: _no_store_yet(store_dir)) as tx:
                _create(tx, base_input, inputs, names, rescaler,
                        parse_dtype(dtype) if dtype else None, missing, runner, chunk, progress, max_shard_size)
        except BaseException:
            remove_new_store(store_dir, created, had_lock)
            raise
        store = cls(store_dir, kernel=kernel, chunk=chunk, device=device)
        store.last_pass = runner.report
        return store

    def add(self, checkpoint: str | os.PathLike, *, name: str | None = None, missing: str | None = None,
            progress: bool = False) -> TaskRecord:
        """The ConDU continual step: rebuild every task, unify them with the new checkpoint's delta.
        `checkpoint` is a path or a hub id."""
        source = resolve_input(checkpoint)
        with change(self.path, lambda: load_manifest(self.path)) as tx:
            manifest = tx.current
            fused = [FusedTensor.of(e) for e in manifest.tensors]
            runner = _Runner(self.kernel, self.device)
            runner.start(fused, len(manifest.tasks) + 1)
            with open_base(manifest) as base, open_checkpoint(source.path) as ckpt:
                name = name or _default_name(source.default_name(ckpt.name), [t.name for t in manifest.tasks])
                if manifest.task_by_name(name):
                    raise ValueError(f"{self.path}: a task named {name!r} exists already; pass another --name")
                _refuse_related(source.path, self.path, "the checkpoint", "the store")
                new = plan_input(ckpt, base, fused, space=manifest.space, base_config=manifest.base.adapter_config,
                                 name=name, number=manifest.next_number,
                                 missing=check_missing(missing or manifest.missing), source=source.source, hub=source.hub)
                self._manifest = _next_generation(tx, base, fused, list(manifest.tasks), [new],
                                                  runner, self.chunk, progress)
        self.last_pass = runner.report
        return TaskRecord.of(self._manifest.tasks[-1])

    def remove(self, task: int | str, *, progress: bool = False) -> TaskRecord:
        """Drop a task and re-unify the others from their reconstructions; its files are never read."""
        with change(self.path, lambda: load_manifest(self.path)) as tx:
            manifest = tx.current
            gone = _select(manifest, task, self.path)
            if len(manifest.tasks) == 1:
                raise ValueError(f"{self.path}: task {gone.number} ({gone.name}) is the only one; delete the store "
                                 "folder instead")
            keep = [t for t in manifest.tasks if t.number != gone.number]
            fused = [FusedTensor.of(e) for e in manifest.tensors]
            runner = _Runner(self.kernel, self.device)
            runner.start(fused, len(keep))
            with open_base(manifest) as base:
                self._manifest = _next_generation(tx, base, fused, keep, [], runner, self.chunk, progress)
        self.last_pass = runner.report
        return TaskRecord.of(gone)

    def attach(self, task: int | str, name: str, tensors: Mapping[str, np.ndarray]) -> None:
        """Keep named data with a task (the driver's class prototypes); the store does not interpret it."""
        layout.check_token(name, "an attachment name")
        with change(self.path, lambda: load_manifest(self.path)) as tx:
            manifest = tx.current
            entry = _select(manifest, task, self.path)
            rel = layout.attachment_name(entry.number, name, tx.generation)
            arrays = {k: _host_array(v) for k, v in tensors.items()}
            with tx.writer(rel, [(k, d, a.shape) for k, (a, d) in arrays.items()], metadata={"format": "condu-store"}) as w:
                for k, (a, _) in arrays.items():
                    w.write(k, a)
            tx.finished(rel, w)
            attachments = {**entry.attachments, name: rel}
            tasks = [t if t.number != entry.number else _with(t, attachments=attachments) for t in manifest.tasks]
            self._manifest = tx.commit(_with(manifest, generation=tx.generation, tasks=tasks,
                                             files=_file_table(tx, manifest.unified.files, tasks)))

    def attachment(self, task: int | str, name: str) -> dict[str, np.ndarray] | None:
        """Data kept with a task under `name`, or None."""
        def select(m: Manifest) -> list[str]:
            rel = _select(m, task, self.path).attachments.get(name)
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
                raise ValueError(f"{new}: holds the files {sorted(files)}, the store's base {sorted(manifest.base.files)}; "
                                 "point it at a copy of the same base")
            for name, recorded in manifest.base.files.items():
                found = digest_file(new / name if new.is_dir() else new, block=recorded.block)
                if recorded.file_digests().first_mismatch(found) is not None:
                    raise ValueError(f"{new}: {name} differs from the base the store was made from; point it at a "
                                     "copy of the same base")
            base = _with(manifest.base, path=new_input.source, hub=new_input.hub)
            self._manifest = tx.commit(_with(manifest, generation=tx.generation, base=base,
                                             files=dict(manifest.files)))

    @staticmethod
    def repair(path: str | os.PathLike) -> str:
        """Restore condu.json from condu.backup.json when the backup is whole and the main copy is not."""
        return _repair(Path(path))

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, generation={self._manifest.generation}, tasks={len(self._manifest.tasks)})"


# ---- helpers of the changes -----------------------------------------------------------------


def _with(struct, **changes):
    return msgspec.structs.replace(struct, **changes)


def _no_store_yet(store_dir: Path) -> None:
    """A first unify starts from nothing; it never writes over a store (or one whose condu.json is lost)."""
    if (store_dir / layout.MANIFEST).exists():
        raise ValueError(f"{store_dir}: already holds a ConDU store; use add to add a task")
    if (store_dir / layout.BACKUP).exists():
        raise ValueError(f"{store_dir}: holds a store whose {layout.MANIFEST} is missing; restore it with "
                         f"`condu-fuse repair --store {store_dir}`")
    return None


def _check_unify_args(store_dir: Path, checkpoints, names, rescaler: str, missing: str, dtype) -> None:
    if rescaler not in RESCALER_MODES:
        raise ValueError(f"unknown rescaler mode {rescaler!r}; use one of {', '.join(RESCALER_MODES)}")
    check_missing(missing)
    if dtype is not None and parse_dtype(dtype).name not in FLOAT_NAMES:
        raise ValueError(f"dtype {dtype!r}: the unified delta is stored in one of {', '.join(FLOAT_NAMES)}")
    if store_dir.exists() and not store_dir.is_dir():
        raise ValueError(f"{store_dir}: exists and is not a folder; choose another --store")
    _no_store_yet(store_dir)
    if not checkpoints:
        raise ValueError("unify needs at least one checkpoint")
    if names is not None and len(names) != len(checkpoints):
        raise ValueError(f"got {len(names)} names for {len(checkpoints)} checkpoints; give one name each")


def _refuse_related(path: Path, store_dir: Path, what: str, other: str) -> None:
    """A checkpoint (or the base) cannot be the store, or live inside it, or hold it."""
    a, b = path.resolve(), store_dir.resolve()
    if a == b or a.is_relative_to(b) or (a.is_dir() and b.is_relative_to(a)):
        raise ValueError(f"{path}: {what} and {other} ({store_dir}) overlap; keep the store in a folder of its own")


def _create(tx: Transaction, base_input: Input, inputs: list[Input], names, mode: str, dtype: DType | None,
            missing: str, runner: _Runner, chunk: int | None, progress: bool, max_shard_size: int) -> None:
    """Plan and check everything, then run the first generation's pass and commit it."""
    for p, what in [(base_input.path, "the base"), *((i.path, "a checkpoint") for i in inputs)]:
        _refuse_related(p, tx.store_dir, what, "the store")
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(Checkpoint(base_input.path, record=True, where=f"base {base_input.text}"))
        fused = plan_tensors(base, dtype)
        space, base_config = space_of(base), base_adapter_config(base)
        runner.start(fused, len(inputs))
        new, taken = [], []
        for k, source in enumerate(inputs):
            ckpt = stack.enter_context(open_checkpoint(source.path))
            name = names[k] if names is not None else _default_name(source.default_name(ckpt.name), taken)
            if name in taken:
                raise ValueError(f"task name {name!r} is given twice; give each checkpoint its own name")
            taken.append(name)
            new.append(plan_input(ckpt, base, fused, space=space, base_config=base_config, name=name, number=k + 1,
                                  missing=missing, source=source.source, hub=source.hub))
        base_ref = BaseRef(path=base_input.source, hub=base_input.hub, fingerprint=base.fingerprint(), files={},
                           adapter_config=base_config)
        empty = Manifest(format="condu-store", version=2, generation=-1, hash="xxh3-64", base=base_ref, space=space,
                         rescaler=mode, missing=missing, max_shard_size=max_shard_size,
                         tensors=[t.entry() for t in fused], next_number=1, tasks=[],
                         unified=UnifiedEntry(files=[], weight_map={}), files={})
        _next_generation(tx, base, fused, [], new, runner, chunk, progress, first=empty)


def _next_generation(tx: Transaction, base: Checkpoint, fused: list[FusedTensor], keep: list[TaskEntry],
                     new: list[NewTask], runner: _Runner, chunk: int | None, progress: bool, *,
                     first: Manifest | None = None) -> Manifest:
    """Run one pass (carry `keep`, add `new`), write the new generation's files, and commit it."""
    manifest = first or tx.current
    num_tasks = len(keep) + len(new)
    chunk = chunk or _chunk_for(num_tasks)
    with contextlib.ExitStack() as stack:
        old = None
        if keep:
            old = stack.enter_context(reading(tx.store_dir, lambda m: [*m.unified.files, *(t.triggers for t in keep)]))
        sources = [_old_source(task, fused, manifest.space, stack) for task in keep]
        plan = PassPlan(base, fused, old, keep, new, sources, manifest.rescaler, runner.kernel(), chunk,
                        manifest.max_shard_size, runner.stage)
        result = run_pass(plan, tx, [t.number for t in keep] + [t.number for t in new], progress=progress)
        runner.done()
        for task in new:
            _write_task_files(tx, task, chunk)
        base_files = base.recorded() if first else None
    return tx.commit(_manifest_after(tx, manifest, base_files, fused, keep, new, result))


def _zero_of(task: TaskEntry, fused: list[FusedTensor]) -> set[str]:
    names = {t.name for t in fused}
    return (set(task.private_tensors) & names) | set(task.zero_filled)


def _old_source(task: TaskEntry, fused: list[FusedTensor], space: str, stack: contextlib.ExitStack) -> OldSource | None:
    """How a pass reads a kept task's original delta again, if its source is still there unchanged."""
    ckpt = _unchanged_source(task)
    if ckpt is None:
        return None
    stack.enter_context(ckpt)
    if task.kind == "adapter" and space == "dense":
        try:
            deltas, zero = dense_adapter_deltas(ckpt, fused)
        except ValueError:  # its config no longer reads: the delta is not measured again
            return None
        return OldSource(deltas, zero, task.source.content)
    return OldSource(CheckpointDeltas(ckpt), _zero_of(task, fused), task.source.content)


def _unchanged_source(task: TaskEntry) -> Checkpoint | None:
    """A kept task's source checkpoint, if it is still there with the same layout (for fidelity)."""
    try:
        ckpt = open_checkpoint(task.source.path)
    except (ValueError, OSError):
        return None
    if ckpt.fingerprint() != task.source.fingerprint or not task.source.content:
        ckpt.close()
        return None
    return ckpt


def _write_task_files(tx: Transaction, task: NewTask, chunk: int) -> None:
    """A new task's private tensors and its own small files, written once, for its whole life."""
    ckpt = task.checkpoint
    if task.private:
        rel = layout.private_name(task.number)
        with tx.writer(rel, [(n, ckpt.info(n).dtype, ckpt.info(n).shape) for n in task.private],
                       metadata={"format": "condu-store"}) as writer:
            for name in task.private:
                for lo, hi in chunk_ranges(ckpt.info(name).numel, chunk):
                    writer.write(name, ckpt.view_flat(name, lo, hi))
        tx.finished(rel, writer)
    for path in task.side_files:
        tx.copy_in(path, layout.side_file_name(task.number, path.name))


def _manifest_after(tx: Transaction, manifest: Manifest, base_files, fused: list[FusedTensor], keep: list[TaskEntry],
                    new: list[NewTask], result: PassResult) -> Manifest:
    """The new generation's manifest, from the old one and what the pass measured."""
    g, total = tx.generation, sum(t.numel for t in fused)
    tasks = []
    for i, old in enumerate([*keep, *new]):
        entry = old if isinstance(old, TaskEntry) else _new_entry(old, g, result.contents[i - len(keep)])
        fidelity = result.fidelity[i]
        tasks.append(_with(entry, rescaler=_rescaler(result.rescalers[i], fused, manifest.rescaler),
                           l1=float(result.delta_l1[i].sum()), triggers=result.triggers[i],
                           mask_density=float(result.mask_bits[i]) / total if total else 0.0,
                           fidelity=Fidelity(cosine=fidelity[0], rel_l2=fidelity[1], generation=g) if fidelity
                           else entry.fidelity))
    base = manifest.base if base_files is None else _with(manifest.base, files={n: Digests.of(d) for n, d in base_files.items()})
    unified = UnifiedEntry(files=result.unified_files, weight_map=result.weight_map)
    return _with(manifest, generation=g, base=base, tasks=tasks, unified=unified,
                 next_number=max([manifest.next_number - 1, *(t.number for t in new)]) + 1,
                 files=_file_table(tx, unified.files, tasks))


def _new_entry(task: NewTask, g: int, content: str) -> TaskEntry:
    ckpt = task.checkpoint
    return TaskEntry(number=task.number, name=task.name, kind=task.kind,
                     source=SourceRef(path=task.source, hub=task.hub, fingerprint=ckpt.fingerprint(), content=content),
                     added_generation=g, rescaler=0.0, l1=0.0, mask_density=0.0,
                     fidelity=Fidelity(cosine=None, rel_l2=None, generation=g), triggers="",
                     private=layout.private_name(task.number) if task.private else None,
                     private_tensors=list(task.private), zero_filled=list(task.zero_filled),
                     files={p.name: layout.side_file_name(task.number, p.name) for p in task.side_files})


def _rescaler(row: np.ndarray, fused: list[FusedTensor], mode: str):
    if mode == "tensor":
        return {t.name: float(row[k]) for k, t in enumerate(fused)}
    return float(row[0])


def _file_table(tx: Transaction, unified_files: list[str], tasks: list[TaskEntry]) -> dict[str, Digests]:
    return {rel: tx.digests(rel) for rel in sorted([*unified_files, *(p for t in tasks for p in t.paths())])}


def _repair(store_dir: Path) -> str:
    main, backup = store_dir / layout.MANIFEST, store_dir / layout.BACKUP
    try:
        read_manifest_file(main)
        return f"{main}: whole; nothing to repair"
    except (ManifestError, FileNotFoundError):
        pass
    try:
        manifest = read_manifest_file(backup)
    except FileNotFoundError:
        raise ValueError(f"{backup}: missing; the manifest cannot be restored") from None
    missing = [rel for rel in manifest.files if not (store_dir / rel).is_file()]
    if missing:
        raise ValueError(f"{backup}: names {missing[0]}, which is gone; the manifest cannot be restored")
    atomic_write_bytes(main, backup.read_bytes())
    return f"{main}: restored from {layout.BACKUP} (generation {manifest.generation})"


# ---- arrays for the caller ------------------------------------------------------------------


def _host_array(value) -> tuple[np.ndarray, DType]:
    """A numpy array (or a torch tensor, brought to the host) and its dtype, for writing."""
    if is_torch(value):
        return from_torch(value)
    return np.require(value, requirements="C"), dtype_of(value)  # keeps a 0-d shape


def _user_array(raw: np.ndarray, dtype: DType) -> np.ndarray:
    return as_array(raw, dtype)


def _as_user_arrays(arrays: dict[str, tuple[np.ndarray, DType]], device) -> dict:
    if device is None:
        return {n: _user_array(a, d) for n, (a, d) in arrays.items()}
    return {n: to_torch(a, d, device) for n, (a, d) in arrays.items()}
