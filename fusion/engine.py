"""One streaming unify pass over many tensors, chunk by chunk, for any source and sink.

The in-memory API (`fusion.fuse`) and the on-disk store both run this loop; they differ only
in where chunks come from and where results go. Memory is bounded by one chunk of every task.
The rescalers need the L1 sums of the whole pass, so they are finished after it
(`fusion.rescale.compute_rescalers`) from the `(T, K)` float64 numpy tables this returns.
Chunks are arrays of the kernel's kind: numpy for `reference` and `cpu`, torch tensors on the
device for `triton`; the L1 tables always live on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np

from .arrays import all_finite, to_host
from .dtypes import F32, BlockQuant, DType, unified_form
from .errors import InputError
from .pipeline import run_stages
from .reference import ChunkResult, Originals

if TYPE_CHECKING:
    from .device import DeviceStage
    from .kernels import Kernel

__all__ = ["TensorSpec", "StoredChunk", "ChunkInputs", "L1Tables", "chunk_ranges", "check_aligned", "fuse_pass",
           "DEFAULT_CHUNK"]

# Elements per chunk and task: 1M fp32 elements is 4 MiB a task, 64 MiB of input at T = 16.
DEFAULT_CHUNK = 1 << 20


@dataclass(frozen=True)
class TensorSpec:
    """A fused tensor: its name, element count and how its unified delta is stored (a float dtype,
    or block-quantized: fusion.dtypes.BlockQuant)."""

    name: str
    numel: int
    unified_dtype: DType | BlockQuant = F32

    def __post_init__(self):
        object.__setattr__(self, "unified_dtype", unified_form(self.unified_dtype))  # also from a name


class StoredChunk(NamedTuple):
    """The stored state of one chunk: unified delta, packed masks and rescalers of the old tasks."""

    unified: Any  # (n,)
    packed_masks: Any  # (T_old, ceil(n/8)) uint8
    rescalers: Any  # (T_old,) float64


class L1Tables(NamedTuple):
    delta_l1: np.ndarray  # (T, K) float64
    masked_l1: np.ndarray  # (T, K) float64


def chunk_ranges(numel: int, chunk: int) -> Iterator[tuple[int, int]]:
    """[lo, hi) ranges covering `numel`; every lo is a multiple of 8 so packed masks slice by bytes."""
    if chunk <= 0 or chunk % 8:
        raise InputError(f"chunk size must be a positive multiple of 8, got {chunk}")
    for lo in range(0, numel, chunk):
        yield lo, min(lo + chunk, numel)


def _check_representable(spec: TensorSpec, unified) -> None:
    """A unified delta beyond its storage dtype's range would rebuild as inf/NaN: refuse it.

    Finite float32 inputs give a finite float32 u (it is one of them), so only narrower storage
    dtypes, and block scales of an overflowing block, can make it non-finite; the sinks check their
    inputs for NaN and Inf themselves.
    """
    form = spec.unified_dtype
    if (isinstance(form, BlockQuant) or form.itemsize < 4) and not all_finite(unified):
        raise InputError(f"tensor {spec.name!r}: its unified delta overflows {form.name}; "
                         "store it in float32 (dtypes={name: 'float32'}, or --dtype float32)")


def check_aligned(specs: Sequence[TensorSpec], chunk: int) -> None:
    """Block-quantized tensors are cut into chunks of whole blocks: refuse a chunk size that is not."""
    for spec in specs:
        form = spec.unified_dtype
        if isinstance(form, BlockQuant) and chunk % form.block:
            raise InputError(f"chunk size {chunk} cuts the {form.name} blocks of tensor {spec.name!r}; "
                             f"use a multiple of {form.block}")


class ChunkInputs(NamedTuple):
    """What a pass reads for one chunk of one tensor."""

    new: Any  # (T_new, n): new tasks' deltas, or their fine-tuned weights when `base` is given
    base: Any = None  # (n,) float32 theta0 on the chunk: the kernel takes `new - base` as the deltas
    stored: StoredChunk | None = None  # the stored tasks to rebuild first (None: a one-shot unify)
    originals: Originals | None = None  # which tasks' fidelity sums to measure (fusion.reference)


def _compute(kernel: "Kernel", spec: TensorSpec, inputs: ChunkInputs) -> ChunkResult:
    options = dict(unified_dtype=spec.unified_dtype, base=inputs.base, originals=inputs.originals)
    if inputs.stored is None:
        return kernel.elect(inputs.new, **options)
    old = inputs.stored
    return kernel.continual(old.unified, old.packed_masks, old.rescalers, inputs.new, **options)


def fuse_pass(
    specs: Sequence[TensorSpec],
    *,
    num_tasks: int,
    read: Callable[[str, int, int, int], ChunkInputs],
    emit: Callable[[str, int, int, ChunkResult], None],
    kernel: "Kernel",
    chunk: int = DEFAULT_CHUNK,
    progress: Callable[[int], None] | None = None,
    pipelined: bool = False,
    device: "DeviceStage | None" = None,
) -> L1Tables:
    """Unify `num_tasks` tasks over every tensor in `specs`, chunk by chunk.

    read(name, lo, hi, slot) -> ChunkInputs of the chunk [lo, hi) of tensor `name`.
    emit(name, lo, hi, r)     receives each chunk's result, in order; r's rows are stored tasks, then new.
    progress(n)               is told how many elements each chunk covered.
    pipelined=True reads the next chunk on a thread while this one is computed and the one before
    is emitted on another (fusion.pipeline): `slot` (0 or 1) then alternates, and the arrays read
    into a slot are not asked for again before the chunk read into them has been computed.
    device (fusion.device.DeviceStage) runs the kernel on a torch device: chunks are copied up on
    the reader thread and results come back to the host for `emit`.
    """
    check_aligned(specs, chunk)
    delta_l1 = np.zeros((num_tasks, len(specs)), dtype=np.float64)  # (T, K)
    masked_l1 = np.zeros_like(delta_l1)
    chunks = [(k, spec, lo, hi) for k, spec in enumerate(specs) for lo, hi in chunk_ranges(spec.numel, chunk)]

    def read_chunk(item, slot: int) -> ChunkInputs:
        _, spec, lo, hi = item
        inputs = read(spec.name, lo, hi, slot)
        return inputs if device is None else device.upload(inputs)

    def compute(item, inputs: ChunkInputs):
        _, spec, _, _ = item
        return _compute(kernel, spec, inputs) if device is None else device.compute(inputs, spec.unified_dtype)

    def finish(item, result) -> None:
        k, spec, lo, hi = item
        result = result if device is None else result.wait()
        assert result.delta_l1.shape == (num_tasks,), "task count of the pass changed mid-way"
        delta_l1[:, k] += to_host(result.delta_l1)
        masked_l1[:, k] += to_host(result.masked_l1)
        emit(spec.name, lo, hi, result)  # the sink checks its inputs first: it names their files
        _check_representable(spec, result.unified)
        if progress is not None:
            progress(hi - lo)

    run_stages(chunks, read_chunk, compute, finish, threaded=pipelined)
    return L1Tables(delta_l1, masked_l1)
