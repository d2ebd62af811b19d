"""ConDU on in-memory state dicts: unify, the continual step, remove and decouple.

This is the small-model API (tests, notebooks, the conformance vectors). It runs the same
streaming pass as the on-disk store (`fusion.engine.fuse_pass`) over tensors held in memory.

    state = unify([delta_1, delta_2])          # one-shot, EMR-style
    state = add(state, delta_3)                # the continual step: rebuild 1..2, unify with 3
    delta_2_hat = state.decouple(1)            # tasks are 0-based here, 1-based in the store

Tensors are numpy arrays (float32, float16, float64, `ml_dtypes.bfloat16`) or, when the caller
has torch, torch tensors; results come back in the inputs' kind. CPU tensors are computed in
numpy (zero-copy views), CUDA tensors by the Triton kernel on their device, where the results
stay. The rescaler and L1 tables live on the host. torch is never imported here: a torch tensor
is known by its type, and the torch module is the one its caller already loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .arrays import all_finite, compute_arrays, kind_of, to_host
from .dtypes import F32, DType, float_dtype, parse_dtype
from .engine import DEFAULT_CHUNK, ChunkInputs, StoredChunk, TensorSpec, fuse_pass
from .kernels import get_kernel
from .reference import ChunkResult
from .rescale import check_mode, compute_rescalers

__all__ = ["FusedDeltas", "unify", "add", "remove", "task_delta", "apply_delta", "is_fusable"]

StateDict = Mapping[str, Any]  # name -> numpy array or torch tensor


def _resolve_kernel(kernel, kind: str, work: int):
    """A kernel object from a name, None (the best for the tensors' device and the work) or a kernel."""
    if kernel is None or isinstance(kernel, str):
        device = "cuda" if kind.startswith("torch/cuda") else "cpu"
        return get_kernel(kernel, device=device, work=work)
    return kernel


# ---- state dicts ------------------------------------------------------------------------------------------


def is_fusable(tensor) -> bool:
    """Floating-point tensors are fused; integer and bool buffers are taken from the base."""
    try:
        return parse_dtype(tensor.dtype).is_float
    except ValueError:  # complex and other dtypes safetensors does not name
        return False


def task_delta(base: StateDict, finetuned: StateDict) -> dict[str, Any]:
    """delta = theta_i - theta0 over the fusable tensors the two share with one shape, in float32."""
    arrays = compute_arrays(kind_of([*base.values(), *finetuned.values()], "task_delta"))
    return {
        name: arrays.to_user(arrays.float32(finetuned[name]) - arrays.float32(tensor))
        for name, tensor in base.items()
        if is_fusable(tensor) and name in finetuned and tuple(finetuned[name].shape) == tuple(tensor.shape)
    }


def apply_delta(base: StateDict, delta: StateDict) -> dict[str, Any]:
    """theta = theta0 + delta, in the base's dtypes; tensors without a delta are the base's."""
    arrays = compute_arrays(kind_of([*base.values(), *delta.values()], "apply_delta"))

    def added(tensor, change):
        total = arrays.float32(tensor) + arrays.float32(change).reshape(tuple(tensor.shape))  # float32
        return arrays.like(total, tensor)

    return {name: added(tensor, delta[name]) if name in delta else tensor for name, tensor in base.items()}


# ---- the fused state ----------------------------------------------------------------------------------------


@dataclass
class FusedDeltas:
    """The ConDU state of T tasks: one unified delta, and per task packed masks and rescalers.

    Arrays are of the kind the deltas came in (numpy, or torch on their device); the (T, K)
    tables are float64 on the host, column k for tensor k in `shapes` order.
    """

    shapes: dict[str, tuple[int, ...]]
    unified: dict[str, Any]  # name -> (n,) float32 (values rounded to the stored dtype)
    masks: dict[str, Any]  # name -> (T, ceil(n/8)) uint8
    rescalers: Any  # (T, K) float64
    delta_l1: Any  # (T, K) float64: L1 of the pass's inputs
    masked_l1: Any  # (T, K) float64: L1 of M_i * u
    mode: str = "model"
    dtypes: dict[str, DType] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    @property
    def num_tasks(self) -> int:
        return len(self.rescalers)

    def _arrays(self):
        return compute_arrays(kind_of(self.unified.values(), "the fused state"))

    def mask(self, task: int, name: str):
        """Bool mask of `task` (0-based) on tensor `name`, in the tensor's shape."""
        arrays = self._arrays()
        packed = arrays.view(self.masks[name])[task : task + 1]  # (1, n/8)
        bits = arrays.unpack_bits(packed, int(np.prod(self.shapes[name], dtype=np.int64)))[0]  # (n,)
        return arrays.to_user(bits.reshape(self.shapes[name]))

    def decouple(self, task: int) -> dict[str, Any]:
        """Rebuild one task's delta, `lambda * M * u`, in float32 and the tensors' shapes."""
        if not -self.num_tasks <= task < self.num_tasks:
            raise IndexError(f"task {task} out of range for {self.num_tasks} tasks")
        task %= self.num_tasks
        arrays, rescalers = self._arrays(), to_host(self.rescalers)  # (T, K)
        rebuilt = {}
        for k, (name, shape) in enumerate(self.shapes.items()):
            unified = arrays.view(self.unified[name])  # (n,)
            mask = arrays.unpack_bits(arrays.view(self.masks[name])[task : task + 1], unified.shape[0])[0]  # (n,)
            rebuilt[name] = arrays.to_user(arrays.reconstruct(unified, mask, float(rescalers[task, k])).reshape(shape))
        return rebuilt


# ---- validation at the boundary ------------------------------------------------------------------------------


def _shapes_of(deltas: Sequence[StateDict]) -> dict[str, tuple[int, ...]]:
    if not deltas:
        raise ValueError("unify needs at least one delta")
    return {name: tuple(t.shape) for name, t in deltas[0].items()}


def _prepare(deltas: Sequence[StateDict], shapes: Mapping[str, tuple], arrays) -> list[dict[str, Any]]:
    """Check every delta against `shapes` and return them as flat float32 arrays of the compute kind."""
    prepared = []
    for i, delta in enumerate(deltas):
        if set(delta) != set(shapes):
            missing, extra = sorted(set(shapes) - set(delta)), sorted(set(delta) - set(shapes))
            raise ValueError(f"delta {i}: tensors differ from the others (missing {missing}, extra {extra}); "
                             "pass every delta over the same tensors (fusion.task_delta keeps only shared ones)")
        prepared.append({name: _prepare_tensor(i, name, delta[name], shape, arrays) for name, shape in shapes.items()})
    return prepared


def _prepare_tensor(i: int, name: str, tensor, shape: tuple, arrays):
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"delta {i}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)}; "
                         "leave tensors of another shape out of the deltas")
    if not is_fusable(tensor):
        raise ValueError(f"delta {i}: tensor {name!r} is {str(tensor.dtype).removeprefix('torch.')}; "
                         "only float tensors are fused, leave integer and bool buffers out")
    flat = arrays.float32(tensor).reshape(-1)  # (n,) float32
    # A NaN would elect -1 at its position for every task and make this task's rescaler NaN.
    if not all_finite(flat):
        raise ValueError(f"delta {i}: tensor {name!r} has NaN or infinite values; check the fine-tuned checkpoint")
    return flat


def _check_keep(keep: Sequence[int] | None, num_tasks: int) -> list[int]:
    """The stored tasks to rebuild: default all; indices in range and distinct."""
    keep = list(range(num_tasks)) if keep is None else [int(i) for i in keep]
    bad = [i for i in keep if not 0 <= i < num_tasks]
    if bad or len(set(keep)) != len(keep):
        raise ValueError(f"keep={keep}: give distinct task indices from 0 to {num_tasks - 1}")
    return keep


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


def _run(shapes, dtypes, flat, num_tasks, mode, stored, kernel, arrays, chunk) -> FusedDeltas:
    """One fuse_pass over in-memory tensors (flat float32 arrays), then the rescalers."""
    specs = [TensorSpec(name, int(np.prod(shape, dtype=np.int64)), dtypes.get(name, F32)) for name, shape in shapes.items()]

    def read(name: str, lo: int, hi: int, slot: int) -> ChunkInputs:
        new = arrays.stack([d[name][lo:hi] for d in flat], hi - lo)  # (T_new, n)
        return ChunkInputs(new, stored=None if stored is None else stored(name, lo, hi))

    unified, masks, emit = _collect(shapes, num_tasks, arrays)
    tables = fuse_pass(specs, num_tasks=num_tasks, read=read, emit=emit, kernel=kernel, chunk=chunk)
    rescalers = compute_rescalers(tables.delta_l1, tables.masked_l1, np.array([s.numel for s in specs]), mode)
    user = arrays.to_user
    return FusedDeltas(dict(shapes), {n: user(u) for n, u in unified.items()}, {n: user(m) for n, m in masks.items()},
                       user(rescalers), user(tables.delta_l1), user(tables.masked_l1), mode, dict(dtypes))


def _pass_setup(kind: str, kernel, work: int):
    """The kernel and the compute arrays of a pass, checked against each other."""
    kernel = _resolve_kernel(kernel, kind, work)
    return kernel, compute_arrays(kind, kernel.name)


def unify(
    deltas: Sequence[StateDict],
    *,
    mode: str = "model",
    kernel=None,
    chunk: int = DEFAULT_CHUNK,
    dtypes: Mapping[str, Any] | None = None,
) -> FusedDeltas:
    """One-shot unify (EMR-style) of task deltas that share tensor names and shapes.

    `dtypes` maps a tensor to the dtype its unified delta is stored in (default float32): a
    fusion.dtypes.DType, its name, or a numpy or torch dtype. `kernel`: a name, a kernel
    object, or None for the best one for the tensors' device and size (fusion.get_kernel).
    """
    check_mode(mode)
    kind = kind_of((t for d in deltas for t in d.values()), "unify")
    shapes = _shapes_of(deltas)
    dtypes = {name: float_dtype(d) for name, d in (dtypes or {}).items()}
    work = len(deltas) * sum(int(np.prod(s, dtype=np.int64)) for s in shapes.values())
    kernel, arrays = _pass_setup(kind, kernel, work)
    flat = _prepare(deltas, shapes, arrays)
    return _run(shapes, dtypes, flat, len(deltas), mode, None, kernel, arrays, chunk)


def add(
    state: FusedDeltas,
    new: StateDict | Sequence[StateDict] = (),
    *,
    keep: Sequence[int] | None = None,
    mode: str | None = None,
    kernel=None,
    chunk: int = DEFAULT_CHUNK,
) -> FusedDeltas:
    """The ConDU continual step: rebuild the kept tasks (default: all), unify them with `new`.

    With no new delta this re-unifies the stored tasks alone; with `keep` it drops the others.
    Tasks keep their order; new tasks come last.
    """
    new = [new] if isinstance(new, Mapping) else list(new)
    keep = _check_keep(keep, state.num_tasks)
    if len(keep) + len(new) == 0:
        raise ValueError("nothing left to unify: keep at least one task or add one")
    mode = check_mode(mode or state.mode)
    kind = kind_of([*state.unified.values(), *(t for d in new for t in d.values())], "add")
    work = (len(keep) + len(new)) * sum(int(np.prod(s, dtype=np.int64)) for s in state.shapes.values())
    kernel, arrays = _pass_setup(kind, kernel, work)
    flat = _prepare(new, state.shapes, arrays)
    column = {name: k for k, name in enumerate(state.shapes)}
    unified = {name: arrays.view(u) for name, u in state.unified.items()}
    masks = {name: arrays.view(m) for name, m in state.masks.items()}
    rescalers = to_host(state.rescalers)  # (T, K)

    def stored(name: str, lo: int, hi: int) -> StoredChunk:
        packed = masks[name][keep, lo // 8 : -(-hi // 8)]  # (T_keep, n/8)
        return StoredChunk(unified[name][lo:hi], packed, rescalers[keep, column[name]])

    return _run(state.shapes, state.dtypes, flat, len(keep) + len(new), mode, stored, kernel, arrays, chunk)


def remove(state: FusedDeltas, task: int, **options) -> FusedDeltas:
    """Drop one task (0-based) and re-unify the rest from their reconstructions."""
    if not 0 <= task < state.num_tasks:
        raise IndexError(f"task {task} out of range for {state.num_tasks} tasks")
    return add(state, (), keep=[i for i in range(state.num_tasks) if i != task], **options)
