"""Hypothesis strategies for ConDU tests, in one place, with keyword-only knobs.

They shrink toward few tasks, short tensors and small integers, so a failure prints a case a
person can read. Values are drawn from a small integer grid times a scale, which makes exact
zeros and exact sign ties common (the cases the rules are most particular about). With the
default power-of-two scale, float32 sums of a few such values are exact, so results do not
depend on the order in which tasks are summed.
"""

from __future__ import annotations

import hypothesis.strategies as st
import torch

from ..rescale import RESCALER_MODES

__all__ = [
    "deltas",
    "delta_sequences",
    "state_dicts",
    "continual_schedules",
    "rescaler_modes",
    "chunk_sizes",
    "FLOAT_DTYPES",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Shapes a drawn tensor may take besides 1-D ones: a few 2-D, some not a multiple of 8.
_MATRIX_SHAPES = [(2, 3), (3, 5), (4, 4)]


def _draw(draw, value):
    """A knob is either a fixed value or a strategy to draw it from."""
    return draw(value) if isinstance(value, st.SearchStrategy) else value


@st.composite
def deltas(
    draw,
    *,
    num_tasks: st.SearchStrategy[int] | int = st.integers(1, 4),
    length: st.SearchStrategy[int] | int = st.integers(1, 40),
    dtype: torch.dtype = torch.float32,
    zero_fraction: float = 0.3,
    scale: float = 2.0**-6,
    disjoint: bool = False,
) -> torch.Tensor:
    """Stacked deltas `(T, n)`; entries are small integers times `scale`, often exactly 0.

    `disjoint=True` keeps one task's entry per position (the others are 0), so no two tasks
    ever share a position.
    """
    t, n = _draw(draw, num_tasks), _draw(draw, length)
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(-8, 9, (t, n), generator=gen).float()  # (T, n)
    zeros = torch.rand((t, n), generator=gen) < zero_fraction  # (T, n)
    if disjoint:
        owner = torch.randint(0, t, (n,), generator=gen)  # (n,)
        zeros |= torch.arange(t)[:, None] != owner[None, :]
    values = torch.where(zeros, 0.0, values) * scale
    return values.to(dtype)


@st.composite
def state_dicts(
    draw,
    *,
    num_tasks: st.SearchStrategy[int] | int = st.integers(1, 4),
    num_tensors: st.SearchStrategy[int] | int = st.integers(1, 3),
    max_numel: int = 30,
    dtype: torch.dtype = torch.float32,
    zero_fraction: float = 0.3,
    scale: float = 2.0**-6,
    disjoint: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """T deltas as state dicts over the same named tensors of random shapes."""
    t, k = _draw(draw, num_tasks), _draw(draw, num_tensors)
    choices = [(n,) for n in range(1, max_numel + 1)] + [s for s in _MATRIX_SHAPES if torch.Size(s).numel() <= max_numel]
    shapes = {f"t{j}.weight": draw(st.sampled_from(choices)) for j in range(k)}
    tables = {
        name: draw(deltas(num_tasks=t, length=torch.Size(s).numel(), dtype=dtype, zero_fraction=zero_fraction,
                          scale=scale, disjoint=disjoint))
        for name, s in shapes.items()
    }
    return [{name: tables[name][i].reshape(shapes[name]) for name in shapes} for i in range(t)]


@st.composite
def delta_sequences(
    draw,
    *,
    steps: st.SearchStrategy[int] | int = st.integers(2, 6),
    num_tensors: st.SearchStrategy[int] | int = st.integers(1, 3),
    max_numel: int = 30,
    dtype: torch.dtype = torch.float32,
    zero_fraction: float = 0.3,
    scale: float = 2.0**-6,
) -> list[dict[str, torch.Tensor]]:
    """A sequence of task deltas for continual runs: unify the first, add the rest one by one."""
    return draw(state_dicts(num_tasks=_draw(draw, steps), num_tensors=num_tensors, max_numel=max_numel,
                            dtype=dtype, zero_fraction=zero_fraction, scale=scale))


@st.composite
def continual_schedules(
    draw,
    *,
    steps: st.SearchStrategy[int] | int = st.integers(2, 6),
    max_reunify: int = 2,
    num_tensors: st.SearchStrategy[int] | int = st.integers(1, 3),
    max_numel: int = 30,
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor] | None]]:
    """A continual run: `(first, later)`; unify the deltas in `first`, then apply `later` in order.

    Each item of `later` is one new task's delta (`add(state, delta)`) or None, a re-unification
    with no new task (`add(state, ())`). At most `max_reunify` Nones are inserted.
    """
    sequence = draw(delta_sequences(steps=steps, num_tensors=num_tensors, max_numel=max_numel))
    num_first = draw(st.integers(1, len(sequence) - 1)) if len(sequence) > 1 else 1
    later: list[dict[str, torch.Tensor] | None] = list(sequence[num_first:])
    for _ in range(draw(st.integers(0, max_reunify))):
        later.insert(draw(st.integers(0, len(later))), None)
    return sequence[:num_first], later


def rescaler_modes() -> st.SearchStrategy[str]:
    """One of the rescaler modes (`model`, `tensor-mean`, `tensor`)."""
    return st.sampled_from(RESCALER_MODES)


def chunk_sizes(*, max_chunk: int = 64) -> st.SearchStrategy[int]:
    """Chunk sizes the engine accepts: positive multiples of 8, shrinking toward 8."""
    return st.integers(1, max(1, max_chunk // 8)).map(lambda m: 8 * m)
