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

from fusion import add, apply_delta, is_fusable, remove, task_delta, unify
from fusion.testing.strategies import FLOAT_DTYPES, as_dtype, rescaler_modes, state_dicts

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
        for task in range(numpy_state.num_tasks):
            assert same_bits(torch_state.mask(task, name), numpy_state.mask(task, name))
    for table in ("rescalers", "delta_l1", "masked_l1"):
        assert same_bits(getattr(torch_state, table), getattr(numpy_state, table)), table
    for task in range(numpy_state.num_tasks):
        rebuilt, expected = torch_state.decouple(task), numpy_state.decouple(task)
        assert all(same_bits(rebuilt[name], expected[name]) for name in expected), f"task {task}"


# ---- torch tensors give torch tensors, equal to the numpy results --------------------------------


@given(state_dicts(num_tasks=st.integers(2, 4), max_numel=40), rescaler_modes(), st.sampled_from(FLOAT_DTYPES),
       st.sampled_from(["reference", "cpu"]))
def test_torch_tensors_give_torch_tensors_equal_to_the_numpy_results(deltas, mode, dtype, kernel):
    deltas = [{name: as_dtype(t, dtype) for name, t in d.items()} for d in deltas]
    tensors = [{name: to_torch(t) for name, t in d.items()} for d in deltas]
    expected = unify(deltas[:-1], mode=mode, kernel=kernel, chunk=16)
    state = unify(tensors[:-1], mode=mode, kernel=kernel, chunk=16)
    assert_same_state(state, expected)
    state, expected = add(state, tensors[-1], kernel=kernel, chunk=24), add(expected, deltas[-1], kernel=kernel, chunk=24)
    assert_same_state(state, expected)
    assert_same_state(remove(state, 0, kernel=kernel), remove(expected, 0, kernel=kernel))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, ml_dtypes.bfloat16], ids=str)
def test_task_delta_and_apply_delta_on_both_kinds(dtype):
    rng = np.random.default_rng(7)
    base = {"w": rng.standard_normal((3, 5)).astype(dtype), "ids": np.arange(4), "b": rng.standard_normal(4).astype(dtype)}
    tuned = {"w": (base["w"].astype(np.float32) + 0.37).astype(dtype), "ids": np.arange(4) + 1,
             "b": rng.standard_normal(4).astype(dtype), "head": np.ones(2, dtype=np.float32)}
    delta = task_delta(base, tuned)
    assert sorted(delta) == ["b", "w"] and all(d.dtype == np.float32 for d in delta.values())
    assert np.array_equal(delta["w"], tuned["w"].astype(np.float32) - base["w"].astype(np.float32))
    rebuilt = apply_delta(base, delta)
    assert rebuilt["ids"] is base["ids"] and rebuilt["w"].dtype == base["w"].dtype
    assert rebuilt["w"].tobytes() == (base["w"].astype(np.float32) + delta["w"]).astype(dtype).tobytes()

    torch_base, torch_tuned = ({k: to_torch(v) for k, v in d.items()} for d in (base, tuned))
    torch_delta = task_delta(torch_base, torch_tuned)
    assert all(same_bits(torch_delta[k], delta[k]) for k in delta)
    torch_rebuilt = apply_delta(torch_base, torch_delta)
    assert torch_rebuilt["ids"] is torch_base["ids"]
    assert all(same_bits(torch_rebuilt[k], rebuilt[k]) for k in ("w", "b"))
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
