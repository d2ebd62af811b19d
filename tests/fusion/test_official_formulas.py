"""`tensor-mean` mode against the official EMR-Merging / ConDU formulas, written here independently.

The implementation below follows the official code's whole-tensor style: per tensor, stack the
task vectors, elect with `flag = (sum > 0) * 2 - 1` (an exact zero sum elects -1), take the
largest agreeing magnitude, mask with `stacked * unified > 0`, and rescale each task by the sum
over tensors of mean|delta| over the sum over tensors of mean|M * u|. It shares no code with
`fusion` beyond numpy.

The official election sums with a vectorised `stacked.sum(0)`, the library sequentially in task
order. On arbitrary floats a near-tie could round to either sign; the strategies' values (small
integers times 2**-6) make one-shot sums exact, so the two must agree bit for bit there.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusion import add, unify
from fusion.testing.strategies import state_dicts


def official_unify(task_vectors: list[dict[str, np.ndarray]]):
    """-> (unified {name: array}, masks [{name: bool array}], rescalers [float]), whole tensors."""
    unified, masks = {}, [{} for _ in task_vectors]
    for name in task_vectors[0]:
        stacked = np.stack([tv[name].astype(np.float32) for tv in task_vectors])  # (T, *shape)
        flag = ((stacked.sum(axis=0) > 0) * 2 - 1).astype(np.float32)  # (*shape): +1 / -1, an exact zero sum -> -1
        param_max = ((stacked * flag > 0) * np.abs(stacked)).max(axis=0)  # (*shape)
        unified[name] = param_max * flag
        for i in range(len(task_vectors)):
            # The official mask multiplies values; it differs from comparing signs only where
            # |delta| * |u| underflows float32, which the strategies' values never do.
            masks[i][name] = stacked[i] * unified[name] > 0
    rescalers = []
    for i, tv in enumerate(task_vectors):
        # Means accumulated in float64, so that the comparison is about the formula and not about
        # float32 rounding of the official accumulation; a zero denominator is handled apart.
        sum_param = sum(np.abs(tv[name].astype(np.float64)).mean() for name in tv)
        sum_unified = sum(np.abs((masks[i][name] * unified[name]).astype(np.float64)).mean() for name in tv)
        rescalers.append(float(sum_param / sum_unified) if sum_unified > 0 else 0.0)
    return unified, masks, rescalers


def official_decouple(unified, mask, rescaler):
    # The official code multiplies float32 torch tensors by a Python float, which torch rounds
    # to float32 first; numpy would widen to float64, so the rounding is spelled out.
    return {name: np.float32(rescaler) * mask[name] * unified[name] for name in unified}


def _assert_matches(state, unified, masks, rescalers):
    for name in state.names:
        assert np.array_equal(state.unified[name].reshape(unified[name].shape), unified[name]), name
        for i in range(state.num_tasks):
            assert np.array_equal(state.mask(i + 1, name), masks[i][name]), f"task {i + 1} {name}"
    np.testing.assert_allclose(state.rescalers[:, 0], np.array(rescalers), rtol=1e-12, atol=0)
    assert (state.rescalers == state.rescalers[:, :1]).all()  # one scalar per task
    for i in range(state.num_tasks):
        expected = official_decouple(unified, masks[i], rescalers[i])
        for name, tensor in state.decouple(i + 1).items():
            np.testing.assert_allclose(tensor, expected[name].astype(np.float32), rtol=1e-6, atol=0)


@given(state_dicts(num_tasks=st.integers(1, 5), max_numel=40))
def test_tensor_mean_one_shot_matches_official_formulas(deltas):
    _assert_matches(unify(deltas, rescaler="tensor-mean", kernel="reference"), *official_unify(deltas))


@given(state_dicts(num_tasks=st.integers(2, 5), max_numel=40))
def test_tensor_mean_continual_step_matches_official_formulas(deltas):
    """The official continual step: rebuild the earlier tasks as rescaler * mask * unified, then unify
    them with the new task vector from scratch."""
    earlier, new = deltas[:-1], deltas[-1]
    unified, masks, rescalers = official_unify(earlier)
    rebuilt = [official_decouple(unified, masks[i], rescalers[i]) for i in range(len(earlier))]
    state = add(unify(earlier, rescaler="tensor-mean", kernel="reference"), new, kernel="reference")
    _assert_matches(state, *official_unify(rebuilt + [new]))


def test_official_tie_rule_on_a_hand_case():
    deltas = [{"w": np.array([[2.0, -1.0], [0.0, 3.0]], dtype=np.float32)},
              {"w": np.array([[-2.0, -1.0], [0.0, 1.0]], dtype=np.float32)}]
    unified, masks, rescalers = official_unify(deltas)
    # [0, 0]: 2 - 2 = 0 elects -1, kept only by task 2. [1, 0]: all zero, nothing kept.
    assert unified["w"].tolist() == [[-2.0, -1.0], [0.0, 3.0]]
    assert masks[0]["w"].tolist() == [[False, True], [False, True]]
    assert masks[1]["w"].tolist() == [[True, True], [False, True]]
    assert rescalers == pytest.approx([6 / 4, 4 / 6])
    _assert_matches(unify(deltas, rescaler="tensor-mean", kernel="reference"), unified, masks, rescalers)


def test_zero_denominator_is_zero_not_nan():
    """Where a task keeps nothing, the official division is 0/0 or x/0; the library's rule is 0."""
    deltas = [{"w": np.array(v, dtype=np.float32)} for v in ([-1.0, 0.0], [2.0, 0.0], [0.0, 0.0])]
    state = unify(deltas, rescaler="tensor-mean", kernel="reference")
    assert state.rescalers[:, 0].tolist() == [0.0, 1.0, 0.0]
    assert official_unify(deltas)[2] == [0.0, 1.0, 0.0]
