"""One change of the store, from the inputs to the committed manifest: where its pass runs (the
runner), the pass over every tensor, the task's own files, and the new generation's manifest.

Used by `Store.unify`, `add` and `remove` (fusion.store.front); each runs inside a transaction
(fusion.store.transaction), so a failure anywhere here leaves the store as it was.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import msgspec
import numpy as np

from ..constants import KERNELS, RESCALER_MODES
from ..device import DeviceStage, resolve_device
from ..dtypes import QUANT_BLOCK, UNIFIED_NAMES, BlockQuant, DType, unified_form
from ..engine import DEFAULT_CHUNK, chunk_ranges
from ..errors import InputError
from ..io import Checkpoint, open_checkpoint
from ..kernels import default_kernel_name, get_kernel, preload
from . import layout
from .adapters import base_adapter_config, dense_adapter_deltas, plan_input, space_of
from .guard import Finding, assess, refuse
from .inputs import Input
from .manifest import BaseRef, Digests, Fidelity, HistoryEvent, Manifest, SourceRef, TaskEntry, UnifiedEntry
from .passio import OldSource, PassPlan, PassResult, run_pass
from .plan import FusedTensor, NewTask, check_missing, plan_tensors
from .records import default_task_name
from .snapshot import reading
from .sources import CheckpointDeltas
from .transaction import Transaction

__all__ = ["PASS_ELEMENTS", "Runner", "create", "next_generation", "replaced", "no_store_yet", "check_unify_args",
           "refuse_related", "chunk_for", "file_table", "same_content", "refuse_copies"]

# Elements of one chunk over all tasks: a pass holds a few arrays of this many float32 values
# (16 MiB each), whatever the task count, so its peak memory does not grow with T.
PASS_ELEMENTS = 4 * DEFAULT_CHUNK


def chunk_for(num_tasks: int, align: int = 8) -> int:
    """Elements per chunk and task: PASS_ELEMENTS shared by the tasks, a multiple of `align` (8: whole
    mask bytes; a block-quantized store's block), >= 64Ki."""
    return max(1 << 16, PASS_ELEMENTS // max(num_tasks, 1) // align * align)


def chunk_align(fused: list[FusedTensor]) -> int:
    """What a pass's chunks must be a multiple of: whole mask bytes, and whole quantization blocks."""
    return max([8, *(t.unified_dtype.block for t in fused if t.quantized)])


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


class Runner:
    """Where and with what a change's pass computes: chosen once, from the kernel and device asked for."""

    def __init__(self, kernel: str | None, device: str | DeviceStage):
        if kernel is not None and kernel not in KERNELS:
            raise InputError(f"unknown kernel {kernel!r}; use one of {', '.join(KERNELS)}")
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
                raise InputError(f"kernel {self.kernel_name!r} runs on the host, not on {self.device}; "
                                 "use --device cpu, or --kernel triton")
            return None
        wanted = "cuda" if self.kernel_name == "triton" and self.device == "auto" else self.device
        device = resolve_device(wanted)
        if device == "cpu" and self.kernel_name == "triton":
            raise InputError("kernel 'triton' runs on a CUDA device, not on the cpu; use --device cuda, "
                             "or --kernel cpu")
        return None if device == "cpu" else DeviceStage(device, get_kernel("triton", device=device))

    def kernel(self):
        return self.stage.kernel if self.stage else _DeferredKernel(self.kernel_name, self.work)

    def done(self) -> None:
        self.report = {"device": str(self.stage.device) if self.stage else "cpu",
                       "peak_device_bytes": self.stage.peak_bytes if self.stage else None}


def replaced(struct, **changes):
    return msgspec.structs.replace(struct, **changes)


def no_store_yet(store_dir: Path) -> None:
    """A first unify starts from nothing; it never writes over a store (or one whose condu.json is lost)."""
    if (store_dir / layout.MANIFEST).exists():
        raise InputError(f"{store_dir}: already holds a ConDU store; use add to add a task")
    if (store_dir / layout.BACKUP).exists():
        raise InputError(f"{store_dir}: holds a store whose {layout.MANIFEST} is missing; restore it with "
                         f"`condu-fuse repair --store {store_dir}`")
    return None


def check_unify_args(store_dir: Path, checkpoints, names, rescaler: str, missing: str, dtype) -> None:
    if rescaler not in RESCALER_MODES:
        raise InputError(f"unknown rescaler mode {rescaler!r}; use one of {', '.join(RESCALER_MODES)}")
    check_missing(missing)
    if dtype is not None and unified_form(dtype).name not in UNIFIED_NAMES:
        raise InputError(f"dtype {dtype!r}: the unified delta is stored in one of {', '.join(UNIFIED_NAMES)}")
    if store_dir.exists() and not store_dir.is_dir():
        raise InputError(f"{store_dir}: exists and is not a folder; choose another --store")
    no_store_yet(store_dir)
    if not checkpoints:
        raise InputError("unify needs at least one checkpoint")
    if names is not None and len(names) != len(checkpoints):
        raise InputError(f"got {len(names)} names for {len(checkpoints)} checkpoints; give one name each")


def refuse_related(path: Path, store_dir: Path, what: str, other: str) -> None:
    """A checkpoint (or the base) cannot be the store, or live inside it, or hold it."""
    a, b = path.resolve(), store_dir.resolve()
    if a == b or a.is_relative_to(b) or (a.is_dir() and b.is_relative_to(a)):
        raise InputError(f"{path}: {what} and {other} ({store_dir}) overlap; keep the store in a folder of its own")


def create(tx: Transaction, base_input: Input, inputs: list[Input], names, mode: str, dtype: DType | BlockQuant | None,
            missing: str, runner: Runner, chunk: int | None, progress: bool, max_shard_size: int, *,
            allow_degrade: bool = False) -> None:
    """Plan and check everything, then run the first generation's pass and commit it."""
    for p, what in [(base_input.path, "the base"), *((i.path, "a checkpoint") for i in inputs)]:
        refuse_related(p, tx.store_dir, what, "the store")
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(Checkpoint(base_input.path, record=True, where=f"base {base_input.text}"))
        fused = plan_tensors(base, dtype)
        space, base_config = space_of(base), base_adapter_config(base)
        runner.start(fused, len(inputs))
        new, taken = [], []
        for k, source in enumerate(inputs):
            ckpt = stack.enter_context(open_checkpoint(source.path))
            name = names[k] if names is not None else default_task_name(source.default_name(ckpt.name), taken)
            if name in taken:
                raise InputError(f"task name {name!r} is given twice; give each checkpoint its own name")
            taken.append(name)
            new.append(plan_input(ckpt, base, fused, space=space, base_config=base_config, name=name, number=k + 1,
                                  missing=missing, source=source.source, hub=source.hub))
        base_ref = BaseRef(path=base_input.source, hub=base_input.hub, fingerprint=base.fingerprint(), files={},
                           adapter_config=base_config)
        empty = Manifest(format="condu-store", version=2, generation=-1, hash="xxh3-64", base=base_ref, space=space,
                         rescaler=mode, missing=missing, max_shard_size=max_shard_size,
                         tensors=[t.entry() for t in fused], next_number=1, tasks=[],
                         unified=UnifiedEntry(files=[], weight_map={}), files={},
                         quant_block=QUANT_BLOCK if any(t.quantized for t in fused) else None)
        next_generation(tx, base, fused, [], new, runner, chunk, progress, first=empty, keep_copies=names is not None,
                        operation="unify", allow_degrade=allow_degrade)


def next_generation(tx: Transaction, base: Checkpoint, fused: list[FusedTensor], keep: list[TaskEntry],
                     new: list[NewTask], runner: Runner, chunk: int | None, progress: bool, *,
                     first: Manifest | None = None, keep_copies: bool = False, operation: str = "add",
                     removed: TaskEntry | None = None, allow_degrade: bool = False) -> Manifest:
    """Run one pass (carry `keep`, add `new`), write the new generation's files, and commit it.
    A new task with the content of another is refused (before the commit) unless `keep_copies`;
    a change that damages a task (fusion.store.guard) unless `allow_degrade`, which the history
    then records. `operation` (unify, add, remove; `removed`: the task remove drops) names the change."""
    manifest = first or tx.current
    num_tasks = len(keep) + len(new)
    chunk = chunk or chunk_for(num_tasks, chunk_align(fused))
    with contextlib.ExitStack() as stack:
        old = None
        if keep:
            old = stack.enter_context(reading(tx.store_dir, lambda m: [*m.unified.files, *(t.triggers for t in keep)]))
        sources = [_old_source(task, fused, manifest.space, stack) for task in keep]
        plan = PassPlan(base, fused, old, keep, new, sources, manifest.rescaler, runner.kernel(), chunk,
                        manifest.max_shard_size, runner.stage, operation, allow_degrade)
        result = run_pass(plan, tx, [t.number for t in keep] + [t.number for t in new], progress=progress)
        runner.done()
        for task in new:
            _write_task_files(tx, task, chunk)
        base_files = base.recorded() if first else None
    after = _manifest_after(tx, manifest, base_files, fused, keep, new, result)
    if not keep_copies:
        refuse_copies(after, new)  # the pass measured the content; the transaction drops its files
    findings = result.findings + _drift_findings(keep, new, fused, result, runner, operation, removed)
    return tx.commit(_guarded(after, findings, operation, allow_degrade))


def _drift_findings(keep: list[TaskEntry], new: list[NewTask], fused: list[FusedTensor], result: PassResult,
                    runner: Runner, operation: str, removed: TaskEntry | None) -> list[Finding]:
    """The stored tasks the pass damaged (fusion.store.guard); every task's drift goes to the runner's report."""
    if not keep:
        return []
    drifts = assess(keep, [t.name for t in fused], result.rescalers, result.drift)
    runner.report["drift"] = [d.as_dict() for d in drifts]
    if operation == "remove" and removed is not None:
        change, fix = f"remove task {removed.number} ({removed.name})", "keep it"
    else:
        change = f"{operation} {_label(new[0])}" if new else operation
        fix = "check that tensor of the checkpoint"
    return refuse(drifts, change=change, fix=fix)


def _guarded(after: Manifest, findings: list[Finding], operation: str, allow_degrade: bool) -> Manifest:
    """Refuse a damaging change in one line (the worst damage); allowed, the history records all of it."""
    if not findings:
        return after
    if not allow_degrade:
        more = f" (and {len(findings) - 1} more task(s) it would damage)" if len(findings) > 1 else ""
        raise InputError(findings[0].message + more)
    event = HistoryEvent(generation=after.generation, operation=operation,
                         tasks=sorted({f.number for f in findings}), allowed=[f.message for f in findings])
    return replaced(after, history=[*after.history, event])


def same_content(a: TaskEntry, b: TaskEntry, files: dict[str, Digests]) -> bool:
    """Two tasks from the same weights: the same fused bytes (the content digest of their sources),
    the same tensors kept whole, byte for byte, and the same tensors zero-filled."""
    return (bool(a.source.content) and a.source.content == b.source.content and a.kind == b.kind
            and a.private_tensors == b.private_tensors and set(a.zero_filled) == set(b.zero_filled)
            and (a.private is None or files[a.private] == files[b.private]))


def refuse_copies(manifest: Manifest, new: list[NewTask]) -> None:
    """One line for a new task that holds what an earlier task (stored, or new before it) holds."""
    first = len(manifest.tasks) - len(new)
    for i, task in enumerate(new, start=first):
        twin = next((t for t in manifest.tasks[:i] if same_content(manifest.tasks[i], t, manifest.files)), None)
        if twin is not None:
            fix = ("give each checkpoint a --name to keep both" if twin.number >= manifest.tasks[first].number
                   else "pass --name to keep a second copy")
            raise InputError(f"{_label(task)}: the same content as task {twin.number} ({twin.name}); {fix}")


def _label(task: NewTask) -> str:
    """A new task's checkpoint as the user named it: its hub id, or its path."""
    if task.hub is None:
        return str(task.checkpoint.path)
    return task.hub.id + (f"@{task.hub.revision}" if task.hub.revision else "")


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
        tasks.append(replaced(entry, rescaler=_rescaler(result.rescalers[i], fused, manifest.rescaler),
                           l1=float(result.delta_l1[i].sum()), triggers=result.triggers[i],
                           mask_density=float(result.mask_bits[i]) / total if total else 0.0,
                           fidelity=Fidelity(cosine=fidelity[0], rel_l2=fidelity[1], generation=g) if fidelity
                           else entry.fidelity))
    base = manifest.base if base_files is None else replaced(manifest.base, files={n: Digests.of(d) for n, d in base_files.items()})
    unified = UnifiedEntry(files=result.unified_files, weight_map=result.weight_map)
    return replaced(manifest, generation=g, base=base, tasks=tasks, unified=unified,
                 next_number=max([manifest.next_number - 1, *(t.number for t in new)]) + 1,
                 files=file_table(tx, unified.files, tasks))


def _new_entry(task: NewTask, g: int, content: str) -> TaskEntry:
    ckpt = task.checkpoint
    return TaskEntry(number=task.number, name=task.name, kind=task.kind,
                     source=SourceRef(path=task.source, hub=task.hub, fingerprint=ckpt.fingerprint(), content=content),
                     added_generation=g, rescaler=0.0, l1=0.0, mask_density=0.0,
                     fidelity=Fidelity(cosine=None, rel_l2=None, generation=g), triggers="",
                     private=layout.private_name(task.number) if task.private else None,
                     private_tensors=list(task.private), zero_filled=list(task.zero_filled),
                     files={p.name: layout.side_file_name(task.number, p.name) for p in task.side_files},
                     dtype=task.dtype)


def _rescaler(row: np.ndarray, fused: list[FusedTensor], mode: str):
    if mode == "tensor":
        return {t.name: float(row[k]) for k, t in enumerate(fused)}
    return float(row[0])


def file_table(tx: Transaction, unified_files: list[str], tasks: list[TaskEntry]) -> dict[str, Digests]:
    return {rel: tx.digests(rel) for rel in sorted([*unified_files, *(p for t in tasks for p in t.paths())])}
