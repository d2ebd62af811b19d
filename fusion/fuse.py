"""ConDU on in-memory state dicts: unify, the continual step, remove and decouple.

This is the small-model API (tests, notebooks, the conformance vectors). It runs the same
streaming pass as the on-disk store (`fusion.engine.fuse_pass`) over tensors held in memory.

    state = unify([delta_1, delta_2], base=base)   # one-shot, EMR-style
    state = add(state, delta_3)                    # the continual step: rebuild 1..2, unify with 3
    delta_2_hat = state.decouple(2)                # tasks count from 1, as in the store and the CLI

What is fused follows the store's plan (fusion.store.plan, through `private_names`): with
`base`, the base's floating-point tensors, as the store does; without it, the tensors every
delta has in one shape. A delta's other tensors (a new head, a resized vocabulary) are private
to its task: kept whole, returned by `decouple`, never elected. `add` fuses what the state does.

Tensors are numpy arrays (float32, float16, float64, `ml_dtypes.bfloat16`) or, when the caller
has torch, torch tensors; results come back in the inputs' kind. CPU tensors are computed in
numpy (zero-copy views), CUDA tensors by the Triton kernel on their device, where the results
stay. The rescaler and L1 tables live on the host. torch is never imported here: a torch tensor
is known by its type, and the torch module is the one its caller already loaded.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .arrays import all_finite, compute_arrays, is_torch, kind_of, to_host
from .dtypes import F32, DType, float_dtype, parse_dtype
from .engine import DEFAULT_CHUNK, ChunkInputs, StoredChunk, TensorSpec, fuse_pass
from .errors import InputError
from .kernels import get_kernel
from .reference import ChunkResult
from .rescale import check_mode, compute_rescalers

__all__ = ["FusedDeltas", "unify", "add", "remove", "task_delta", "apply_delta", "is_fusable", "private_names"]

StateDict = Mapping[str, Any]  # name -> numpy array or torch tensor


def _resolve_kernel(kernel, kind: str, work: int):
    """A kernel object from a name, None (the best for the tensors' device and the work) or a kernel."""
    if kernel is None or isinstance(kernel, str):
        device = "cuda" if kind.startswith("torch/cuda") else "cpu"
        return get_kernel(kernel, device=device, work=work)
    return kernel


# ---- which tensors are fused --------------------------------------------------------------------------------


def private_names(shapes: Mapping[str, tuple], fused: Mapping[str, tuple]) -> list[str]:
    """A task's tensors that cannot be fused: those `fused` lacks or has in another shape (a new
    head, a resized vocabulary), in the task's order. The store (against the base's tensors) and
    the in-memory API (against the fused set) decide by this one rule."""
    return [name for name, shape in shapes.items() if name not in fused or tuple(fused[name]) != tuple(shape)]


def _shapes(tensors: StateDict) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in tensors.items()}


def _fused_set(deltas: Sequence[StateDict], base: StateDict | None) -> dict[str, tuple[int, ...]]:
    """The fused tensors: the base's float ones (as the store), else those every delta has in one shape."""
    if base is not None:
        return {name: tuple(t.shape) for name, t in base.items() if is_fusable(t)}
    first, *others = [_shapes(d) for d in deltas]
    return {name: shape for name, shape in first.items() if all(o.get(name) == shape for o in others)}


def _refuse_buffers(deltas: Sequence[StateDict], base: StateDict) -> None:
    """A delta for a base buffer (integer or bool, same shape) has no meaning: the store takes those from the base."""
    for i, delta in enumerate(deltas, start=1):
        for name, tensor in delta.items():
            if name in base and not is_fusable(base[name]) and tuple(base[name].shape) == tuple(tensor.shape):
                raise InputError(f"delta {i}: tensor {name!r} is a buffer of the base "
                                 f"({str(base[name].dtype).removeprefix('torch.')}), which is not fused; leave it out "
                                 "(fusion.task_delta does)")


# ---- state dicts ------------------------------------------------------------------------------------------


def is_fusable(tensor) -> bool:
    """Floating-point tensors are fused; integer and bool buffers are taken from the base."""
    try:
        return parse_dtype(tensor.dtype).is_float
    except ValueError:  # complex and other dtypes safetensors does not name
        return False


def task_delta(base: StateDict, finetuned: StateDict) -> dict[str, Any]:
    """delta = theta_i - theta0, in float32, over the float tensors the two share with one shape;
    the fine-tune's float tensors the base lacks or has in another shape come whole, as they are
    (unify keeps them private to the task). Integer and bool buffers are left out: they are the base's."""
    arrays = compute_arrays(kind_of([*base.values(), *finetuned.values()], "task_delta"))
    private = private_names(_shapes(finetuned), _shapes(base))
    shared = {
        name: arrays.to_user(arrays.float32(finetuned[name]) - arrays.float32(tensor))
        for name, tensor in base.items()
        if is_fusable(tensor) and name in finetuned and name not in private and is_fusable(finetuned[name])
    }
    return {**shared, **{name: finetuned[name] for name in private if is_fusable(finetuned[name])}}


def apply_delta(base: StateDict, delta: StateDict) -> dict[str, Any]:
    """theta = theta0 + delta, in the base's dtypes; tensors without a delta are the base's, and a
    delta's tensor the base lacks or has in another shape (a private one) is taken whole."""
    arrays = compute_arrays(kind_of([*base.values(), *delta.values()], "apply_delta"))
    whole = set(private_names(_shapes(delta), _shapes(base)))

    def added(tensor, change):
        total = arrays.float32(tensor) + arrays.float32(change).reshape(tuple(tensor.shape))  # float32
        return arrays.like(total, tensor)

    out = {name: added(tensor, delta[name]) if name in delta and name not in whole else tensor
           for name, tensor in base.items()}
    out.update({name: delta[name] for name in whole})
    return out


# ---- the fused state ----------------------------------------------------------------------------------------


@dataclass
class FusedDeltas:
    """The ConDU state of T tasks: one unified delta, per task packed masks and rescalers, and the
    tensors each task keeps to itself. Tasks count from 1, as in the store: task t is row t - 1 of
    the tables and of `masks`.

    Arrays are of the kind the deltas came in (numpy, or torch on their device); the (T, K)
    tables are float64 on the host, column k for tensor k in `shapes` order. The L1 tables are
    None for a state opened from a store, which keeps per task only their total (`TaskRecord.l1`).
    """

    shapes: dict[str, tuple[int, ...]]
    unified: dict[str, Any]  # name -> (n,) float32 (values rounded to the stored dtype)
    masks: dict[str, Any]  # name -> (T, ceil(n/8)) uint8
    rescalers: Any  # (T, K) float64
    delta_l1: Any | None  # (T, K) float64: L1 of the pass's inputs
    masked_l1: Any | None  # (T, K) float64: L1 of M_i * u
    rescaler: str = "model"  # the rescaler mode (fusion.rescale)
    dtypes: dict[str, DType] = field(default_factory=dict)
    private: dict[int, dict[str, Any]] = field(default_factory=dict)  # task -> its tensors kept whole

    def __post_init__(self):
        self.private = {t: dict(self.private.get(t, {})) for t in range(1, self.num_tasks + 1)}

    @property
    def mode(self) -> str:
        """Deprecated: the rescaler mode is `rescaler`."""
        warnings.warn("FusedDeltas.mode is deprecated and goes in the next release; use FusedDeltas.rescaler",
                      DeprecationWarning, stacklevel=2)
        return self.rescaler

    @property
    def names(self) -> list[str]:
        """The fused tensors' names."""
        return list(self.shapes)

    @property
    def num_tasks(self) -> int:
        return len(self.rescalers)

    def _arrays(self):
        return compute_arrays(kind_of(self.unified.values(), "the fused state"))

    def _row(self, task) -> int:
        """Task number (1..T) -> its table row; one line naming the range otherwise."""
        if isinstance(task, bool) or not isinstance(task, (int, np.integer)) or not 1 <= task <= self.num_tasks:
            raise InputError(f"task {task!r}: this state holds tasks 1..{self.num_tasks}; tasks count from 1, as in "
                             "the store and the CLI")
        return int(task) - 1

    def mask(self, task: int, name: str):
        """Bool mask of `task` (1..T) on fused tensor `name`, in the tensor's shape."""
        row, arrays = self._row(task), self._arrays()
        packed = arrays.view(self.masks[name])[row : row + 1]  # (1, n/8)
        bits = arrays.unpack_bits(packed, int(np.prod(self.shapes[name], dtype=np.int64)))[0]  # (n,)
        return arrays.to_user(bits.reshape(self.shapes[name]))

    def decouple(self, task: int) -> dict[str, Any]:
        """Rebuild task `task`'s (1..T) delta: `lambda * M * u` in float32 and the tensors' shapes,
        and its private tensors as they were given (one of those wins over a fused namesake)."""
        row = self._row(task)
        arrays, rescalers = self._arrays(), to_host(self.rescalers)  # (T, K)
        rebuilt = {}
        for k, (name, shape) in enumerate(self.shapes.items()):
            unified = arrays.view(self.unified[name])  # (n,)
            mask = arrays.unpack_bits(arrays.view(self.masks[name])[row : row + 1], unified.shape[0])[0]  # (n,)
            rebuilt[name] = arrays.to_user(arrays.reconstruct(unified, mask, float(rescalers[row, k])).reshape(shape))
        rebuilt.update(self.private[row + 1])
        return rebuilt


# ---- validation at the boundary ------------------------------------------------------------------------------


def _rescaler_keyword(rescaler: str | None, mode: str | None, default: str) -> str:
    """`rescaler=`, or the deprecated `mode=` (for one more release, with a warning)."""
    if mode is not None:
        warnings.warn("mode= is deprecated and goes in the next release; use rescaler=", DeprecationWarning,
                      stacklevel=3)
        if rescaler is not None and rescaler != mode:
            raise InputError(f"rescaler={rescaler!r} and mode={mode!r} disagree; pass rescaler= alone")
        rescaler = mode
    return check_mode(default if rescaler is None else rescaler)


def _owned(tensor):
    """A copy the state owns, so that a caller's later change to its dict cannot change the state."""
    return tensor.detach().clone() if is_torch(tensor) else np.array(tensor, copy=True)


def _split(i: int, delta: StateDict, shapes: Mapping[str, tuple], arrays) -> tuple[dict[str, Any], dict[str, Any]]:
    """Delta i (1-based) as flat float32 arrays of the fused tensors, and its private tensors.

    A fused tensor it has in another shape counts as unchanged there (a zero delta), as in the store."""
    for name, tensor in delta.items():
        if not is_fusable(tensor):
            raise InputError(f"delta {i}: tensor {name!r} is {str(tensor.dtype).removeprefix('torch.')}; "
                             "only float tensors are fused, leave integer and bool buffers out")
    missing = [name for name in shapes if name not in delta]
    if missing:
        raise InputError(f"delta {i}: lacks the fused tensor {missing[0]!r}"
                         f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; give every delta every "
                         "fused tensor (fusion.task_delta of a fine-tune of the base does)")
    private = private_names(_shapes(delta), shapes)
    flat = {name: _zeros(shape, arrays) if name in private else _flat(i, name, delta[name], arrays)
            for name, shape in shapes.items()}
    return flat, {name: _owned(delta[name]) for name in private}


def _zeros(shape: tuple, arrays):
    zeros = arrays.empty((int(np.prod(shape, dtype=np.int64)),), "float32")  # (n,)
    zeros[:] = 0
    return zeros


def _flat(i: int, name: str, tensor, arrays):
    flat = arrays.float32(tensor).reshape(-1)  # (n,) float32
    # A NaN would elect -1 at its position for every task and make this task's rescaler NaN.
    if not all_finite(flat):
        raise InputError(f"delta {i}: tensor {name!r} has NaN or infinite values; check the fine-tuned checkpoint")
    return flat


def _check_keep(keep: Sequence[int] | None, num_tasks: int) -> list[int]:
    """The stored tasks to rebuild, as table rows: default all; numbers 1..T, distinct."""
    numbers = list(range(1, num_tasks + 1)) if keep is None else list(keep)
    bad = [t for t in numbers if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 1 <= t <= num_tasks]
    if bad or len(set(numbers)) != len(numbers):
        raise InputError(f"keep={list(keep)}: give distinct task numbers from 1 to {num_tasks}; tasks count from 1, "
                         "as in the store")
    return [int(t) - 1 for t in numbers]


# ---- the pass -----------------------------------------------------------------------------------------------


def _collect(shapes: Mapping[str, tuple], num_tasks: int, arrays):
    """A sink for fuse_pass that assembles whole flat tensors from chunk results."""
    numels = {name: int(np.prod(shape, dtype=np.int64)) for name, shape in shapes.items()}
    unified = {name: arrays.empty((n,), "float32") for name, n in numels.items()}
    masks = {name: arrays.empty((num_tasks, -(-n // 8)), "uint8") for name, n in numels.items()}

    def emit(name: str, lo: int, hi: int, result: ChunkResult) -> None:
        unified[name][lo:hi] = result.unified
        masks[name][:, lo // 8 : -(-hi // 8)] = result.packed_masks

    return unified, masks, emit


def _run(shapes, dtypes, flat, num_tasks, rescaler, stored, kernel, arrays, chunk, private) -> FusedDeltas:
    """One fuse_pass over in-memory tensors (flat float32 arrays), then the rescalers."""
    specs = [TensorSpec(name, int(np.prod(shape, dtype=np.int64)), dtypes.get(name, F32)) for name, shape in shapes.items()]

    def read(name: str, lo: int, hi: int, slot: int) -> ChunkInputs:
        new = arrays.stack([d[name][lo:hi] for d in flat], hi - lo)  # (T_new, n)
        return ChunkInputs(new, stored=None if stored is None else stored(name, lo, hi))

    unified, masks, emit = _collect(shapes, num_tasks, arrays)
    tables = fuse_pass(specs, num_tasks=num_tasks, read=read, emit=emit, kernel=kernel, chunk=chunk)
    rescalers = compute_rescalers(tables.delta_l1, tables.masked_l1, np.array([s.numel for s in specs]), rescaler)
    user = arrays.to_user
    return FusedDeltas(dict(shapes), {n: user(u) for n, u in unified.items()}, {n: user(m) for n, m in masks.items()},
                       user(rescalers), user(tables.delta_l1), user(tables.masked_l1), rescaler=rescaler,
                       dtypes=dict(dtypes), private=private)


def _pass_setup(kind: str, kernel, work: int):
    """The kernel and the compute arrays of a pass, checked against each other."""
    kernel = _resolve_kernel(kernel, kind, work)
    return kernel, compute_arrays(kind, kernel.name)


def unify(
    deltas: Sequence[StateDict],
    *,
    base: StateDict | None = None,
    rescaler: str | None = None,
    kernel=None,
    chunk: int = DEFAULT_CHUNK,
    dtypes: Mapping[str, Any] | None = None,
    mode: str | None = None,
) -> FusedDeltas:
    """One-shot unify (EMR-style) of task deltas; `rescaler`: model (default), tensor-mean or tensor.

    `base` (theta0; only its names, shapes and dtypes are used) fuses what the store would: its
    float tensors, each delta's others kept private, the unified delta in the base's dtypes.
    Without it the deltas' shared tensors are fused, in float32. `dtypes` maps a tensor to the
    dtype its unified delta is stored in: a fusion.dtypes.DType, its name, or a numpy or torch
    dtype. `kernel`: a name, a kernel object, or None for the best one for the tensors' device
    and size (fusion.get_kernel). `mode=` is the deprecated name of `rescaler=`.
    """
    rescaler = _rescaler_keyword(rescaler, mode, "model")
    if not deltas:
        raise InputError("unify needs at least one delta")
    kind = kind_of((t for d in deltas for t in d.values()), "unify")
    shapes = _fused_set(deltas, base)
    if base is not None:
        _refuse_buffers(deltas, base)
    if not shapes:
        raise InputError("the deltas share no float tensor in one shape, so nothing is fused; give deltas of "
                         "fine-tunes of one base (fusion.task_delta), or pass base=")
    wanted = {} if base is None else {name: base[name].dtype for name in shapes}
    dtypes = {name: float_dtype(d) for name, d in {**wanted, **(dtypes or {})}.items()}
    work = len(deltas) * sum(int(np.prod(s, dtype=np.int64)) for s in shapes.values())
    kernel, arrays = _pass_setup(kind, kernel, work)
    split = [_split(i, d, shapes, arrays) for i, d in enumerate(deltas, start=1)]
    private = {t: p for t, (_, p) in enumerate(split, start=1)}
    return _run(shapes, dtypes, [f for f, _ in split], len(deltas), rescaler, None, kernel, arrays, chunk, private)


def add(
    state: FusedDeltas,
    new: StateDict | Sequence[StateDict] = (),
    *,
    keep: Sequence[int] | None = None,
    rescaler: str | None = None,
    kernel=None,
    chunk: int = DEFAULT_CHUNK,
    mode: str | None = None,
) -> FusedDeltas:
    """The ConDU continual step: rebuild the kept tasks (numbers 1..T, default all), unify them with `new`.

    With no new delta this re-unifies the stored tasks alone; with `keep` it drops the others.
    Tasks keep their order and are numbered 1.. again; new tasks come last. A new delta's
    tensors the state does not fuse are private to it. `rescaler` defaults to the state's.
    """
    rescaler = _rescaler_keyword(rescaler, mode, state.rescaler)
    new = [new] if isinstance(new, Mapping) else list(new)
    rows = _check_keep(keep, state.num_tasks)
    if len(rows) + len(new) == 0:
        raise InputError("nothing left to unify: keep at least one task or add one")
    kind = kind_of([*state.unified.values(), *(t for d in new for t in d.values())], "add")
    work = (len(rows) + len(new)) * sum(int(np.prod(s, dtype=np.int64)) for s in state.shapes.values())
    kernel, arrays = _pass_setup(kind, kernel, work)
    split = [_split(i, d, state.shapes, arrays) for i, d in enumerate(new, start=1)]
    column = {name: k for k, name in enumerate(state.shapes)}
    unified = {name: arrays.view(u) for name, u in state.unified.items()}
    masks = {name: arrays.view(m) for name, m in state.masks.items()}
    rescalers = to_host(state.rescalers)  # (T, K)

    def stored(name: str, lo: int, hi: int) -> StoredChunk:
        packed = masks[name][rows, lo // 8 : -(-hi // 8)]  # (T_keep, n/8)
        return StoredChunk(unified[name][lo:hi], packed, rescalers[rows, column[name]])

    private = [state.private[r + 1] for r in rows] + [p for _, p in split]
    return _run(state.shapes, state.dtypes, [f for f, _ in split], len(rows) + len(new), rescaler, stored, kernel,
                arrays, chunk, dict(enumerate(private, start=1)))


def remove(state: FusedDeltas, task: int, **options) -> FusedDeltas:
    """Drop task `task` (1..T) and re-unify the rest from their reconstructions; the later tasks
    move down one number (the store keeps numbers for life; this state numbers its rows)."""
    row = state._row(task)
    return add(state, (), keep=[t for t in range(1, state.num_tasks + 1) if t != row + 1], **options)
