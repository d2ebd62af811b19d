"""Properties of the ConDU iteration (the paper's appendix F) and its edge cases, with Hypothesis.

All runs use the reference kernel: these tests are about the rules, not about a fast path.
"""

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from fusion import RESCALER_MODES, add, unify
from fusion.dtypes import as_float32
from fusion.reference import unpack_bits
from fusion.testing.strategies import (
    FLOAT_DTYPES,
    as_dtype,
    continual_schedules,
    rescaler_modes,
    state_dicts,
)

KERNEL = "reference"

# ----------------------------------------------------------------------------------------
# helpers


def _run(first, later, mode):
    """Yield the state after unify(first) and after each later step (a new delta or a re-unify)."""
    state = unify(first, rescaler=mode, kernel=KERNEL)
    yield state
    for delta in later:
        state = add(state, () if delta is None else delta, kernel=KERNEL)
        yield state


def _originals(first, later):
    """Task deltas in the order the state holds them."""
    return list(first) + [d for d in later if d is not None]


def _l1(tensor) -> float:
    return float(np.abs(as_float32(tensor).astype(np.float64)).sum())


def _numel(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _flat(delta) -> np.ndarray:
    return np.concatenate([as_float32(t).reshape(-1) for t in delta.values()])  # (N,)


def _rebuilt(state) -> np.ndarray:
    return np.stack([_flat(state.decouple(i + 1)) for i in range(state.num_tasks)])  # (T, N)


def _position_weights(state) -> np.ndarray:
    """Per-position weights of the norm a mode preserves: 1, or 1/n_k for `tensor-mean`."""
    sizes = [_numel(s) for s in state.shapes.values()]
    if state.rescaler == "tensor-mean":
        return np.concatenate([np.full(n, 1.0 / n) for n in sizes])
    return np.ones(sum(sizes))


def _groups(state) -> list[slice]:
    """Position ranges that share one rescaler: the whole model, or each tensor in `tensor` mode."""
    sizes = [_numel(s) for s in state.shapes.values()]
    if state.rescaler != "tensor":
        return [slice(0, sum(sizes))]
    ends = np.cumsum(sizes).tolist()
    return [slice(end - size, end) for end, size in zip(ends, sizes)]


def _masks(state) -> np.ndarray:
    return np.concatenate([unpack_bits(state.masks[name], state.unified[name].size) for name in state.names], axis=1)  # (T, N)


def _unified(state) -> np.ndarray:
    return np.concatenate([state.unified[name] for name in state.names])  # (N,)


# ----------------------------------------------------------------------------------------
# Lemma F.1: sign preservation


@given(continual_schedules(), rescaler_modes())
def test_lemma_f1_reconstructions_never_change_sign(schedule, mode):
    first, later = schedule
    originals = [_flat(d) for d in _originals(first, later)]
    previous: list[np.ndarray] = []
    for state in _run(first, later, mode):
        rebuilt = _rebuilt(state)  # (T, N)
        for i in range(state.num_tasks):
            # against the task's own fine-tune: same sign or 0 ...
            assert (rebuilt[i] * originals[i] >= 0).all(), f"task {i} flipped a sign"
            assert (rebuilt[i][originals[i] == 0] == 0).all(), f"task {i} grew an entry"
            # ... and against the previous iteration: a zero stays zero.
            if i < len(previous):
                assert (rebuilt[i] * previous[i] >= 0).all(), f"task {i} flipped a sign"
                assert (rebuilt[i][previous[i] == 0] == 0).all(), f"task {i}: a zero came back"
        previous = list(rebuilt)


# ----------------------------------------------------------------------------------------
# Lemma F.2: L1 preservation
#
# lambda_i * ||M_i * u||_1 = ||input_i||_1 holds whenever ||M_i * u||_1 > 0. It fails, honestly,
# when a task (or, in `tensor` mode, a tensor of it) has no entry that agrees with the elected
# sign: every nonzero entry is outvoted or ties to -1 against it, its masked L1 is 0, its rescaler
# is 0 and it is rebuilt as zeros; from then on its input is zero and it stays zero (Lemma F.1).
# The tests check that this is the only way to lose L1 and that it happens exactly then.
# Tolerance: each decouple-unify round rounds lambda to float32 and each product once, at most
# 2 * 2**-24 relative to the L1 norm; a task goes through at most 8 rounds here (< 1e-6).

L1_RTOL = 1e-6


def _check_l1(norm_now: float, masked: float, rescaler: float, alive: bool, original: float, where: str) -> bool:
    """Assert one L1 fact; return whether the task (or tensor) is still alive."""
    if masked == 0:
        assert rescaler == 0 and norm_now == 0, f"{where}: outvoted, must be rebuilt as zeros"
        return False
    assert alive, f"{where}: came back after being outvoted"
    assert norm_now == pytest.approx(original, rel=L1_RTOL), where
    return True


@given(continual_schedules())
def test_lemma_f2_model_rescalers_keep_each_task_l1(schedule):
    first, later = schedule
    originals = [_l1(_flat(d)) for d in _originals(first, later)]
    alive: list[bool] = []
    for step, state in enumerate(_run(first, later, "model")):
        alive += [True] * (state.num_tasks - len(alive))
        for i in range(state.num_tasks):
            alive[i] = _check_l1(_l1(_flat(state.decouple(i + 1))), float(state.masked_l1[i].sum()),
                                 float(state.rescalers[i, 0]), alive[i], originals[i], f"step {step} task {i}")
    event(f"tasks outvoted entirely: {alive.count(False)}")


@given(continual_schedules())
def test_lemma_f2_tensor_rescalers_keep_each_tensor_l1(schedule):
    first, later = schedule
    originals = [{n: _l1(t) for n, t in d.items()} for d in _originals(first, later)]
    alive: list[dict[str, bool]] = []
    for step, state in enumerate(_run(first, later, "tensor")):
        alive += [dict.fromkeys(state.names, True) for _ in range(state.num_tasks - len(alive))]
        for i in range(state.num_tasks):
            rebuilt = state.decouple(i + 1)
            for k, name in enumerate(state.names):
                alive[i][name] = _check_l1(_l1(rebuilt[name]), float(state.masked_l1[i, k]), float(state.rescalers[i, k]),
                                           alive[i][name], originals[i][name], f"step {step} task {i} {name}")


@given(continual_schedules())
def test_tensor_mean_rescalers_keep_the_sum_of_mean_abs(schedule):
    """`tensor-mean` keeps sum_k mean|delta_i[k]| (the quantity its rescaler is a ratio of), not the L1."""
    first, later = schedule
    originals = [sum(_l1(t) / t.size for t in d.values()) for d in _originals(first, later)]
    alive: list[bool] = []
    for step, state in enumerate(_run(first, later, "tensor-mean")):
        alive += [True] * (state.num_tasks - len(alive))
        numels = np.array([_numel(s) for s in state.shapes.values()], dtype=np.float64)
        for i in range(state.num_tasks):
            mean_abs = sum(_l1(t) / t.size for t in state.decouple(i + 1).values())
            alive[i] = _check_l1(mean_abs, float((state.masked_l1[i] / numels).sum()), float(state.rescalers[i, 0]),
                                 alive[i], originals[i], f"step {step} task {i}")


# ----------------------------------------------------------------------------------------
# Theorem F.3: convergence of repeated re-unification with no new task (docs/convergence.md)
#
# S_0 = unify(deltas), S_{k+1} = add(S_k, ()). What holds, and is proved in the doc:
#  (a) masks never change: M(S_k) = M(S_0) for every k (as long as no rebuilt value underflows);
#  (b) from S_1 on every rescaler is <= 1, and in each rescaler group (the model, or a tensor in
#      `tensor` mode) the largest is exactly 1.0: that task's reconstruction is u itself on its
#      mask, and it never changes again, bit for bit;
#  (c) |u| never grows from S_1 on and keeps its sign, so the iteration converges;
#  (d) S_k (k >= 1) is a fixed point, bit for bit in u and masks, if and only if every nonzero
#      position of u is masked by a task whose rescaler there rounds to 1.0 in float32;
#  (e) it is NOT a fixed point after a bounded number of steps in general: with two tasks the
#      free mass B_k of the non-dominant task obeys B_{k+1} = L B_k / (A + B_k), geometric with
#      ratio min(A, L) / max(A, L), harmonic when A = L.

REUNIFY_STEPS = 4


def _reunified(deltas, mode, steps=REUNIFY_STEPS):
    states = [unify(deltas, rescaler=mode, kernel=KERNEL)]
    for _ in range(steps):
        states.append(add(states[-1], (), kernel=KERNEL))
    return states


def _dominant_rows(state, group_index: int) -> np.ndarray:
    """Tasks whose rescaler in the group rounds to exactly 1.0 in float32."""
    column = state.rescalers[:, group_index if state.rescaler == "tensor" else 0]
    return column.astype(np.float32) == 1.0  # (T,) bool


@given(state_dicts(num_tasks=st.integers(1, 5)), rescaler_modes())
def test_theorem_f3_masks_fixed_rescalers_capped_u_shrinks(deltas, mode):
    states = _reunified(deltas, mode)
    masks0 = _masks(states[0])
    for k in range(1, len(states)):
        state, before = states[k], states[k - 1]
        assert np.array_equal(_masks(state), masks0), f"S_{k}: masks changed"  # (a)
        assert ((state.rescalers >= 0) & (state.rescalers <= 1)).all(), f"S_{k}: rescaler above 1"  # (b)
        masks = _masks(state)
        for g, positions in enumerate(_groups(state)):
            if masks[:, positions].any():
                column = state.rescalers[:, g if mode == "tensor" else 0]
                assert float(column.max()) == 1.0, f"S_{k}: the largest rescaler of group {g} is not exactly 1"
        u, u_before = _unified(state), _unified(before)
        if k >= 2:
            assert (np.abs(u) <= np.abs(u_before)).all(), f"S_{k}: |u| grew"  # (c)
        assert (u * u_before >= 0).all(), f"S_{k}: u changed sign"


@given(state_dicts(num_tasks=st.integers(1, 5)), rescaler_modes())
def test_theorem_f3_dominant_tasks_are_frozen_from_the_first_reunify(deltas, mode):
    states = _reunified(deltas, mode)
    first = _rebuilt(states[1])  # (T, N)
    for g, positions in enumerate(_groups(states[1])):
        for i in np.flatnonzero(_dominant_rows(states[1], g)).tolist():
            for k in range(2, len(states)):
                assert np.array_equal(_rebuilt(states[k])[i, positions], first[i, positions]), f"task {i} moved at S_{k}"


def _fixed_point_criterion(state) -> bool:
    """Every nonzero position of u is masked by a task whose rescaler there rounds to 1.0."""
    masks, covered = _masks(state), np.zeros(_unified(state).size, dtype=bool)
    for g, positions in enumerate(_groups(state)):
        covered[positions] = masks[_dominant_rows(state, g)][:, positions].any(axis=0)
    return bool(covered[_unified(state) != 0].all())


@given(state_dicts(num_tasks=st.integers(1, 4), max_numel=12), rescaler_modes())
def test_theorem_f3_fixed_point_if_and_only_if_covered_by_rescaler_one(deltas, mode):
    states = _reunified(deltas, mode, steps=3)
    for k in (1, 2):
        fixed = np.array_equal(_unified(states[k + 1]), _unified(states[k]))
        assert fixed == _fixed_point_criterion(states[k]), f"S_{k}"
        event(f"S_{k} fixed: {fixed}")
        if fixed:
            assert np.array_equal(_masks(states[k + 1]), _masks(states[k]))
            np.testing.assert_allclose(states[k + 1].rescalers, states[k].rescalers, rtol=1e-6, atol=0)


@given(state_dicts(num_tasks=st.integers(1, 4), disjoint=True), rescaler_modes())
def test_theorem_f3_disjoint_tasks_are_fixed_after_one_reunify(deltas, mode):
    """No two tasks share a position: every rescaler is 1 from S_1 on and S_2 == S_1 bit for bit."""
    states = _reunified(deltas, mode, steps=2)
    masks = _masks(states[1])
    for g, positions in enumerate(_groups(states[1])):
        has_mask = masks[:, positions].any(axis=1)
        column = states[1].rescalers[:, g if mode == "tensor" else 0]
        assert (column[has_mask] == 1.0).all()
    assert np.array_equal(_unified(states[2]), _unified(states[1]))
    assert np.array_equal(states[2].rescalers, states[1].rescalers)
    assert np.array_equal(_rebuilt(states[2]), _rebuilt(states[1]))


@given(state_dicts(num_tasks=2, num_tensors=st.integers(1, 2), max_numel=20), rescaler_modes())
def test_theorem_f3_two_tasks_follow_the_scalar_recurrence(deltas, mode):
    """(e): after S_1, in each rescaler group, with `a` the task whose rescaler is 1 and `b` the other,
    A = ||u on M_a & M_b|| (frozen), B_k = ||u on M_b minus M_a|| and L = ||rebuilt b|| (kept by F.2),
    in the norm the mode keeps: B_{k+1} = L * B_k / (A + B_k)."""
    states = _reunified(deltas, mode, steps=5)
    weights = _position_weights(states[1])
    masks = _masks(states[1])
    moving = 0
    for g, positions in enumerate(_groups(states[1])):
        dominant = _dominant_rows(states[1], g)
        if dominant.all() or not dominant.any():
            continue  # both tasks tight (fixed already), or no mask in this group
        a, b = int(np.flatnonzero(dominant)[0]), int(np.flatnonzero(~dominant)[0])
        shared = (masks[a] & masks[b])[positions]
        own = (masks[b] & ~masks[a])[positions]
        w = weights[positions]

        def norm(values, where):
            return float((np.abs(values[positions].astype(np.float64)) * w)[where].sum())

        big_a = norm(_unified(states[1]), shared)
        big_l = norm(_rebuilt(states[1])[b], np.ones_like(own))
        for k in range(1, len(states) - 1):
            b_now, b_next = norm(_unified(states[k]), own), norm(_unified(states[k + 1]), own)
            expected = big_l * b_now / (big_a + b_now) if big_a + b_now > 0 else 0.0  # b has no mask here
            assert b_next == pytest.approx(expected, rel=1e-5, abs=1e-30), f"S_{k + 1}"
            moving += b_next != b_now
    event(f"steps where B moved: {moving > 0}")


def test_theorem_f3_no_finite_fixed_point_in_general():
    """delta_a = [10, 0], delta_b = [1, 1]: A = 10 > L = 2, so b's own entry decays like (1/5)^k forever.

    The exact sequence of u[1] is 1, 2/11, 1/28, 2/281, ...; b's rebuilt delta tends to [2, 0]:
    its mass moves onto the position it shares with the dominant task."""
    deltas = [{"w": np.array([10.0, 0.0], dtype=np.float32)}, {"w": np.array([1.0, 1.0], dtype=np.float32)}]
    states = _reunified(deltas, "model", steps=30)
    exact = Fraction(1)
    for k, state in enumerate(states):
        assert state.unified["w"][0] == 10.0 and state.rescalers[0, 0] == 1.0
        assert float(state.unified["w"][1]) == pytest.approx(float(exact), rel=1e-5), f"S_{k}"
        if k:
            assert state.unified["w"][1] < states[k - 1].unified["w"][1], f"S_{k} is a fixed point"
        exact = 2 * exact / (10 + exact)
    np.testing.assert_allclose(states[-1].decouple(2)["w"], [2.0, 0.0], rtol=1e-6, atol=1e-12)


def test_theorem_f3_geometric_approach_when_shared_mass_is_small():
    """delta_a = [2, 0], delta_b = [1, 10]: A = 2 < L = 11, so B_k -> L - A = 9 with ratio A/L = 2/11."""
    deltas = [{"w": np.array([2.0, 0.0], dtype=np.float32)}, {"w": np.array([1.0, 10.0], dtype=np.float32)}]
    states = _reunified(deltas, "model", steps=25)
    errors = [abs(float(s.unified["w"][1]) - 9.0) for s in states[1:]]
    for before, after in zip(errors[:5], errors[1:6]):
        assert after == pytest.approx(before * 2 / 11, rel=0.05)
    assert errors[-1] < 1e-6
    np.testing.assert_allclose(states[-1].decouple(2)["w"], [2.0, 9.0], rtol=1.3e-6, atol=1e-5)


# ----------------------------------------------------------------------------------------
# edge cases


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("mode", RESCALER_MODES)
@given(deltas=state_dicts(num_tasks=1, max_numel=40))
def test_single_task_rebuilds_exactly(deltas, mode, dtype):
    """T = 1: u is the delta itself (rounded to the store dtype, exact for inputs of that dtype)
    and the rescaler is exactly 1, so the task is rebuilt bit for bit, also after re-unifying."""
    delta = {name: as_dtype(t, dtype) for name, t in deltas[0].items()}
    state = unify([delta], rescaler=mode, kernel=KERNEL, dtypes=dict.fromkeys(delta, dtype))
    for current in (state, add(state, (), kernel=KERNEL)):
        rebuilt = current.decouple(1)
        for name, tensor in delta.items():
            assert rebuilt[name].dtype == np.float32
            assert np.array_equal(rebuilt[name], as_float32(tensor)), name
            assert np.array_equal(as_dtype(rebuilt[name], dtype).view(np.uint8), tensor.view(np.uint8)), name
        # Rescaler 1 exactly, or 0 where the task is all zero (per tensor in `tensor` mode).
        has_mask = current.masked_l1[0] > 0 if mode == "tensor" else np.full(len(delta), current.masked_l1[0].sum() > 0)
        assert np.array_equal(current.rescalers[0], np.where(has_mask, 1.0, 0.0))


@pytest.mark.parametrize("mode", RESCALER_MODES)
@given(shapes=state_dicts(num_tasks=st.integers(1, 4)))
def test_all_zero_deltas_rebuild_zeros_without_nan(shapes, mode):
    deltas = [{name: np.zeros_like(t) for name, t in d.items()} for d in shapes]
    for state in _reunified(deltas, mode, steps=1):
        assert not np.isnan(state.rescalers).any() and (state.rescalers == 0).all()
        assert (_unified(state) == 0).all() and not _masks(state).any()
        assert (_rebuilt(state) == 0).all()


@given(state_dicts(num_tasks=st.integers(1, 4)), rescaler_modes())
def test_an_all_zero_task_is_inert(deltas, mode):
    """Adding a zero task changes no sum and no mask: the others' state is as without it."""
    zero = {name: np.zeros_like(t) for name, t in deltas[0].items()}
    with_zero, without = unify(deltas + [zero], rescaler=mode, kernel=KERNEL), unify(deltas, rescaler=mode, kernel=KERNEL)
    assert np.array_equal(_unified(with_zero), _unified(without))
    assert np.array_equal(_masks(with_zero)[:-1], _masks(without)) and not _masks(with_zero)[-1].any()
    assert np.array_equal(with_zero.rescalers[:-1], without.rescalers) and (with_zero.rescalers[-1] == 0).all()


@given(state_dicts(num_tasks=1), rescaler_modes())
def test_exact_sign_ties_elect_minus_one(deltas, mode):
    """delta and -delta cancel everywhere: every sum is exactly 0, so -1 wins and only the
    negative entries are kept, at full magnitude."""
    delta = _flat(deltas[0])
    state = unify([deltas[0], {n: -t for n, t in deltas[0].items()}], rescaler=mode, kernel=KERNEL)
    assert np.array_equal(_unified(state), -np.abs(delta))
    masks = _masks(state)
    assert np.array_equal(masks[0], delta < 0) and np.array_equal(masks[1], delta > 0)


@given(continual_schedules(max_numel=45), rescaler_modes())
def test_padding_bits_of_packed_masks_stay_zero(schedule, mode):
    """Lengths that are not a multiple of 8: the bits past the end are 0 after every step."""
    for state in _run(*schedule, mode):
        for name in state.names:
            n = state.unified[name].size
            packed = state.masks[name]
            assert packed.shape == (state.num_tasks, -(-n // 8))
            bits = unpack_bits(packed, packed.shape[1] * 8)
            assert not bits[:, n:].any(), name


@given(state_dicts(num_tasks=st.integers(2, 8)), st.randoms(use_true_random=False), rescaler_modes())
def test_permuting_tasks_permutes_masks_and_rescalers(deltas, rnd, mode):
    """One-shot unify is symmetric in the tasks. The float32 election sum is sequential and so
    order-dependent in general, but the strategies' values are integers in [-8, 8] times 2**-6:
    a partial sum of at most 8 of them is a multiple of 2**-6 of size at most 1, which float32
    holds exactly, so every order gives the same bits. L1 sums are per task, so also exact."""
    order = list(range(len(deltas)))
    rnd.shuffle(order)
    state = unify(deltas, rescaler=mode, kernel=KERNEL)
    permuted = unify([deltas[i] for i in order], rescaler=mode, kernel=KERNEL)
    assert np.array_equal(_unified(permuted), _unified(state))
    for name in state.names:
        assert np.array_equal(permuted.masks[name], state.masks[name][order])
    assert np.array_equal(permuted.rescalers, state.rescalers[order])
