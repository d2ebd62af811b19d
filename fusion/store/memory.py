"""State dicts in memory as the store takes them: new tasks from state dicts, and a whole
`fusion.FusedDeltas` saved as a store and opened again.

    with checkpoint_inputs([sd_a, "ckpt_b/"], names) as inputs:   # Inputs, as resolve_input gives
        ...                                                          # the pass reads sd_a from a file
    write_fused(tx, base_input, state, names, max_shard_size)       # the state as generation 0
    read_fused(store_dir)                                           # and back, bit for bit

A state dict becomes a temporary safetensors file that the pass reads like any checkpoint. The
store reads a task once, streaming and hashing it; a second reader of arrays would have to
repeat every check the file path makes (dtypes, shapes, NaN, content digests, duplicates), so
saving once costs a copy of a model that already fits in memory and keeps one path for all.
The store records the source as `<memory>`: nothing can read it again, so its fidelity is
measured once, when it is added; its content digest still finds a duplicate.

A base is not taken from memory: the store reads theta0 again for every decouple and add, and
keeps only its path, so a base in memory must be saved first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from ..arrays import is_torch, to_host
from ..dtypes import DTYPES, DType, F32, dtype_of, from_float32
from ..errors import ConduError, InputError
from ..fuse import FusedDeltas, private_names
from ..io import Checkpoint, SafetensorsWriter, as_array
from ..io.integrity import digest_file
from ..torch_compat import from_torch
from . import layout
from .generation import _rescaler, file_table, no_store_yet, refuse_related
from .inputs import Input, resolve_input
from .manifest import VERSION, BaseRef, Digests, Fidelity, Manifest, SourceRef, TaskEntry, UnifiedEntry
from .plan import FusedTensor, plan_tensors
from .snapshot import reading
from .transaction import Transaction

__all__ = ["MEMORY", "MemoryInput", "is_state_dict", "refuse_memory_base", "checkpoint_inputs", "host_array",
           "check_new_store", "check_fused_args", "write_fused", "read_fused"]

MEMORY = "<memory>"  # the source a store records for a task given as a state dict
_U8 = DTYPES["U8"]


def is_state_dict(value) -> bool:
    return isinstance(value, Mapping)


@dataclasses.dataclass(frozen=True)
class MemoryInput(Input):
    """A state dict, saved for the pass at `path`; recorded as in memory, named `name` by default."""

    name: str = "task"

    @property
    def source(self) -> str:
        return MEMORY

    def default_name(self, fallback: str) -> str:
        return self.name


def refuse_memory_base(base, checkpoints: Sequence) -> None:
    """The base must be a path or a hub id (module docstring), and state dicts record no base."""
    if is_state_dict(base):
        raise InputError("base: a state dict cannot be a store's base (the store reads theta0 again at every step "
                         "and keeps only its path); save it once (fusion.save for numpy arrays, "
                         "safetensors.torch.save_file for torch tensors) and pass the path")
    if base is None and any(is_state_dict(c) for c in checkpoints):
        raise InputError("a state dict records no base model; pass base= (a path or a hub id)")


def host_array(value, where: str = "tensor") -> tuple[np.ndarray, DType]:
    """A numpy array (or a torch tensor, brought to the host) as storage, and its dtype, for writing."""
    if not (isinstance(value, np.ndarray) or is_torch(value)):
        raise InputError(f"{where} is a {type(value).__name__}; pass numpy arrays or torch tensors")
    try:
        dtype = dtype_of(value)
    except ValueError as err:
        raise InputError(f"{where}: {err}") from None
    if is_torch(value):
        return from_torch(value)
    return np.require(value, requirements="C"), dtype  # keeps a 0-d shape


def _save_state_dict(tensors: Mapping, path: Path, label: str) -> None:
    """Write a state dict as one safetensors file, the way a checkpoint on disk is."""
    arrays = {}
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise InputError(f"{label}: key {name!r} is not a string; tensor names are strings")
        arrays[name] = host_array(value, f"{label}: tensor {name!r}")
    with SafetensorsWriter(path, [(n, d, a.shape) for n, (a, d) in arrays.items()], checksums=False) as writer:
        for name, (array, _) in arrays.items():
            writer.write(name, array)


@contextlib.contextmanager
def checkpoint_inputs(values: Sequence, labels: Sequence[str], default_names: Sequence[str]) -> Iterator[list[Input]]:
    """Checkpoint arguments as Inputs: paths and hub ids resolved, state dicts saved to a temporary
    folder for the block's pass. An error that names a saved file names the state dict instead."""
    with tempfile.TemporaryDirectory(prefix="condu-memory-") as folder:
        inputs, saved = [], {}
        for k, (value, label, name) in enumerate(zip(values, labels, default_names)):
            if is_state_dict(value):
                path = Path(folder) / f"{k + 1}.safetensors"
                _save_state_dict(value, path, label)
                inputs.append(MemoryInput(label, path, name=name))
                saved[str(path)] = label
            else:
                inputs.append(resolve_input(value))
        try:
            yield inputs
        except ConduError as err:  # the same error, naming the state dict where it names its saved file
            message = str(err)
            for path, label in saved.items():
                message = message.replace(path, label)
            if message != str(err):
                raise type(err)(message) from None
            raise


# ---- a FusedDeltas saved as a store ---------------------------------------------------------


def check_new_store(store_dir: Path) -> None:
    if store_dir.exists() and not store_dir.is_dir():
        raise InputError(f"{store_dir}: exists and is not a folder; choose another path")
    no_store_yet(store_dir)


def check_fused_args(state, names: Sequence[str] | None) -> list[str]:
    """The state and its task names (default task1..taskT), checked before anything is written."""
    if not isinstance(state, FusedDeltas):
        raise InputError(f"state is a {type(state).__name__}; pass the fusion.FusedDeltas that fusion.unify or "
                         "fusion.add returned")
    names = [f"task{t}" for t in range(1, state.num_tasks + 1)] if names is None else list(names)
    if len(names) != state.num_tasks:
        raise InputError(f"got {len(names)} names for the state's {state.num_tasks} tasks; give one name each")
    for name in names:
        layout.check_task_name(name)
    if len(set(names)) != len(names):
        raise InputError(f"task names {names} repeat a name; give each task its own")
    return names


def _store_tensors(state: FusedDeltas, base: Checkpoint) -> list[FusedTensor]:
    """The store's tensor table for `state`: the base's float tensors (the store's plan), each with
    the state's unified dtype; the state must fuse exactly those, and keep private only what the
    store would."""
    planned = plan_tensors(base, None)
    fix = "unify the deltas with base= this base, so the state fuses what a store does"
    for t in planned:
        if t.name not in state.shapes:
            raise InputError(f"the base's float tensor {t.name!r} {t.shape} is not fused in the state; {fix}")
        if tuple(state.shapes[t.name]) != t.shape:
            raise InputError(f"fused tensor {t.name!r} is {tuple(state.shapes[t.name])} in the state and {t.shape} in "
                             f"the base; {fix}")
    extra = [n for n in state.shapes if n not in {t.name for t in planned}]
    if extra:
        raise InputError(f"fused tensor {extra[0]!r} of the state is not a float tensor of the base; {fix}")
    base_shapes = {n: base.info(n).shape for n in base.keys()}
    for task, private in state.private.items():
        fusable = [n for n in private if n not in private_names({n: tuple(private[n].shape)}, base_shapes)]
        if fusable:
            raise InputError(f"task {task}: private tensor {fusable[0]!r} has the base's name and shape, so a store "
                             f"would fuse it; {fix}")
    out = []
    for t in planned:
        unified = state.dtypes.get(t.name, F32)
        if unified.name not in ("float32", "float16", "bfloat16"):
            raise InputError(f"fused tensor {t.name!r}: the state keeps its unified delta in {unified.name}; a store "
                             "keeps float32, float16 or bfloat16 (unify with dtypes=)")
        out.append(dataclasses.replace(t, unified_dtype=unified))
    return out


def _rebuilt_l1(unified: np.ndarray, packed: np.ndarray, rescaler: float) -> float:
    """L1 of lambda * M * u on one tensor: the task's delta now, when its inputs' L1 is not known."""
    mask = np.unpackbits(packed, count=unified.size, bitorder="little").astype(bool)  # (n,)
    return rescaler * float(np.abs(unified[mask].astype(np.float64)).sum())


def write_fused(tx: Transaction, base_input: Input, state: FusedDeltas, names: list[str],
                max_shard_size: int) -> Manifest:
    """Write `state` as generation 0 of a new store (its unified delta, triggers and private
    tensors exactly as they are) and commit it."""
    refuse_related(base_input.path, tx.store_dir, "the base", "the store")
    with Checkpoint(base_input.path, where=f"base {base_input.text}") as base:
        if base.is_adapter:
            raise InputError(f"{base_input.text}: a LoRA adapter; a state saved as a store takes a model as its base")
        fused = _store_tensors(state, base)
        base_ref = BaseRef(path=base_input.source, hub=base_input.hub, fingerprint=base.fingerprint(),
                           files={n: Digests.of(digest_file(f.path)) for n, f in base.files.items()})
    g, column = tx.generation, {name: k for k, name in enumerate(state.shapes)}
    meta = {"format": "condu-store", "generation": str(g)}
    unified = {t.name: np.ascontiguousarray(to_host(state.unified[t.name]), dtype=np.float32) for t in fused}
    writer = tx.unified_writer([(t.name, *t.unified_layout) for t in fused], max_shard_size=max_shard_size,
                               metadata=meta)
    for t in fused:  # values already rounded to the unified dtype: storing them is exact
        writer.write(t.name, from_float32(unified[t.name], t.unified_dtype))
    for rel, shard in writer.finish().items():
        tx.finished(rel, shard)
    rescalers, total = np.asarray(to_host(state.rescalers), dtype=np.float64), sum(t.numel for t in fused)
    masks = {t.name: to_host(state.masks[t.name]) for t in fused}  # (T, n/8) uint8
    tasks = []
    for i, name in enumerate(names):
        number, row = i + 1, rescalers[i, [column[t.name] for t in fused]]  # (K,) in the store's order
        triggers = layout.trigger_name(number, g)
        with tx.writer(triggers, [(t.name, _U8, (t.mask_bytes,)) for t in fused], metadata=meta) as w:
            for t in fused:
                w.write(t.name, np.ascontiguousarray(masks[t.name][i]))
        tx.finished(triggers, w)
        private = {n: host_array(v, f"task {number}: private tensor {n!r}") for n, v in state.private[number].items()}
        if private:
            with tx.writer(layout.private_name(number), [(n, d, a.shape) for n, (a, d) in private.items()],
                           metadata={"format": "condu-store"}) as w:
                for n, (a, _) in private.items():
                    w.write(n, a)
            tx.finished(layout.private_name(number), w)
        if state.delta_l1 is not None:
            l1 = float(np.asarray(to_host(state.delta_l1))[i].sum())
        else:  # a state opened from a store: what the task is now
            l1 = sum(_rebuilt_l1(unified[t.name], masks[t.name][i], float(row[k])) for k, t in enumerate(fused))
        bits = sum(int(np.bitwise_count(masks[t.name][i]).sum()) for t in fused)
        tasks.append(TaskEntry(number=number, name=name, source=SourceRef(path=MEMORY, fingerprint="", content=""),
                               added_generation=g, rescaler=_rescaler(row, fused, state.rescaler), l1=l1,
                               mask_density=bits / total if total else 0.0,
                               fidelity=Fidelity(cosine=None, rel_l2=None, generation=g), triggers=triggers,
                               private=layout.private_name(number) if private else None,
                               private_tensors=list(private)))
    weight_map = dict(writer.weight_map)
    files = list(dict.fromkeys(weight_map.values()))
    return tx.commit(Manifest(format="condu-store", version=VERSION, generation=g, hash="xxh3-64", base=base_ref,
                              space="dense", rescaler=state.rescaler, missing="error", max_shard_size=max_shard_size,
                              tensors=[t.entry() for t in fused], next_number=len(names) + 1, tasks=tasks,
                              unified=UnifiedEntry(files=files, weight_map=weight_map),
                              files=file_table(tx, files, tasks)))


def read_fused(store_dir: Path) -> FusedDeltas:
    """The store's current generation as a FusedDeltas of numpy arrays, every read checked: task t of
    the state is the store's t-th task (numbers may have gaps after a remove)."""
    def select(m: Manifest) -> list[str]:
        return [*m.unified.files, *(rel for t in m.tasks for rel in (t.triggers, *([t.private] if t.private else [])))]

    with reading(store_dir, select) as snapshot:
        m, fused = snapshot.manifest, snapshot.fused
        unified = {t.name: np.array(snapshot.unified_float32(t.name, 0, t.numel, out=np.empty(t.numel, np.float32)))
                   for t in fused}  # copies; a block-quantized u as its float32 values (code * scale)
        masks = {t.name: np.stack([np.array(snapshot.packed(task, t.name, 0, t.numel)) for task in m.tasks])
                 for t in fused}  # (T, n/8)
        rescalers = np.array([[task.rescaler_of(t.name) for t in fused] for task in m.tasks], dtype=np.float64)
        private: dict[int, dict[str, Any]] = {}
        for i, task in enumerate(m.tasks, start=1):
            f = snapshot.private(task)
            private[i] = {} if f is None else {n: as_array(f.read(n), f.info(n).dtype) for n in task.private_tensors}
    return FusedDeltas({t.name: t.shape for t in fused}, unified, masks, rescalers.reshape(len(m.tasks), len(fused)),
                       None, None, rescaler=m.rescaler,
                       dtypes={t.name: F32 if t.quantized else t.unified_dtype for t in fused},
                       private=private)
