"""The Triton kernels store a block-quantized u as the reference does: dequantized values, block
scales and masks bit for bit (fusion.reference.quantize_blocks), elect and the continual step.

Run as test_triton_kernel.py runs: in the Triton interpreter on CPU tensors (TRITON_INTERPRET is
set while the kernel module is imported: fusion.testing.triton), compiled on a GPU where CUDA is.
The interpreter is slow, hence the small sizes and example counts."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

from fusion import reference
from fusion.dtypes import Q4, Q8
from fusion.errors import InputError
from fusion.testing.strategies import deltas
from fusion.testing.triton import kernel_module

triton = pytest.importorskip("triton")  # before the variable is set (test_triton_kernel.py says why)
torch = pytest.importorskip("torch")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
L1_RTOL = 10 * 2.0**-24  # float32 partials per block (test_triton_kernel.py)
tk = kernel_module()


def bits(x) -> np.ndarray:
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
    return np.asarray(x, dtype=np.float32).view(np.uint32)


@st.composite
def rows(draw, *, num_tasks, length=st.integers(1, 200)):
    """float32 deltas (T, n) on the integer grid, or scaled per column to arbitrary values."""
    values = draw(deltas(num_tasks=num_tasks, length=length, scale=draw(st.sampled_from([2.0**-6, 2.0**-21]))))
    if draw(st.booleans()):
        rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
        values = values * (1 + rng.random(values.shape[1], dtype=np.float32))
    return values


def assert_same(result, expected) -> None:
    assert np.array_equal(bits(result.unified), bits(expected.unified))
    assert result.scales is not None and np.array_equal(bits(result.scales), bits(expected.scales))
    assert np.array_equal(result.packed_masks.cpu().numpy(), expected.packed_masks)
    np.testing.assert_allclose(result.masked_l1.cpu().numpy(), expected.masked_l1, rtol=L1_RTOL, atol=1e-30)


@settings(max_examples=15)
@given(stacked=rows(num_tasks=st.integers(1, 6)), form=st.sampled_from([Q8, Q4]), block=st.sampled_from([64, 128]))
def test_elect_matches_the_reference(stacked, form, block):
    result = tk.TritonKernel(block=block).elect(torch.from_numpy(stacked).to(DEVICE), unified_dtype=form)
    assert_same(result, reference.elect(stacked, unified_dtype=form))


@settings(max_examples=15)
@given(old=rows(num_tasks=st.integers(1, 5)), form=st.sampled_from([Q8, Q4]), data=st.data())
def test_continual_step_matches_the_reference(old, form, data):
    stored = reference.elect(old, unified_dtype=form)
    rescalers = np.array([data.draw(st.sampled_from([0.0, 0.5, 1.0, 1.37])) for _ in range(len(old))])
    new = old[:data.draw(st.integers(0, 1))] * np.float32(-0.5)  # (T_new, n)
    args = (stored.unified, stored.packed_masks, rescalers, new)
    result = tk.TritonKernel(block=64).continual(*(torch.from_numpy(np.asarray(a)).to(DEVICE) for a in args),
                                                  unified_dtype=form)
    assert_same(result, reference.continual_chunk(*args, unified_dtype=form))


def test_a_block_smaller_than_a_quantization_block_is_refused():
    with pytest.raises(InputError, match="at least 64"):
        tk.TritonKernel(block=32).elect(torch.ones((1, 70), device=DEVICE), unified_dtype="int8")
