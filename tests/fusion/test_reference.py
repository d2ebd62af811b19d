"""Unit tests of the reference rules (fusion.reference), the rescalers and the in-memory API's plumbing."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusion import add, unify
from fusion.dtypes import BF16, F16, F32
from fusion.reference import (
    continual_chunk,
    elect,
    elect_sign,
    fidelity_sums,
    pack_bits,
    rebuild,
    reconstruct,
    reconstruct_all,
    unpack_bits,
)
from fusion.rescale import compute_rescalers
from fusion.testing.strategies import chunk_sizes, delta_sequences, rescaler_modes, state_dicts


def f32(values) -> np.ndarray:
    return np.array(values, dtype=np.float32)

# --- bit packing -------------------------------------------------------------------------


@st.composite
def bool_tables(draw):
    t, n = draw(st.integers(1, 4)), draw(st.integers(1, 70))
    bits = draw(st.lists(st.booleans(), min_size=t * n, max_size=t * n))
    return np.array(bits, dtype=bool).reshape(t, n)


@given(bool_tables())
def test_pack_unpack_round_trip(masks):
    t, n = masks.shape
    packed = pack_bits(masks)
    assert packed.dtype == np.uint8 and packed.shape == (t, -(-n // 8))
    assert np.array_equal(unpack_bits(packed, n), masks)


@given(bool_tables())
def test_pack_puts_element_8j_plus_b_at_bit_b_of_byte_j(masks):
    """The format's rule, spelled out bit by bit (independent of numpy.packbits)."""
    packed = pack_bits(masks)
    for t, j in np.ndindex(*masks.shape):
        assert (packed[t, j // 8] >> (j % 8)) & 1 == masks[t, j]
    t, n = masks.shape
    padding = [(packed[i, j // 8] >> (j % 8)) & 1 for i in range(t) for j in range(n, 8 * packed.shape[1])]
    assert not any(padding), "bits past the end are 0"


def test_pack_pads_with_zero_bits():
    masks = np.ones((1, 11), dtype=bool)  # 11 = one byte and 3 bits
    assert pack_bits(masks).tolist() == [[0xFF, 0b111]]


def test_pack_and_unpack_zero_tasks():
    assert pack_bits(np.zeros((0, 11), dtype=bool)).shape == (0, 2)
    assert unpack_bits(np.zeros((0, 2), dtype=np.uint8), 11).shape == (0, 11)


def test_add_keeping_no_stored_task_unifies_the_new_ones_alone():
    state = unify([{"w": np.ones(3, dtype=np.float32)}], kernel="reference")
    new = [{"w": f32([-1.0, 2.0, 0.0])}, {"w": f32([3.0, -1.0, 0.0])}]
    replaced, fresh = add(state, new, keep=[], kernel="reference"), unify(new, kernel="reference")
    assert np.array_equal(replaced.unified["w"], fresh.unified["w"])
    assert np.array_equal(replaced.masks["w"], fresh.masks["w"])
    assert np.array_equal(replaced.rescalers, fresh.rescalers)


def test_element_8j_plus_b_is_bit_b_of_byte_j():
    masks = np.zeros((1, 20), dtype=bool)
    masks[0, 8 * 1 + 5] = True
    packed = pack_bits(masks)
    assert packed.tolist() == [[0, 1 << 5, 0]]


# --- elect -------------------------------------------------------------------------------


def test_exact_zero_sum_elects_minus_one():
    deltas = f32([[1.0, 2.0, 0.0], [-1.0, -1.0, 0.0]])
    assert elect_sign(deltas).tolist() == [-1.0, 1.0, -1.0]


def test_election_sum_is_sequential_in_task_order():
    """1e8 + 1 - 1e8 in float32: sequentially (1e8 + 1) rounds to 1e8, so the sum is 0 and -1 is
    elected; a pairwise sum of (1 - 1e8) first would give the same here, but 1 + (1e8 - 1e8) would not."""
    deltas = f32([[1e8], [1.0], [-1e8]])
    assert elect_sign(deltas).tolist() == [-1.0]
    assert elect_sign(deltas[[1, 0, 2]]).tolist() == [-1.0]
    assert elect_sign(deltas[[0, 2, 1]]).tolist() == [1.0]  # 1e8 - 1e8 first: the 1 survives


def test_elect_hand_made_case():
    deltas = f32([
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
    assert result.delta_l1.dtype == result.masked_l1.dtype == np.float64
    assert result.unified.dtype == np.float32 and result.packed_masks.dtype == np.uint8


def test_elect_rejects_flat_input_and_no_task():
    with pytest.raises(ValueError, match=r"\(T, n\)"):
        elect(np.ones(5, dtype=np.float32))
    with pytest.raises(ValueError, match=r"T >= 1"):
        elect(np.ones((0, 5), dtype=np.float32))


def test_elect_rejects_a_unified_dtype_that_holds_no_delta():
    with pytest.raises(ValueError, match="int16 cannot hold a delta"):  # int8 and int4 are block-quantized forms
        elect(f32([[1.0]]), unified_dtype="int16")


@pytest.mark.parametrize("dtype", [F16, "float16", "bf16", BF16])
def test_elect_rounds_unified_to_store_dtype_before_l1(dtype):
    x = 1.0 + 2.0**-12  # not representable in float16 or bfloat16: rounds to 1.0
    result = elect(f32([[x, 0.0]]), unified_dtype=dtype)
    assert result.unified.tolist() == [1.0, -0.0]
    assert result.masked_l1.tolist() == [1.0]  # on the stored value, so rescalers rebuild what is stored
    assert result.delta_l1.tolist() == [np.float32(x)]


def test_unified_rounds_to_nearest_even_like_ml_dtypes():
    values = f32([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-9, 3e-41, 3.3e38])  # bfloat16 halfway cases
    result = elect(values[None], unified_dtype=BF16)
    expected = values.astype(ml_dtypes.bfloat16).astype(np.float32)
    assert np.array_equal(result.unified.view(np.int32), expected.view(np.int32))


def test_elect_accepts_half_inputs_and_computes_in_float32():
    for dtype in (ml_dtypes.bfloat16, np.float16, np.float64):
        deltas = np.array([[1.5, -2.0], [0.5, 1.0]], dtype=dtype)
        result = elect(deltas)
        assert result.unified.dtype == np.float32
        assert result.unified.tolist() == [1.5, -2.0]


# --- reconstruct -------------------------------------------------------------------------


def test_reconstruct_hand_case():
    unified = f32([2.0, -3.0, 0.5, 4.0])
    mask = np.array([True, False, True, False])
    assert reconstruct(unified, mask, 1.5).tolist() == [3.0, 0.0, 0.75, 0.0]


def test_reconstruct_rounds_the_rescaler_to_float32_once():
    lam = 1 / 3  # float32(1/3) * 3 is 1.0000000298..., rounded to float32 1.0
    assert reconstruct(f32([3.0]), np.array([True]), lam).tolist() == [np.float32(3) * np.float32(lam)]
    assert reconstruct(f32([3.0]), np.array([True]), lam).dtype == np.float32


def test_reconstruct_all_unpacks_each_task():
    unified = f32([2.0, -3.0, 0.5])
    masks = np.array([[True, True, False], [False, True, True]])
    rebuilt = reconstruct_all(unified, pack_bits(masks), np.array([0.5, 2.0]))
    assert rebuilt.tolist() == [[1.0, -1.5, 0.0], [0.0, -6.0, 1.0]]


def test_reconstruct_all_of_no_task_is_empty():
    rebuilt = reconstruct_all(np.ones(5, dtype=np.float32), np.zeros((0, 1), dtype=np.uint8), np.zeros(0))
    assert rebuilt.shape == (0, 5) and rebuilt.dtype == np.float32


def test_continual_chunk_is_elect_of_rebuilt_then_new():
    unified = f32([2.0, -3.0, 0.5, 0.0, 1.0])
    masks = np.array([[True, True, False, False, True], [False, True, True, False, False]])
    rescalers = np.array([0.5, 2.0])
    new = f32([[-4.0, 1.0, 0.0, 0.0, 3.0]])
    rebuilt = f32([[1.0, -1.5, 0.0, 0.0, 0.5], [0.0, -6.0, 1.0, 0.0, 0.0]])
    got, expected = continual_chunk(unified, pack_bits(masks), rescalers, new), elect(np.concatenate([rebuilt, new]))
    for a, b in zip(got, expected):
        assert np.array_equal(a, b)


# --- rebuild and fidelity sums -----------------------------------------------------------


def test_rebuild_hand_case_adds_the_base_after_one_rounding():
    base = f32([1.0, -0.0, 2.0, -0.0])
    unified = f32([2.0, -3.0, 0.5, -1.0])
    packed = pack_bits(np.array([[True, False, True, True]]))[0]
    rebuilt = rebuild(base, unified, packed, 1.5)
    assert rebuilt.dtype == np.float32
    assert rebuilt.tolist() == [4.0, 0.0, 2.75, -1.5]
    assert np.signbit(rebuilt).tolist() == [False, False, False, True]  # -0.0 + 0.0 is +0.0 where the mask is off


def test_fidelity_sums_hand_case():
    unified, original = f32([2.0, -1.0, 0.0]), f32([1.0, 3.0, -2.0])
    packed = pack_bits(np.array([[True, False, False]]))[0]
    # A = 4, E = 2 * (2 - 1) = 2, D = 1, Z = 9 + 4 = 13, C = 1 + 9 + 4 = 14
    assert fidelity_sums(unified, packed, original).tolist() == [4.0, 2.0, 1.0, 13.0, 14.0]


# --- rescalers: three modes, by hand -----------------------------------------------------
# Two tasks over tensor a (2 elements) and b (3 elements):
#   delta_1: a = [1, 2],  b = [0, -3, 3]      delta_2: a = [3, -1], b = [1, -1, 0]
# Elected: a: u = [3, 2] (masks 1: [1, 1], 2: [1, 0]); b: u = [1, -3, 3] (1: [0, 1, 1], 2: [1, 1, 0]).
# L1 of inputs: task 1 (a 3, b 6), task 2 (a 4, b 2); of M * u: task 1 (a 5, b 6), task 2 (a 3, b 4).
HAND_DELTAS = [
    {"a": f32([1.0, 2.0]), "b": f32([0.0, -3.0, 3.0])},
    {"a": f32([3.0, -1.0]), "b": f32([1.0, -1.0, 0.0])},
]
HAND_RESCALERS = {
    "model": [[9 / 11, 9 / 11], [6 / 7, 6 / 7]],
    "tensor-mean": [[(3 / 2 + 6 / 3) / (5 / 2 + 6 / 3)] * 2, [(4 / 2 + 2 / 3) / (3 / 2 + 4 / 3)] * 2],
    "tensor": [[3 / 5, 6 / 6], [4 / 3, 2 / 4]],
}


@pytest.mark.parametrize("mode", list(HAND_RESCALERS))
def test_rescalers_hand_case(mode):
    state = unify(HAND_DELTAS, rescaler=mode, kernel="reference")
    assert state.unified["a"].tolist() == [3.0, 2.0] and state.unified["b"].tolist() == [1.0, -3.0, 3.0]
    assert state.delta_l1.tolist() == [[3.0, 6.0], [4.0, 2.0]]
    assert state.masked_l1.tolist() == [[5.0, 6.0], [3.0, 4.0]]
    assert state.rescalers.dtype == np.float64
    np.testing.assert_allclose(state.rescalers, np.array(HAND_RESCALERS[mode]), rtol=1e-15, atol=0)


def test_decouple_hand_case_tensor_mode():
    rebuilt = unify(HAND_DELTAS, rescaler="tensor", kernel="reference").decouple(2)
    assert rebuilt["a"].tolist() == [4.0, 0.0]  # 4/3 * [3, 0]
    assert rebuilt["b"].tolist() == [0.5, -1.5, 0.0]  # 1/2 * [1, -3, 0]


def test_zero_denominator_gives_zero_rescaler():
    delta_l1 = np.array([[2.0, 0.0], [1.0, 3.0]])
    masked_l1 = np.array([[0.0, 0.0], [2.0, 0.0]])
    numels = np.array([4, 2])
    assert compute_rescalers(delta_l1, masked_l1, numels, "model").tolist() == [[0.0, 0.0], [2.0, 2.0]]
    assert compute_rescalers(delta_l1, masked_l1, numels, "tensor").tolist() == [[0.0, 0.0], [0.5, 0.0]]
    mean = compute_rescalers(delta_l1, masked_l1, numels, "tensor-mean")
    assert mean[0].tolist() == [0.0, 0.0]
    assert mean[1].tolist() == pytest.approx([(1 / 4 + 3 / 2) / (2 / 4)] * 2, rel=1e-15)


# --- chunking ----------------------------------------------------------------------------


def _assert_same_state(a, b):
    for name in a.names:
        assert np.array_equal(a.unified[name].view(np.int32), b.unified[name].view(np.int32)), name
        assert np.array_equal(a.masks[name], b.masks[name]), name
    # L1 sums are float64 accumulations in chunk order: equal to rounding, not bit for bit.
    np.testing.assert_allclose(a.delta_l1, b.delta_l1, rtol=1e-12, atol=0)
    np.testing.assert_allclose(a.masked_l1, b.masked_l1, rtol=1e-12, atol=0)
    np.testing.assert_allclose(a.rescalers, b.rescalers, rtol=1e-12, atol=0)


@given(state_dicts(max_numel=45), chunk_sizes(max_chunk=48), rescaler_modes())
def test_any_chunk_size_gives_the_one_chunk_state(deltas, chunk, mode):
    whole = unify(deltas, rescaler=mode, kernel="reference", chunk=1 << 20)
    _assert_same_state(unify(deltas, rescaler=mode, kernel="reference", chunk=chunk), whole)


@given(delta_sequences(steps=st.integers(2, 4), max_numel=45), chunk_sizes(max_chunk=48), rescaler_modes())
def test_any_chunk_size_gives_the_one_chunk_continual_step(sequence, chunk, mode):
    start = unify(sequence[:-1], rescaler=mode, kernel="reference")
    whole = add(start, sequence[-1], kernel="reference", chunk=1 << 20)
    _assert_same_state(add(start, sequence[-1], kernel="reference", chunk=chunk), whole)


# --- validation at the boundary ----------------------------------------------------------


def ones(n, dtype=np.float32):
    return np.ones(n, dtype=dtype)


def _two(**extra):
    return [{"w": ones(3), "b": ones(2)}, {"w": ones(3), "b": ones(2), **extra}]


def test_a_tensor_some_deltas_lack_is_private_to_the_others():
    state = unify([{"w": ones(3), "b": ones(2)}, {"w": ones(3)}], kernel="reference")
    assert state.names == ["w"] and list(state.private[1]) == ["b"] and state.private[2] == {}


def test_an_extra_tensor_is_private_to_its_delta():
    state = unify(_two(head=ones(4)), kernel="reference")
    assert state.names == ["w", "b"] and state.private[1] == {} and list(state.private[2]) == ["head"]


def test_a_tensor_in_two_shapes_is_private_to_each_delta():
    state = unify(_two(b=ones(3)), kernel="reference")
    assert state.names == ["w"] and state.private[1]["b"].shape == (2,) and state.private[2]["b"].shape == (3,)


def test_unify_rejects_integer_tensors():
    with pytest.raises(ValueError, match=r"'b' is int64"):
        unify(_two(b=ones(2, dtype=np.int64)), kernel="reference")


def test_unify_rejects_what_is_not_an_array():
    with pytest.raises(ValueError, match=r"got list; convert it with numpy.asarray"):
        unify([{"w": [1.0, 2.0]}], kernel="reference")


def test_unify_rejects_no_delta_and_unknown_mode_and_bad_chunk():
    with pytest.raises(ValueError, match="at least one delta"):
        unify([], kernel="reference")
    with pytest.raises(ValueError, match="unknown rescaler mode 'paper'"):
        unify(_two(), rescaler="paper", kernel="reference")
    with pytest.raises(ValueError, match="multiple of 8"):
        unify(_two(), kernel="reference", chunk=12)


def test_add_rejects_a_delta_that_lacks_a_fused_tensor():
    state = unify(_two(), kernel="reference")
    with pytest.raises(ValueError, match=r"^delta 1: lacks the fused tensor 'b'; give every delta every fused tensor"):
        add(state, {"w": ones(3)}, kernel="reference")
    with pytest.raises(ValueError, match="nothing left to unify"):
        add(state, (), keep=[], kernel="reference")


def test_unify_rejects_non_finite_values_naming_the_tensor():
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"delta 2: tensor 'w' has NaN or infinite values"):
            unify(_two(w=f32([1.0, bad, 0.0])), kernel="reference")


def test_add_rejects_bad_keep_indices():
    state = unify(_two(), kernel="reference")
    for keep in ([0], [3], [-1], [1, 1], [True]):
        with pytest.raises(ValueError, match=r"^keep=\[.*\]: give distinct task numbers from 1 to 2; tasks count from 1"):
            add(state, (), keep=keep, kernel="reference")


def test_a_unified_delta_that_overflows_its_dtype_is_refused():
    # 1e5 is beyond float16's range (65504): stored as inf it would rebuild as inf or NaN.
    deltas = [{"w": f32([1e5, 1.0])}]
    with pytest.raises(ValueError, match=r"'w'.*overflows float16.*float32"):
        unify(deltas, dtypes={"w": "float16"}, kernel="reference")
    assert unify(deltas, dtypes={"w": F32}, kernel="reference").unified["w"][0] == 1e5
