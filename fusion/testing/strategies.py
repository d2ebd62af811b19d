"""Hypothesis strategies for ConDU tests, in one place, with keyword-only knobs.

They shrink toward few tasks, short tensors and small integers, so a failure prints a case a
person can read. Values are drawn from a small integer grid times a scale, which makes exact
zeros and exact sign ties common (the cases the rules are most particular about). With the
default power-of-two scale, float32 sums of a few such values are exact, so results do not
depend on the order in which tasks are summed.

Arrays are numpy arrays. Their dtype is a `fusion.dtypes.DType` (or its name); bfloat16 comes
as an `ml_dtypes.bfloat16` array, the way a user hands one to the library (ml_dtypes is a test
dependency; the library itself never imports it).
"""

from __future__ import annotations

import numpy as np

try:
    import hypothesis.strategies as st
except ImportError as error:
    raise ImportError(f"{__name__} needs hypothesis ({error}): pip install 'condu[test]'") from error

from ..constants import RESCALER_MODES
from ..dtypes import BF16, F16, F32, DType, float_dtype, from_float32

__all__ = [
    "deltas",
    "delta_sequences",
    "state_dicts",
    "continual_schedules",
    "rescaler_modes",
    "chunk_sizes",
    "lora_factors",
    "with_private_tensors",
    "checkpoint_sets",
    "FLOAT_DTYPES",
    "as_dtype",
]

FLOAT_DTYPES = (F32, F16, BF16)

# Shapes a drawn tensor may take besides 1-D ones: a few 2-D, some not a multiple of 8.
_MATRIX_SHAPES = [(2, 3), (3, 5), (4, 4)]


def _draw(draw, value):
    """A knob is either a fixed value or a strategy to draw it from."""
    return draw(value) if isinstance(value, st.SearchStrategy) else value


def as_dtype(values: np.ndarray, dtype: DType | str = F32) -> np.ndarray:
    """float32 values as a numpy array of `dtype`, rounded to nearest even; bfloat16 as ml_dtypes'."""
    dtype = float_dtype(dtype)
    stored = from_float32(np.asarray(values, dtype=np.float32), dtype)
    if dtype is BF16:
        import ml_dtypes  # a test dependency, for the bfloat16 arrays users pass

        return stored.view(ml_dtypes.bfloat16)
    return stored


@st.composite
def deltas(
    draw,
    *,
    num_tasks: st.SearchStrategy[int] | int = st.integers(1, 4),
    length: st.SearchStrategy[int] | int = st.integers(1, 40),
    dtype: DType | str = F32,
    zero_fraction: float = 0.3,
    scale: float = 2.0**-6,
    disjoint: bool = False,
) -> np.ndarray:
    """Stacked deltas `(T, n)`; entries are small integers times `scale`, often exactly 0.

    `disjoint=True` keeps one task's entry per position (the others are 0), so no two tasks
    ever share a position.
    """
    t, n = _draw(draw, num_tasks), _draw(draw, length)
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    values = rng.integers(-8, 9, (t, n)).astype(np.float32)  # (T, n)
    zeros = rng.random((t, n)) < zero_fraction  # (T, n)
    if disjoint:
        owner = rng.integers(0, t, n)  # (n,)
        zeros |= np.arange(t)[:, None] != owner[None, :]
    values = np.where(zeros, np.float32(0.0), values) * np.float32(scale)  # (T, n) float32
    return as_dtype(values, dtype)


@st.composite
def state_dicts(
    draw,
    *,
    num_tasks: st.SearchStrategy[int] | int = st.integers(1, 4),
    num_tensors: st.SearchStrategy[int] | int = st.integers(1, 3),
    max_numel: int = 30,
    dtype: DType | str = F32,
    zero_fraction: float = 0.3,
    scale: float = 2.0**-6,
    disjoint: bool = False,
) -> list[dict[str, np.ndarray]]:
    """T deltas as state dicts over the same named tensors of random shapes."""
    t, k = _draw(draw, num_tasks), _draw(draw, num_tensors)
    choices = [(n,) for n in range(1, max_numel + 1)] + [s for s in _MATRIX_SHAPES if int(np.prod(s)) <= max_numel]
    shapes = {f"t{j}.weight": draw(st.sampled_from(choices)) for j in range(k)}
    tables = {
        name: draw(deltas(num_tasks=t, length=int(np.prod(s)), dtype=dtype, zero_fraction=zero_fraction,
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
    dtype: DType | str = F32,
    zero_fraction: float = 0.3,
    scale: float = 2.0**-6,
) -> list[dict[str, np.ndarray]]:
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
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray] | None]]:
    """A continual run: `(first, later)`; unify the deltas in `first`, then apply `later` in order.

    Each item of `later` is one new task's delta (`add(state, delta)`) or None, a re-unification
    with no new task (`add(state, ())`). At most `max_reunify` Nones are inserted.
    """
    sequence = draw(delta_sequences(steps=steps, num_tensors=num_tensors, max_numel=max_numel))
    num_first = draw(st.integers(1, len(sequence) - 1)) if len(sequence) > 1 else 1
    later: list[dict[str, np.ndarray] | None] = list(sequence[num_first:])
    for _ in range(draw(st.integers(0, max_reunify))):
        later.insert(draw(st.integers(0, len(later))), None)
    return sequence[:num_first], later


# Names and shapes of tensors a fine-tune may add (a new head, a new bias): drawn per task, so two
# tasks may share one in one shape, in two shapes, or not at all.
_EXTRA_NAMES = ("head.weight", "extra.bias")
_EXTRA_SHAPES = [(2,), (3,), (2, 3)]


def _grid(rng: np.random.Generator, shape: tuple, scale: float) -> np.ndarray:
    return (rng.integers(-8, 9, shape) * scale).astype(np.float32)  # small integers times scale


@st.composite
def with_private_tensors(
    draw,
    deltas_list: list[dict[str, np.ndarray]],
    *,
    max_extra: int = 2,
    dtype: DType | str = F32,
    scale: float = 2.0**-6,
) -> list[dict[str, np.ndarray]]:
    """The deltas, each with up to `max_extra` tensors of its own (names of _EXTRA_NAMES, shapes drawn
    per task): what the in-memory API keeps private unless every delta has it in one shape."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    out = []
    for delta in deltas_list:
        names = draw(st.lists(st.sampled_from(_EXTRA_NAMES), max_size=max_extra, unique=True))
        extra = {name: as_dtype(_grid(rng, draw(st.sampled_from(_EXTRA_SHAPES)), scale), dtype) for name in names}
        out.append({**delta, **extra})
    return out


@st.composite
def checkpoint_sets(
    draw,
    *,
    num_tasks: st.SearchStrategy[int] | int = st.integers(1, 4),
    num_tensors: st.SearchStrategy[int] | int = st.integers(1, 3),
    max_numel: int = 30,
    private: bool = True,
    dtype: DType | str = F32,
    zero_fraction: float = 0.3,
    scale: float = 2.0**-6,
) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """`(base, finetunes)`: a base state dict (float tensors and an int64 `position_ids` buffer) and
    T fine-tunes of it, every value a small integer times `scale`, so deltas are exact.

    With `private`, a fine-tune may also carry what a store keeps private to it: tensors the base
    lacks (drawn per task, so some share a name and a shape) and, when the base has two tensors
    or more, its first tensor in another shape (then counted as unchanged there).
    """
    t = _draw(draw, num_tasks)
    shapes = draw(state_dicts(num_tasks=1, num_tensors=num_tensors, max_numel=max_numel))[0]
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    base = {name: as_dtype(_grid(rng, a.shape, scale), dtype) for name, a in shapes.items()}
    tables = {name: draw(deltas(num_tasks=t, length=a.size, zero_fraction=zero_fraction, scale=scale))
              for name, a in base.items()}  # (T, n) float32
    finetunes = [{name: as_dtype(a.astype(np.float32) + tables[name][i].reshape(a.shape), dtype)
                  for name, a in base.items()} for i in range(t)]
    base["position_ids"] = np.arange(4, dtype=np.int64)
    for ft in finetunes:
        ft["position_ids"] = base["position_ids"].copy()
    if not private:
        return base, finetunes
    finetunes = draw(with_private_tensors(finetunes, dtype=dtype, scale=scale))
    first = next(iter(shapes))
    for ft in finetunes:
        if len(shapes) > 1 and draw(st.booleans()):
            ft[first] = as_dtype(_grid(rng, (base[first].size + 1,), scale), dtype)  # another shape
    return base, finetunes


def rescaler_modes() -> st.SearchStrategy[str]:
    """One of the rescaler modes (`model`, `tensor-mean`, `tensor`)."""
    return st.sampled_from(RESCALER_MODES)


def chunk_sizes(*, max_chunk: int = 64) -> st.SearchStrategy[int]:
    """Chunk sizes the engine accepts: positive multiples of 8, shrinking toward 8."""
    return st.integers(1, max(1, max_chunk // 8)).map(lambda m: 8 * m)


@st.composite
def lora_factors(
    draw,
    *,
    rank: st.SearchStrategy[int] | int = st.integers(1, 8),
    rows: st.SearchStrategy[int] | int = st.integers(1, 12),
    cols: st.SearchStrategy[int] | int = st.integers(1, 12),
    transpose: st.SearchStrategy[bool] | bool = st.booleans(),
    scale: float = 2.0**-3,
) -> tuple[np.ndarray, np.ndarray, float, bool]:
    """LoRA factors `(A (r, in), B (out, r), scaling, transpose)` whose delta is `(rows, cols)`.

    Entries are small integers times `scale` and the scaling a power of two, so every float32
    product and sum of a delta entry is exact, whatever order a matmul adds them in.
    """
    r, n_rows, n_cols, flip = _draw(draw, rank), _draw(draw, rows), _draw(draw, cols), _draw(draw, transpose)
    n_out, n_in = (n_cols, n_rows) if flip else (n_rows, n_cols)  # a transposed weight is stored (in, out)
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    a = (rng.integers(-8, 9, (r, n_in)) * scale).astype(np.float32)  # (r, in)
    b = (rng.integers(-8, 9, (n_out, r)) * scale).astype(np.float32)  # (out, r)
    scaling = draw(st.sampled_from([0.25, 0.5, 1.0, 2.0]))
    return a, b, scaling, flip
