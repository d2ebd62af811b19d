"""Unit tests of the reference rules (fusion.reference), the rescalers and the in-memory API's plumbing."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fusion import add, compute_rescalers, unify
from fusion.reference import (
    continual_chunk,
    elect,
    elect_sign,
    pack_bits,
    reconstruct,
    reconstruct_all,
    unpack_bits,
)
from fusion.testing.strategies import chunk_sizes, delta_sequences, rescaler_modes, state_dicts

# --- bit packing -------------------------------------------------------------------------


@st.composite
def bool_tables(draw):
    t, n = draw(st.integers(1, 4)), draw(st.integers(1, 70))
    bits = draw(st.lists(st.booleans(), min_size=t * n, max_size=t * n))
    return torch.tensor(bits, dtype=torch.bool).reshape(t, n)


@given(bool_tables())
def test_pack_unpack_round_trip(masks):
    t, n = masks.shape
    packed = pack_bits(masks)
    assert packed.dtype == torch.uint8 and packed.shape == (t, -(-n // 8))
    assert torch.equal(unpack_bits(packed, n), masks)


@given(bool_tables())
def test_pack_matches_numpy_little_endian(masks):
    expected = np.packbits(masks.numpy(), axis=1, bitorder="little")
    assert np.array_equal(pack_bits(masks).numpy(), expected)


def test_pack_pads_with_zero_bits():
    masks = torch.ones((1, 11), dtype=torch.bool)  # 11 = one byte and 3 bits
    assert pack_bits(masks).tolist() == [[0xFF, 0b111]]


def test_pack_and_unpack_zero_tasks():
    assert pack_bits(torch.zeros((0, 11), dtype=torch.bool)).shape == (0, 2)
    assert unpack_bits(torch.zeros((0, 2), dtype=torch.uint8), 11).shape == (0, 11)


def test_add_keeping_no_stored_task_unifies_the_new_ones_alone():
    state = unify([{"w": torch.ones(3)}], kernel="reference")
    new = [{"w": torch.tensor([-1.0, 2.0, 0.0])}, {"w": torch.tensor([3.0, -1.0, 0.0])}]
    replaced, fresh = add(state, new, keep=[], kernel="reference"), unify(new, kernel="reference")
    assert torch.equal(replaced.unified["w"], fresh.unified["w"])
    assert torch.equal(replaced.masks["w"], fresh.masks["w"])
    assert torch.equal(replaced.rescalers, fresh.rescalers)


def test_element_8j_plus_b_is_bit_b_of_byte_j():
    masks = torch.zeros((1, 20), dtype=torch.bool)
    masks[0, 8 * 1 + 5] = True
    packed = pack_bits(masks)
    assert packed.tolist() == [[0, 1 << 5, 0]]


# --- elect -------------------------------------------------------------------------------


def test_exact_zero_sum_elects_minus_one():
    deltas = torch.tensor([[1.0, 2.0, 0.0], [-1.0, -1.0, 0.0]])
    assert elect_sign(deltas).tolist() == [-1.0, 1.0, -1.0]


def test_elect_hand_made_case():
    deltas = torch.tensor([
        # tie   outvoted big   all zero   zero among agreeing
        [1.0,  -1.0,           0.0,       0.0],
        [-1.0, -1.0,           0.0,       2.0],
        [0.0,  -1.0,           0.0,       3.0],
        [0.0,   2.0,           0.0,       0.0],
    ])  # (T=4, n=4)
    result = elect(deltas)
    masks = unpack_bits(result.packed_masks, 4)
    # Column 0: 1 - 1 = 0 elects -1, so only task 1 is kept; a zero task 2 is never masked.
    # Column 1: -1 wins; magnitude is the max over the agreeing tasks (1), not the outvoted 2.
    # Column 2: nothing to keep. Column 3: +; the zeros of tasks 0 and 3 are not masked.
    assert masks.tolist() == [
        [False, True, False, False],
        [True, True, False, True],
        [False, True, False, True],
        [False, False, False, False],
    ]
    assert result.unified.tolist() == [-1.0, -1.0, 0.0, 3.0]
    assert result.delta_l1.tolist() == [2.0, 4.0, 4.0, 2.0]
    assert result.masked_l1.tolist() == [1.0, 5.0, 4.0, 0.0]
    assert result.delta_l1.dtype == result.masked_l1.dtype == torch.float64


def test_elect_rejects_flat_input():
    with pytest.raises(ValueError, match=r"\(T, n\)"):
        elect(torch.ones(5))


def test_elect_rounds_unified_to_store_dtype_before_l1():
    x = 1.0 + 2.0**-12  # not representable in float16: rounds to 1.0
    result = elect(torch.tensor([[x, 0.0]]), unified_dtype=torch.float16)
    assert result.unified.tolist() == [1.0, 0.0]
    assert result.masked_l1.tolist() == [1.0]  # on the stored value, so rescalers rebuild what is stored
    assert result.delta_l1.tolist() == [x]


def test_elect_accepts_half_inputs_and_computes_in_float32():
    deltas = torch.tensor([[1.5, -2.0], [0.5, 1.0]], dtype=torch.bfloat16)
    result = elect(deltas)
    assert result.unified.dtype == torch.float32
    assert result.unified.tolist() == [1.5, -2.0]


# --- reconstruct -------------------------------------------------------------------------


def test_reconstruct_hand_case():
    unified = torch.tensor([2.0, -3.0, 0.5, 4.0])
    mask = torch.tensor([True, False, True, False])
    assert reconstruct(unified, mask, 1.5).tolist() == [3.0, 0.0, 0.75, 0.0]


def test_reconstruct_all_unpacks_each_task():
    unified = torch.tensor([2.0, -3.0, 0.5])
    masks = torch.tensor([[True, True, False], [False, True, True]])
    rebuilt = reconstruct_all(unified, pack_bits(masks), torch.tensor([0.5, 2.0], dtype=torch.float64))
    assert rebuilt.tolist() == [[1.0, -1.5, 0.0], [0.0, -6.0, 1.0]]


def test_reconstruct_all_of_no_task_is_empty():
    rebuilt = reconstruct_all(torch.ones(5), torch.zeros((0, 1), dtype=torch.uint8), torch.zeros(0))
    assert rebuilt.shape == (0, 5)


def test_continual_chunk_is_elect_of_rebuilt_then_new():
    unified = torch.tensor([2.0, -3.0, 0.5, 0.0, 1.0])
    masks = torch.tensor([[True, True, False, False, True], [False, True, True, False, False]])
    rescalers = torch.tensor([0.5, 2.0], dtype=torch.float64)
    new = torch.tensor([[-4.0, 1.0, 0.0, 0.0, 3.0]])
    rebuilt = torch.tensor([[1.0, -1.5, 0.0, 0.0, 0.5], [0.0, -6.0, 1.0, 0.0, 0.0]])
    got, expected = continual_chunk(unified, pack_bits(masks), rescalers, new), elect(torch.cat([rebuilt, new]))
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


# --- rescalers: three modes, by hand -----------------------------------------------------
# Two tasks over tensor a (2 elements) and b (3 elements):
#   delta_1: a = [1, 2],  b = [0, -3, 3]      delta_2: a = [3, -1], b = [1, -1, 0]
# Elected: a: u = [3, 2] (masks 1: [1, 1], 2: [1, 0]); b: u = [1, -3, 3] (1: [0, 1, 1], 2: [1, 1, 0]).
# L1 of inputs: task 1 (a 3, b 6), task 2 (a 4, b 2); of M * u: task 1 (a 5, b 6), task 2 (a 3, b 4).
HAND_DELTAS = [
    {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0, -3.0, 3.0])},
    {"a": torch.tensor([3.0, -1.0]), "b": torch.tensor([1.0, -1.0, 0.0])},
]
HAND_RESCALERS = {
    "model": [[9 / 11, 9 / 11], [6 / 7, 6 / 7]],
    "tensor-mean": [[(3 / 2 + 6 / 3) / (5 / 2 + 6 / 3)] * 2, [(4 / 2 + 2 / 3) / (3 / 2 + 4 / 3)] * 2],
    "tensor": [[3 / 5, 6 / 6], [4 / 3, 2 / 4]],
}


@pytest.mark.parametrize("mode", list(HAND_RESCALERS))
def test_rescalers_hand_case(mode):
    state = unify(HAND_DELTAS, mode=mode, kernel="reference")
    assert state.unified["a"].tolist() == [3.0, 2.0] and state.unified["b"].tolist() == [1.0, -3.0, 3.0]
    assert state.delta_l1.tolist() == [[3.0, 6.0], [4.0, 2.0]]
    assert state.masked_l1.tolist() == [[5.0, 6.0], [3.0, 4.0]]
    torch.testing.assert_close(state.rescalers, torch.tensor(HAND_RESCALERS[mode], dtype=torch.float64),
                               rtol=1e-15, atol=0)


def test_decouple_hand_case_tensor_mode():
    rebuilt = unify(HAND_DELTAS, mode="tensor", kernel="reference").decouple(1)
    assert rebuilt["a"].tolist() == [4.0, 0.0]  # 4/3 * [3, 0]
    assert rebuilt["b"].tolist() == [0.5, -1.5, 0.0]  # 1/2 * [1, -3, 0]


def test_zero_denominator_gives_zero_rescaler():
    delta_l1 = torch.tensor([[2.0, 0.0], [1.0, 3.0]], dtype=torch.float64)
    masked_l1 = torch.tensor([[0.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    numels = torch.tensor([4, 2])
    assert compute_rescalers(delta_l1, masked_l1, numels, "model").tolist() == [[0.0, 0.0], [2.0, 2.0]]
    assert compute_rescalers(delta_l1, masked_l1, numels, "tensor").tolist() == [[0.0, 0.0], [0.5, 0.0]]
    mean = compute_rescalers(delta_l1, masked_l1, numels, "tensor-mean")
    assert mean[0].tolist() == [0.0, 0.0]
    assert mean[1].tolist() == pytest.approx([(1 / 4 + 3 / 2) / (2 / 4)] * 2, rel=1e-15)


# --- chunking ----------------------------------------------------------------------------


def _assert_same_state(a, b):
    for name in a.names:
        assert torch.equal(a.unified[name], b.unified[name]), name
        assert torch.equal(a.masks[name], b.masks[name]), name
    # L1 sums are float64 accumulations in chunk order: equal to rounding, not bit for bit.
    torch.testing.assert_close(a.delta_l1, b.delta_l1, rtol=1e-12, atol=0)
    torch.testing.assert_close(a.masked_l1, b.masked_l1, rtol=1e-12, atol=0)
    torch.testing.assert_close(a.rescalers, b.rescalers, rtol=1e-12, atol=0)


@given(state_dicts(max_numel=45), chunk_sizes(max_chunk=48), rescaler_modes())
def test_any_chunk_size_gives_the_one_chunk_state(deltas, chunk, mode):
    whole = unify(deltas, mode=mode, kernel="reference", chunk=1 << 20)
    _assert_same_state(unify(deltas, mode=mode, kernel="reference", chunk=chunk), whole)


@given(delta_sequences(steps=st.integers(2, 4), max_numel=45), chunk_sizes(max_chunk=48), rescaler_modes())
def test_any_chunk_size_gives_the_one_chunk_continual_step(sequence, chunk, mode):
    start = unify(sequence[:-1], mode=mode, kernel="reference")
    whole = add(start, sequence[-1], kernel="reference", chunk=1 << 20)
    _assert_same_state(add(start, sequence[-1], kernel="reference", chunk=chunk), whole)


# --- validation at the boundary ----------------------------------------------------------


def _two(**extra):
    return [{"w": torch.ones(3), "b": torch.ones(2)}, {"w": torch.ones(3), "b": torch.ones(2), **extra}]


def test_unify_rejects_a_missing_tensor():
    deltas = [{"w": torch.ones(3), "b": torch.ones(2)}, {"w": torch.ones(3)}]
    with pytest.raises(ValueError, match=r"delta 1.*missing \['b'\]"):
        unify(deltas, kernel="reference")


def test_unify_rejects_an_extra_tensor():
    with pytest.raises(ValueError, match=r"delta 1.*extra \['head'\]"):
        unify(_two(head=torch.ones(4)), kernel="reference")


def test_unify_rejects_a_shape_mismatch_naming_the_tensor_and_the_fix():
    with pytest.raises(ValueError, match=r"'b' has shape \(3,\), expected \(2,\); leave tensors of another shape out"):
        unify(_two(b=torch.ones(3)), kernel="reference")


def test_unify_rejects_integer_tensors():
    with pytest.raises(ValueError, match=r"'b' is torch.int64"):
        unify(_two(b=torch.ones(2, dtype=torch.int64)), kernel="reference")


def test_unify_rejects_no_delta_and_unknown_mode_and_bad_chunk():
    with pytest.raises(ValueError, match="at least one delta"):
        unify([], kernel="reference")
    with pytest.raises(ValueError, match="unknown rescaler mode 'paper'"):
        unify(_two(), mode="paper", kernel="reference")
    with pytest.raises(ValueError, match="multiple of 8"):
        unify(_two(), kernel="reference", chunk=12)


def test_add_rejects_a_delta_that_does_not_match_the_state():
    state = unify(_two(), kernel="reference")
    with pytest.raises(ValueError, match=r"'w' has shape \(4,\), expected \(3,\)"):
        add(state, {"w": torch.ones(4), "b": torch.ones(2)}, kernel="reference")
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        add(state, {"w": torch.ones(3)}, kernel="reference")
    with pytest.raises(ValueError, match="nothing left to unify"):
        add(state, (), keep=[], kernel="reference")


def test_unify_rejects_non_finite_values_naming_the_tensor():
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"delta 1: tensor 'w' has NaN or infinite values"):
            unify(_two(w=torch.tensor([1.0, bad, 0.0])), kernel="reference")


def test_add_rejects_bad_keep_indices():
    state = unify(_two(), kernel="reference")
    for keep in ([2], [-1], [0, 0]):
        with pytest.raises(ValueError, match="distinct task indices from 0 to 1"):
            add(state, (), keep=keep, kernel="reference")


def test_a_unified_delta_that_overflows_its_dtype_is_refused():
    # 1e5 is beyond float16's range (65504): stored as inf it would rebuild as inf or NaN.
    deltas = [{"w": torch.tensor([1e5, 1.0])}]
    with pytest.raises(ValueError, match=r"'w'.*overflows float16.*float32"):
        unify(deltas, dtypes={"w": torch.float16}, kernel="reference")
    assert unify(deltas, dtypes={"w": torch.float32}, kernel="reference").unified["w"][0] == 1e5
