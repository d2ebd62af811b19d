"""The CPU kernel equals the reference: unified values and packed masks bit for bit, L1 sums to tolerance."""

import hypothesis.strategies as st
import numba
import pytest
import torch
from hypothesis import assume, given

from fusion import add, reference, unify
from fusion.kernels import get_kernel
from fusion.kernels.cpu import KERNEL, CpuKernel
from fusion.testing.strategies import FLOAT_DTYPES, deltas, state_dicts

# Blocks that divide nothing in particular, down to one byte of mask, and the default.
BLOCKS = st.sampled_from([8, 16, 24, 40, 96, 4096])
# Scales: ordinary; fp16-subnormal after rounding; large enough that fp16 rounding overflows to inf.
SCALES = st.sampled_from([2.0**-6, 2.0**-21, 2.0**13])
RESCALERS = st.sampled_from([0.0, 0.5, 1.0, 1.37, 3.0, 1e-3])


def assert_same(result: reference.ChunkResult, expected: reference.ChunkResult) -> None:
    """Bits of u (so -0.0 and +0.0 differ) and of the masks; L1 sums to float64 tolerance."""
    assert result.unified.dtype == torch.float32 and result.unified.shape == expected.unified.shape
    assert torch.equal(result.unified.view(torch.int32), expected.unified.view(torch.int32))
    assert result.packed_masks.dtype == torch.uint8
    assert torch.equal(result.packed_masks, expected.packed_masks)
    assert result.delta_l1.dtype == result.masked_l1.dtype == torch.float64
    torch.testing.assert_close(result.delta_l1, expected.delta_l1, rtol=1e-12, atol=0)
    torch.testing.assert_close(result.masked_l1, expected.masked_l1, rtol=1e-12, atol=0)


@st.composite
def elect_cases(draw, *, max_tasks: int = 16, max_length: int = 300):
    """(deltas (T, n), unified_dtype, block) over every input and stored dtype."""
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    stacked = draw(deltas(num_tasks=st.integers(1, max_tasks), length=st.integers(1, max_length), dtype=dtype,
                          scale=draw(SCALES)))
    return stacked, draw(st.sampled_from(FLOAT_DTYPES)), draw(BLOCKS)


@given(elect_cases())
def test_elect_equals_reference(case):
    stacked, unified_dtype, block = case
    result = CpuKernel(block=block).elect(stacked, unified_dtype=unified_dtype)
    assert_same(result, reference.elect(stacked, unified_dtype=unified_dtype))


@st.composite
def continual_cases(draw):
    """Stored state (u, packed masks, rescalers) of T_old tasks and T_new new deltas, T_old + T_new >= 1."""
    num_old, num_new = draw(st.integers(0, 8)), draw(st.integers(0, 8))
    num_new = max(num_new, 1 - num_old)
    n = draw(st.integers(1, 200))
    scale, unified_dtype = draw(SCALES), draw(st.sampled_from(FLOAT_DTYPES))
    old = draw(deltas(num_tasks=max(num_old, 1), length=n, scale=scale))
    stored = reference.elect(old, unified_dtype=unified_dtype)
    packed = stored.packed_masks[:num_old]  # (T_old, n/8)
    rescalers = torch.tensor(draw(st.lists(RESCALERS, min_size=num_old, max_size=num_old)), dtype=torch.float64)
    # The store hands u back in its own dtype or already as float32: both must work.
    stored_u = stored.unified.to(unified_dtype) if draw(st.booleans()) else stored.unified
    assume(torch.isfinite(stored_u).all())  # the engine refuses a unified delta that overflows its dtype
    new = draw(deltas(num_tasks=num_new, length=n, dtype=draw(st.sampled_from(FLOAT_DTYPES)), scale=scale))
    return (stored_u, packed, rescalers, new), unified_dtype, draw(BLOCKS)


@given(continual_cases())
def test_continual_equals_reference(case):
    inputs, unified_dtype, block = case
    result = CpuKernel(block=block).continual(*inputs, unified_dtype=unified_dtype)
    assert_same(result, reference.continual_chunk(*inputs, unified_dtype=unified_dtype))


@given(elect_cases(max_tasks=6, max_length=100))
def test_elect_negative_zero_and_float64_inputs(case):
    """-0.0 entries, float64 inputs and a non-contiguous view give the reference's bits."""
    stacked, unified_dtype, block = case
    stacked = torch.where(stacked == 0, -0.0, stacked.float()).double()  # (T, n)
    strided = torch.stack([stacked, stacked], dim=2)[:, :, 0]  # same values, stride 2
    assert strided.stride(1) == 2
    result = CpuKernel(block=block).elect(strided, unified_dtype=unified_dtype)
    assert_same(result, reference.elect(stacked, unified_dtype=unified_dtype))


def test_one_task_keeps_its_values_and_masks():
    """T = 1: u is the delta itself (zeros become -0.0, elected -1), the mask is its non-zeros."""
    delta = torch.tensor([[0.5, -0.25, 0.0, 3.0, -0.0, 1e-30, -7.0, 0.0, 2.0]])
    result = KERNEL.elect(delta)
    assert torch.equal(result.unified, delta[0])
    assert torch.equal(reference.unpack_bits(result.packed_masks, 9)[0], delta[0] != 0)
    assert result.delta_l1.tolist() == result.masked_l1.tolist() == [0.5 + 0.25 + 3.0 + 1e-30 + 7.0 + 2.0]


def test_rebuild_only_reunifies_stored_tasks():
    """T_new = 0: the stored tasks alone are rebuilt and unified again (remove, convergence)."""
    old = torch.tensor([[1.0, -2.0, 0.0, 4.0, -1.0], [2.0, 1.0, -3.0, 0.0, -1.0]])
    stored = reference.elect(old)
    rescalers = torch.tensor([1.5, 0.75], dtype=torch.float64)
    empty = torch.zeros((0, 5))
    result = KERNEL.continual(stored.unified, stored.packed_masks, rescalers, empty)
    assert_same(result, reference.continual_chunk(stored.unified, stored.packed_masks, rescalers, empty))
    assert result.packed_masks.shape == (2, 1)


def test_thread_count_changes_no_bit():
    """L1 partials are per block, summed in block order: one thread and all threads agree exactly."""
    stacked = torch.randn(5, 100_003, generator=torch.Generator().manual_seed(0))
    kernel = CpuKernel(block=1024)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = kernel.elect(stacked)
    finally:
        numba.set_num_threads(threads)
    result = kernel.elect(stacked)
    assert torch.equal(result.unified, single.unified) and torch.equal(result.packed_masks, single.packed_masks)
    assert torch.equal(result.delta_l1, single.delta_l1) and torch.equal(result.masked_l1, single.masked_l1)


@pytest.mark.parametrize("block", [0, -8, 12])
def test_bad_block_is_refused(block):
    with pytest.raises(ValueError, match="multiple of 8"):
        CpuKernel(block=block)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match=r"\(T, n\)"):
        KERNEL.elect(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="packed masks"):
        KERNEL.continual(torch.zeros(16), torch.zeros((2, 1), dtype=torch.uint8), torch.ones(2), torch.zeros(1, 16))
    with pytest.raises(ValueError, match="no stored and no new task"):
        KERNEL.continual(torch.zeros(16), torch.zeros((0, 2), dtype=torch.uint8), torch.ones(0), torch.zeros(0, 16))


def test_dispatch_gives_this_kernel():
    assert get_kernel("cpu") is KERNEL and get_kernel(device="cpu") is KERNEL
    assert KERNEL.name == "cpu"


@given(state_dicts(num_tasks=st.integers(2, 5), max_numel=70), st.sampled_from([8, 24, 64]))
def test_unify_and_add_through_the_engine(deltas_list, chunk):
    """The whole pass (chunks that do not divide the tensors, rescalers, decouple) matches the reference."""
    for mode in ("model", "tensor"):
        ref = add(unify(deltas_list[:-1], mode=mode, kernel="reference", chunk=chunk), deltas_list[-1],
                  kernel="reference", chunk=chunk)
        cpu = add(unify(deltas_list[:-1], mode=mode, kernel="cpu", chunk=chunk), deltas_list[-1],
                  kernel="cpu", chunk=chunk)
        for name in ref.names:
            assert torch.equal(cpu.unified[name].view(torch.int32), ref.unified[name].view(torch.int32))
            assert torch.equal(cpu.masks[name], ref.masks[name])
        torch.testing.assert_close(cpu.rescalers, ref.rescalers, rtol=1e-12, atol=0)


def test_kernel_leaves_torch_thread_count_alone():
    # numba's OpenMP regions share libgomp's thread count with torch; the kernel restores it.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        deltas = torch.randn(4, 50_000)
        result = KERNEL.elect(deltas)
        KERNEL.continual(result.unified, result.packed_masks, torch.ones(4), deltas[:1])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
