"""Hypothesis strategies for ConDU tests, in one place, with keyword-only knobs.

They shrink toward few tasks, short tensors and small integers, so a failure prints a case a
person can read. Values are drawn from a small integer grid times a scale, which makes exact
zeros and exact sign ties common (the cases the rules are most particular about).
"""

from __future__ import annotations

import hypothesis.strategies as st
import torch

__all__ = ["deltas", "delta_sequences", "state_dicts", "FLOAT_DTYPES"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@st.composite
def deltas(
    draw,
    *,
    num_tasks: st.SearchStrategy[int] | int = st.integers(1, 4),
    length: st.SearchStrategy[int] | int = st.integers(1, 40),
    dtype: torch.dtype = torch.float32,
    zero_fraction: float = 0.3,
    scale: float = 2.0**-6,
) -> torch.Tensor:
    """Stacked deltas `(T, n)`; entries are small integers times `scale`, often exactly 0."""
    t = num_tasks if isinstance(num_tasks, int) else draw(num_tasks)
    n = length if isinstance(length, int) else draw(length)
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(-8, 9, (t, n), generator=gen).float()  # (T, n)
    zeros = torch.rand((t, n), generator=gen) < zero_fraction
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
) -> list[dict[str, torch.Tensor]]:
    """T deltas as state dicts over the same named tensors of random shapes."""
    t = num_tasks if isinstance(num_tasks, int) else draw(num_tasks)
    k = num_tensors if isinstance(num_tensors, int) else draw(num_tensors)
    shapes = {f"t{j}.weight": draw(st.sampled_from([(n,) for n in range(1, max_numel + 1)] + [(2, 3), (3, 5), (4, 4)]))
              for j in range(k)}
    tables = {name: draw(deltas(num_tasks=t, length=int(torch.Size(s).numel()), dtype=dtype)) for name, s in shapes.items()}
    return [{name: tables[name][i].reshape(shapes[name]) for name in shapes} for i in range(t)]


@st.composite
def delta_sequences(
    draw,
    *,
    steps: st.SearchStrategy[int] | int = st.integers(2, 6),
    num_tensors: st.SearchStrategy[int] | int = st.integers(1, 3),
    max_numel: int = 30,
) -> list[dict[str, torch.Tensor]]:
    """A sequence of task deltas for continual runs: unify the first, add the rest one by one."""
    t = steps if isinstance(steps, int) else draw(steps)
    return draw(state_dicts(num_tasks=t, num_tensors=num_tensors, max_numel=max_numel))
