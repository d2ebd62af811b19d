"""ConDU on in-memory state dicts: unify, the continual step, remove and decouple.

This is the small-model API (tests, notebooks, the conformance vectors). It runs the same
streaming pass as the on-disk store (`fusion.engine.fuse_pass`) over tensors held in memory.

    state = unify([delta_1, delta_2])          # one-shot, EMR-style
    state = add(state, delta_3)                # the continual step: rebuild 1..2, unify with 3
    delta_2_hat = state.decouple(1)            # tasks are 0-based here, 1-based in the store
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from .engine import DEFAULT_CHUNK, StoredChunk, TensorSpec, fuse_pass
from .kernels import get_kernel
from .reference import ChunkResult, reconstruct, unpack_bits
from .rescale import check_mode, compute_rescalers

__all__ = ["FusedDeltas", "unify", "add", "remove", "task_delta", "apply_delta", "is_fusable"]

StateDict = Mapping[str, torch.Tensor]


def is_fusable(tensor: torch.Tensor) -> bool:
    """Floating-point tensors are fused; integer and bool buffers are taken from the base."""
    return tensor.is_floating_point()


def task_delta(base: StateDict, finetuned: StateDict) -> dict[str, torch.Tensor]:
    """delta = theta_i - theta0 over the fusable tensors the two share with one shape, in float32."""
    return {
        name: finetuned[name].float() - tensor.float()
        for name, tensor in base.items()
        if is_fusable(tensor) and name in finetuned and finetuned[name].shape == tensor.shape
    }


def apply_delta(base: StateDict, delta: StateDict) -> dict[str, torch.Tensor]:
    """theta = theta0 + delta, in the base's dtypes; tensors without a delta are the base's."""
    return {
        name: (tensor.float() + delta[name].reshape(tensor.shape)).to(tensor.dtype) if name in delta else tensor
        for name, tensor in base.items()
    }


@dataclass
class FusedDeltas:
    """The ConDU state of T tasks: one unified delta, and per task packed masks and rescalers."""

    shapes: dict[str, torch.Size]
    unified: dict[str, torch.Tensor]  # name -> (n,) float32 (values rounded to the stored dtype)
    masks: dict[str, torch.Tensor]  # name -> (T, ceil(n/8)) uint8
    rescalers: torch.Tensor  # (T, K) float64, column k for tensor k in `shapes` order
    delta_l1: torch.Tensor  # (T, K) float64: L1 of the pass's inputs
    masked_l1: torch.Tensor  # (T, K) float64: L1 of M_i * u
    mode: str = "model"
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    @property
    def num_tasks(self) -> int:
        return self.rescalers.shape[0]

    def mask(self, task: int, name: str) -> torch.Tensor:
        """Bool mask of `task` (0-based) on tensor `name`, in the tensor's shape."""
        n = self.unified[name].numel()
        return unpack_bits(self.masks[name][task : task + 1], n)[0].reshape(self.shapes[name])

    def decouple(self, task: int) -> dict[str, torch.Tensor]:
        """Rebuild one task's delta, `lambda * M * u`, in float32 and the tensors' shapes."""
        if not -self.num_tasks <= task < self.num_tasks:
            raise IndexError(f"task {task} out of range for {self.num_tasks} tasks")
        task %= self.num_tasks
        return {
            name: reconstruct(self.unified[name], self.mask(task, name).flatten(), float(self.rescalers[task, k]))
            .reshape(shape)
            for k, (name, shape) in enumerate(self.shapes.items())
        }


def _check_deltas(deltas: Sequence[StateDict], shapes: Mapping[str, torch.Size] | None = None) -> dict[str, torch.Size]:
    """All deltas name the same tensors with the same shapes; return {name: shape}."""
    if shapes is None:
        if not deltas:
            raise ValueError("unify needs at least one delta")
        shapes = {name: t.shape for name, t in deltas[0].items()}
    for i, delta in enumerate(deltas):
        if set(delta) != set(shapes):
            missing, extra = sorted(set(shapes) - set(delta)), sorted(set(delta) - set(shapes))
            raise ValueError(f"delta {i}: tensors differ from the others (missing {missing}, extra {extra}); "
                             "pass every delta over the same tensors (fusion.task_delta keeps only shared ones)")
        for name, shape in shapes.items():
            _check_tensor(i, name, delta[name], shape)
    return dict(shapes)


def _check_tensor(i: int, name: str, tensor: torch.Tensor, shape: torch.Size) -> None:
    if tensor.shape != shape:
        raise ValueError(f"delta {i}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)}; "
                         "leave tensors of another shape out of the deltas")
    if not tensor.is_floating_point():
        raise ValueError(f"delta {i}: tensor {name!r} is {tensor.dtype}; only float tensors are fused, "
                         "leave integer and bool buffers out")
    # A NaN would elect -1 at its position for every task and make this task's rescaler NaN.
    if not torch.isfinite(tensor).all():
        raise ValueError(f"delta {i}: tensor {name!r} has NaN or infinite values; check the fine-tuned checkpoint")


def _check_keep(keep: Sequence[int] | None, num_tasks: int) -> list[int]:
    """The stored tasks to rebuild: default all; indices in range and distinct."""
    keep = list(range(num_tasks)) if keep is None else [int(i) for i in keep]
    bad = [i for i in keep if not 0 <= i < num_tasks]
    if bad or len(set(keep)) != len(keep):
        raise ValueError(f"keep={keep}: give distinct task indices from 0 to {num_tasks - 1}")
    return keep


def _collect(shapes: Mapping[str, torch.Size], num_tasks: int):
    """A sink for fuse_pass that assembles whole tensors from chunk results."""
    unified = {name: torch.empty(shape.numel()) for name, shape in shapes.items()}
    masks = {name: torch.empty((num_tasks, -(-shape.numel() // 8)), dtype=torch.uint8) for name, shape in shapes.items()}

    def emit(name: str, lo: int, hi: int, result: ChunkResult) -> None:
        unified[name][lo:hi] = result.unified
        masks[name][:, lo // 8 : -(-hi // 8)] = result.packed_masks

    return unified, masks, emit


def _run(shapes, dtypes, deltas, num_tasks, mode, stored, kernel, chunk) -> FusedDeltas:
    specs = [TensorSpec(name, shape.numel(), dtypes.get(name, torch.float32)) for name, shape in shapes.items()]
    flat = [{name: d[name].reshape(-1) for name in shapes} for d in deltas]

    def new_deltas(name: str, lo: int, hi: int) -> torch.Tensor:
        if not flat:
            return torch.empty((0, hi - lo))
        return torch.stack([d[name][lo:hi] for d in flat])  # (T_new, n)

    unified, masks, emit = _collect(shapes, num_tasks)
    kernel = get_kernel(kernel) if kernel is None or isinstance(kernel, str) else kernel
    tables = fuse_pass(specs, num_tasks=num_tasks, new_deltas=new_deltas, emit=emit, stored=stored,
                       kernel=kernel, chunk=chunk)
    numels = torch.tensor([s.numel for s in specs])
    rescalers = compute_rescalers(tables.delta_l1, tables.masked_l1, numels, mode)
    return FusedDeltas(dict(shapes), unified, masks, rescalers, tables.delta_l1, tables.masked_l1, mode, dict(dtypes))


def unify(
    deltas: Sequence[StateDict],
    *,
    mode: str = "model",
    kernel=None,
    chunk: int = DEFAULT_CHUNK,
    dtypes: Mapping[str, torch.dtype] | None = None,
) -> FusedDeltas:
    """One-shot unify (EMR-style) of task deltas that share tensor names and shapes.

    `dtypes` maps a tensor to the dtype its unified delta is stored in (default float32).
    """
    check_mode(mode)
    shapes = _check_deltas(deltas)
    return _run(shapes, dict(dtypes or {}), deltas, len(deltas), mode, None, kernel, chunk)


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
    _check_deltas(new, state.shapes)
    keep = _check_keep(keep, state.num_tasks)
    if len(keep) + len(new) == 0:
        raise ValueError("nothing left to unify: keep at least one task or add one")
    column = {name: k for k, name in enumerate(state.shapes)}

    def stored(name: str, lo: int, hi: int) -> StoredChunk:
        packed = state.masks[name][keep, lo // 8 : -(-hi // 8)]
        return StoredChunk(state.unified[name][lo:hi], packed, state.rescalers[keep, column[name]])

    mode = check_mode(mode or state.mode)
    return _run(state.shapes, state.dtypes, new, len(keep) + len(new), mode, stored, kernel, chunk)


def remove(state: FusedDeltas, task: int, **options) -> FusedDeltas:
    """Drop one task (0-based) and re-unify the rest from their reconstructions."""
    if not 0 <= task < state.num_tasks:
        raise IndexError(f"task {task} out of range for {state.num_tasks} tasks")
    return add(state, (), keep=[i for i in range(state.num_tasks) if i != task], **options)
