"""The in-memory API on both kinds of arrays: numpy always, torch tensors when torch is there.

CPU torch tensors are computed through numpy and come back as torch tensors with the same
values, bit for bit; CUDA tensors take the Triton path (test_triton_kernel.py runs it interpreted).
"""

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fusion
from fusion import add, apply_delta, is_fusable, remove, task_delta, unify
from fusion.testing.strategies import FLOAT_DTYPES, as_dtype, rescaler_modes, state_dicts, with_private_tensors

NUMPY_TO_TORCH = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
                  np.dtype(np.float64): torch.float64}


def to_torch(array: np.ndarray) -> torch.Tensor:
    """The same values as a torch tensor; bfloat16 through its bits."""
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def same_bits(tensor: torch.Tensor, array: np.ndarray) -> bool:
    got = to_numpy(tensor)
    return got.dtype == array.dtype and got.shape == array.shape and got.tobytes() == array.tobytes()


def assert_same_state(torch_state, numpy_state) -> None:
    """A state computed from torch tensors equals the one from numpy arrays, in torch tensors."""
    for name in numpy_state.names:
        assert isinstance(torch_state.unified[name], torch.Tensor) and isinstance(torch_state.masks[name], torch.Tensor)
        assert same_bits(torch_state.unified[name], numpy_state.unified[name]), name
        assert same_bits(torch_state.masks[name], numpy_state.masks[name]), name
        for task in range(1, numpy_state.num_tasks + 1):
            assert same_bits(torch_state.mask(task, name), numpy_state.mask(task, name))
    for table in ("rescalers", "delta_l1", "masked_l1"):
        assert same_bits(getattr(torch_state, table), getattr(numpy_state, table)), table
    for task in range(1, numpy_state.num_tasks + 1):
        rebuilt, expected = torch_state.decouple(task), numpy_state.decouple(task)
        assert all(same_bits(rebuilt[name], expected[name]) for name in expected), f"task {task}"


# ---- torch tensors give torch tensors, equal to the numpy results --------------------------------


@given(state_dicts(num_tasks=st.integers(2, 4), max_numel=40), rescaler_modes(), st.sampled_from(FLOAT_DTYPES),
       st.sampled_from(["reference", "cpu"]))
def test_torch_tensors_give_torch_tensors_equal_to_the_numpy_results(deltas, mode, dtype, kernel):
    deltas = [{name: as_dtype(t, dtype) for name, t in d.items()} for d in deltas]
    tensors = [{name: to_torch(t) for name, t in d.items()} for d in deltas]
    expected = unify(deltas[:-1], rescaler=mode, kernel=kernel, chunk=16)
    state = unify(tensors[:-1], rescaler=mode, kernel=kernel, chunk=16)
    assert_same_state(state, expected)
    state, expected = add(state, tensors[-1], kernel=kernel, chunk=24), add(expected, deltas[-1], kernel=kernel, chunk=24)
    assert_same_state(state, expected)
    assert_same_state(remove(state, 1, kernel=kernel), remove(expected, 1, kernel=kernel))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, ml_dtypes.bfloat16], ids=str)
def test_task_delta_and_apply_delta_on_both_kinds(dtype):
    rng = np.random.default_rng(7)
    base = {"w": rng.standard_normal((3, 5)).astype(dtype), "ids": np.arange(4), "b": rng.standard_normal(4).astype(dtype)}
    tuned = {"w": (base["w"].astype(np.float32) + 0.37).astype(dtype), "ids": np.arange(4) + 1,
             "b": rng.standard_normal(4).astype(dtype), "head": np.ones(2, dtype=np.float32)}
    delta = task_delta(base, tuned)
    assert list(delta) == ["w", "b", "head"] and delta["w"].dtype == delta["b"].dtype == np.float32
    assert delta["head"] is tuned["head"]  # the base lacks it: whole, as it is
    assert np.array_equal(delta["w"], tuned["w"].astype(np.float32) - base["w"].astype(np.float32))
    rebuilt = apply_delta(base, delta)
    assert rebuilt["ids"] is base["ids"] and rebuilt["w"].dtype == base["w"].dtype and rebuilt["head"] is tuned["head"]
    assert rebuilt["w"].tobytes() == (base["w"].astype(np.float32) + delta["w"]).astype(dtype).tobytes()

    torch_base, torch_tuned = ({k: to_torch(v) for k, v in d.items()} for d in (base, tuned))
    torch_delta = task_delta(torch_base, torch_tuned)
    assert list(torch_delta) == list(delta) and all(same_bits(torch_delta[k], delta[k]) for k in delta)
    torch_rebuilt = apply_delta(torch_base, torch_delta)
    assert torch_rebuilt["ids"] is torch_base["ids"]
    assert all(same_bits(torch_rebuilt[k], rebuilt[k]) for k in ("w", "b", "head"))
    # and torch's own arithmetic agrees: the old whole-tensor code, bit for bit
    assert same_bits((torch_base["w"].float() + torch_delta["w"]).to(torch_base["w"].dtype), rebuilt["w"])


def test_is_fusable_knows_float_dtypes_of_both_kinds():
    assert is_fusable(np.zeros(1, np.float16)) and is_fusable(np.zeros(1, ml_dtypes.bfloat16))
    assert not is_fusable(np.zeros(1, np.int64)) and not is_fusable(np.zeros(1, bool))
    assert is_fusable(torch.zeros(1, dtype=torch.bfloat16)) and not is_fusable(torch.zeros(1, dtype=torch.int32))
    assert not is_fusable(np.zeros(1, np.complex64)) and not is_fusable(torch.zeros(1, dtype=torch.complex64))


# ---- one kind per call ------------------------------------------------------------------------------------


def test_mixing_numpy_and_torch_is_one_line_error():
    numpy_delta = {"w": np.ones(3, dtype=np.float32)}
    torch_delta = {"w": torch.ones(3)}
    with pytest.raises(ValueError, match=r"^unify mixes numpy and torch/cpu; pass every tensor as the same kind"):
        unify([numpy_delta, torch_delta])
    state = unify([numpy_delta])
    with pytest.raises(ValueError, match=r"^add mixes numpy and torch/cpu"):
        add(state, torch_delta)
    with pytest.raises(ValueError, match=r"^task_delta mixes"):
        task_delta(numpy_delta, torch_delta)
    with pytest.raises(ValueError, match=r"^apply_delta mixes"):
        apply_delta(torch_delta, numpy_delta)


def test_the_triton_kernel_refuses_numpy_arrays():
    with pytest.raises(ValueError, match="the triton kernel takes torch tensors and these are numpy arrays"):
        unify([{"w": np.ones(3, dtype=np.float32)}], kernel="triton")


def test_host_kernels_refuse_tensors_on_another_device():
    """Validation comes before any device work: a CUDA tensor is refused by the host kernels."""
    meta = torch.ones(3, device="meta")  # a device that is not the CPU, present on every machine
    with pytest.raises(ValueError, match="^kernel 'cpu' computes on the host and the tensors are on meta; use"):
        unify([{"w": meta}], kernel="cpu")


# ---- private tensors: kept per task, never elected ----------------------------------------------------------


def _without(deltas, private):
    return [{n: t for n, t in d.items() if n not in p} for d, p in zip(deltas, private)]


@given(state_dicts(num_tasks=st.integers(1, 4), max_numel=30).flatmap(with_private_tensors), rescaler_modes())
def test_private_tensors_are_kept_whole_and_left_out_of_the_election(deltas, mode):
    """Tensors not every delta has in one shape are private: the fused part is the unify of the deltas
    without them, bit for bit, and decouple gives each task its own back."""
    state = unify(deltas, rescaler=mode, kernel="reference")
    shared = [n for n in deltas[0] if all(n in d and d[n].shape == deltas[0][n].shape for d in deltas)]
    assert state.names == shared
    private = [{n: t for n, t in d.items() if n not in shared} for d in deltas]
    fused = unify(_without(deltas, private), rescaler=mode, kernel="reference")
    assert_same_numpy_state(state, fused)
    for t, own in enumerate(private, start=1):
        assert state.private[t].keys() == own.keys() and all(np.array_equal(state.private[t][n], own[n]) for n in own)
        rebuilt = state.decouple(t)
        assert all(rebuilt[n] is state.private[t][n] for n in own)
        assert all(np.array_equal(rebuilt[n], fused.decouple(t)[n]) for n in shared)


@given(state_dicts(num_tasks=st.integers(2, 4), max_numel=30).flatmap(with_private_tensors), rescaler_modes())
def test_add_keeps_a_new_tasks_extra_tensors_private(deltas, mode):
    """The continual step fuses what the state fuses; the new task's other tensors are its own."""
    start = unify(deltas[:-1], rescaler=mode, kernel="reference")
    new = {**{n: t for n, t in deltas[-1].items() if n in start.shapes and t.shape == start.shapes[n]},
           "new.head": np.ones((2, 2), np.float32)}
    missing = [n for n in start.shapes if n not in new]
    if missing:
        with pytest.raises(ValueError, match=rf"^delta 1: lacks the fused tensor {missing[0]!r}"):
            add(start, new, kernel="reference")
        return
    state = add(start, new, kernel="reference")
    assert state.names == start.names and list(state.private[state.num_tasks]) == ["new.head"]
    assert all(state.private[t].keys() == start.private[t].keys() for t in range(1, start.num_tasks + 1))
    fused = add(unify(_without(deltas[:-1], [start.private[t] for t in start.private]), rescaler=mode,
                      kernel="reference"), {n: new[n] for n in start.shapes}, kernel="reference")
    assert_same_numpy_state(state, fused)


def test_a_fused_tensor_in_another_shape_is_private_and_counts_as_unchanged():
    """As in the store: the new task's `w` of another shape is its own, and its fused `w` delta is 0."""
    a, b = {"w": np.array([1.0, -2.0, 0.5], np.float32)}, {"w": np.array([2.0, 1.0, -1.0], np.float32)}
    resized = {"w": np.ones((2, 2), np.float32)}
    state = add(unify([a, b], kernel="reference"), resized, kernel="reference")
    zero = add(unify([a, b], kernel="reference"), {"w": np.zeros(3, np.float32)}, kernel="reference")
    assert_same_numpy_state(state, zero)
    assert state.decouple(3)["w"] is state.private[3]["w"] and state.decouple(3)["w"].shape == (2, 2)


def test_base_decides_what_is_fused_as_the_store_does():
    base = {"w": np.zeros(3, np.float32), "ids": np.arange(3)}
    heads = [{"w": np.array([1.0, -1.0, 2.0], np.float32), "head": np.ones(2, np.float32)},
             {"w": np.array([1.0, 1.0, -2.0], np.float32), "head": np.full(2, 2.0, np.float32)}]
    assert unify(heads, kernel="reference").names == ["w", "head"]  # every delta has it in one shape
    state = unify(heads, base=base, kernel="reference")
    assert state.names == ["w"] and [list(p) for p in state.private.values()] == [["head"], ["head"]]
    assert list(unify(heads[:1], base=base, kernel="reference").private[1]) == ["head"]  # one task alone too
    assert state.dtypes == {"w": fusion.dtypes.F32}
    with pytest.raises(ValueError, match=r"^delta 1: lacks the fused tensor 'w'"):
        unify([{"head": np.ones(2, np.float32)}], base=base, kernel="reference")
    with pytest.raises(ValueError, match=r"^delta 1: tensor 'ids' is a buffer of the base \(int64\), which is not"):
        unify([{"w": np.ones(3, np.float32), "ids": np.ones(3, np.float32)}], base=base, kernel="reference")
    with pytest.raises(ValueError, match=r"^the deltas share no float tensor in one shape"):
        unify([{"a": np.ones(2, np.float32)}, {"b": np.ones(2, np.float32)}], kernel="reference")


def test_integer_tensors_are_refused_private_ones_too():
    with pytest.raises(ValueError, match=r"^delta 2: tensor 'count' is int64; only float tensors are fused"):
        unify([{"w": np.ones(2, np.float32)}, {"w": np.ones(2, np.float32), "count": np.arange(3)}], kernel="reference")


def test_the_state_owns_its_private_tensors():
    head = np.ones(2, np.float32)
    state = unify([{"w": np.ones(3, np.float32), "head": head}, {"w": np.ones(3, np.float32)}], kernel="reference")
    head[:] = 5.0
    assert state.private[1]["head"].tolist() == [1.0, 1.0]


def test_task_delta_and_apply_delta_round_trip_private_tensors():
    base = {"w": np.ones((2, 3), np.float32), "head": np.zeros((3, 4), np.float32), "ids": np.arange(2)}
    tuned = {"w": np.full((2, 3), 1.5, np.float32), "head": np.ones((5, 4), np.float32),
             "extra": np.ones(2, ml_dtypes.bfloat16), "ids": np.arange(2) + 1, "mask": np.ones(2, bool)}
    delta = task_delta(base, tuned)
    assert list(delta) == ["w", "head", "extra"]  # buffers come from the base
    assert delta["head"] is tuned["head"] and delta["extra"] is tuned["extra"]
    rebuilt = apply_delta(base, delta)
    assert list(rebuilt) == ["w", "head", "ids", "extra"] and rebuilt["ids"] is base["ids"]
    assert rebuilt["head"] is tuned["head"] and rebuilt["extra"].dtype == ml_dtypes.bfloat16


# ---- one numbering and one keyword: tasks count from 1, `rescaler=` ------------------------------------------


def test_tasks_count_from_one_everywhere():
    deltas = [{"w": np.array([1.0, 0.0], np.float32)}, {"w": np.array([0.0, 5.0], np.float32)},
              {"w": np.array([2.0, 0.0], np.float32)}]
    state = unify(deltas, rescaler="tensor", kernel="reference")  # u = [2, 5]
    assert state.decouple(2)["w"].tolist() == [0.0, 5.0] and state.mask(2, "w").tolist() == [False, True]
    assert state.decouple(1)["w"].tolist() == [1.0, 0.0] and state.decouple(3)["w"].tolist() == [2.0, 0.0]
    dropped = remove(state, 2, kernel="reference")
    assert dropped.num_tasks == 2
    assert_same_numpy_state(dropped, add(state, (), keep=[1, 3], kernel="reference"))  # task 3 is now task 2
    for bad in (0, 4, -1, True, 1.0, "1"):
        message = rf"^task {bad!r}: this state holds tasks 1\.\.3; tasks count from 1, as in the store and the CLI$"
        with pytest.raises(ValueError, match=message):
            state.decouple(bad)
        with pytest.raises(ValueError, match=message):
            state.mask(bad, "w")
        with pytest.raises(ValueError, match=message):
            remove(state, bad, kernel="reference")
    assert state.decouple(np.int64(3)).keys() == {"w"}


def test_mode_is_a_deprecated_name_of_rescaler():
    deltas = [{"w": np.array([1.0, -2.0], np.float32)}, {"w": np.array([3.0, 1.0], np.float32)}]
    with pytest.warns(DeprecationWarning, match="mode= is deprecated.*use rescaler="):
        old = unify(deltas, mode="tensor", kernel="reference")
    assert_same_numpy_state(old, unify(deltas, rescaler="tensor", kernel="reference"))
    assert old.rescaler == "tensor"
    with pytest.warns(DeprecationWarning, match="use FusedDeltas.rescaler"):
        assert old.mode == "tensor"
    with pytest.warns(DeprecationWarning, match="use rescaler="):
        assert add(old, (), mode="model", kernel="reference").rescaler == "model"
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match=r"^rescaler='model' and mode='tensor'"):
        unify(deltas, rescaler="model", mode="tensor", kernel="reference")
    with pytest.raises(ValueError, match="unknown rescaler mode 'paper'"):
        unify(deltas, rescaler="paper", kernel="reference")
    assert add(old, (), kernel="reference").rescaler == "tensor"  # the state's, by default


def assert_same_numpy_state(a, b) -> bool:
    """Two numpy states: the same fused tensors, unified delta and masks bit for bit, rescalers equal."""
    assert a.shapes == b.shapes
    for name in a.names:
        assert a.unified[name].tobytes() == b.unified[name].tobytes(), name
        assert np.array_equal(a.masks[name], b.masks[name]), name
    assert np.array_equal(a.rescalers, b.rescalers)
    return True
