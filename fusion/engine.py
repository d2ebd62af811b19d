"""One streaming unify pass over many tensors, chunk by chunk, for any source and sink.

The in-memory API (`fusion.fuse`) and the on-disk store both run this loop; they differ only
in where chunks come from and where results go. Memory is bounded by one chunk of every task.
The rescalers need the L1 sums of the whole pass, so they are finished after it
(`fusion.rescale.compute_rescalers`) from the `(T, K)` tables this returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Sequence

import torch

from .reference import ChunkResult

__all__ = ["TensorSpec", "StoredChunk", "L1Tables", "chunk_ranges", "fuse_pass", "DEFAULT_CHUNK"]

# Elements per chunk and task: 1M fp32 elements is 4 MiB a task, 64 MiB of input at T = 16.
DEFAULT_CHUNK = 1 << 20


@dataclass(frozen=True)
class TensorSpec:
    """A fused tensor: its name, element count and the dtype its unified delta is stored in."""

    name: str
    numel: int
    unified_dtype: torch.dtype = torch.float32


class StoredChunk(NamedTuple):
    """The stored state of one chunk: unified delta, packed masks and rescalers of the old tasks."""

    unified: torch.Tensor  # (n,)
    packed_masks: torch.Tensor  # (T_old, ceil(n/8)) uint8
    rescalers: torch.Tensor  # (T_old,) float64


class L1Tables(NamedTuple):
    delta_l1: torch.Tensor  # (T, K) float64
    masked_l1: torch.Tensor  # (T, K) float64


def chunk_ranges(numel: int, chunk: int) -> Iterator[tuple[int, int]]:
    """[lo, hi) ranges covering `numel`; every lo is a multiple of 8 so packed masks slice by bytes."""
    if chunk <= 0 or chunk % 8:
        raise ValueError(f"chunk size must be a positive multiple of 8, got {chunk}")
    for lo in range(0, numel, chunk):
        yield lo, min(lo + chunk, numel)


def _check_representable(spec: TensorSpec, unified: torch.Tensor) -> None:
    """A unified delta beyond its storage dtype's range would rebuild as inf/NaN: refuse it.

    Finite float32 inputs give a finite float32 u (it is one of them), so only narrower storage
    dtypes can overflow; the sinks check their inputs for NaN and Inf themselves.
    """
    if spec.unified_dtype.itemsize < 4 and not torch.isfinite(unified).all():
        raise ValueError(f"tensor {spec.name!r}: its unified delta overflows {str(spec.unified_dtype).removeprefix('torch.')}; "
                         "store it in float32 (dtype=torch.float32, or --dtype float32)")


def fuse_pass(
    specs: Sequence[TensorSpec],
    *,
    num_tasks: int,
    new_deltas: Callable[[str, int, int], torch.Tensor],
    emit: Callable[[str, int, int, ChunkResult], None],
    stored: Callable[[str, int, int], StoredChunk] | None = None,
    kernel,
    chunk: int = DEFAULT_CHUNK,
    progress: Callable[[int], None] | None = None,
) -> L1Tables:
    """Unify `num_tasks` tasks over every tensor in `specs`.

    new_deltas(name, lo, hi) -> (T_new, hi-lo) deltas of the tasks given as full fine-tunes.
    stored(name, lo, hi)     -> StoredChunk of the tasks to rebuild first (None: one-shot unify).
    emit(name, lo, hi, r)    receives each chunk's result; r's rows are stored tasks, then new.
    progress(n)              is told how many elements each chunk covered.
    """
    delta_l1 = torch.zeros((num_tasks, len(specs)), dtype=torch.float64)
    masked_l1 = torch.zeros_like(delta_l1)
    for k, spec in enumerate(specs):
        for lo, hi in chunk_ranges(spec.numel, chunk):
            fresh = new_deltas(spec.name, lo, hi)  # (T_new, n)
            if stored is None:
                result = kernel.elect(fresh, unified_dtype=spec.unified_dtype)
            else:
                old = stored(spec.name, lo, hi)
                result = kernel.continual(old.unified, old.packed_masks, old.rescalers, fresh,
                                          unified_dtype=spec.unified_dtype)
            assert result.delta_l1.shape == (num_tasks,), "task count of the pass changed mid-way"
            delta_l1[:, k] += result.delta_l1
            masked_l1[:, k] += result.masked_l1
            emit(spec.name, lo, hi, result)  # the sink checks its inputs first: it names their files
            _check_representable(spec, result.unified)
            if progress is not None:
                progress(hi - lo)
    return L1Tables(delta_l1, masked_l1)
