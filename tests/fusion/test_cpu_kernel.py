"""The CPU kernel equals the reference: unified values and packed masks bit for bit, L1 sums to tolerance.

Every test runs on both backends of the kernel, the native (C) and the numba one."""

import contextlib

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import assume, given

from fusion import add, reference, unify
from fusion.arrays import all_finite
from fusion.dtypes import round_through
from fusion.kernels import get_kernel
from fusion.kernels.cpu import KERNEL, CpuKernel
from fusion.testing.strategies import FLOAT_DTYPES, as_dtype, deltas, state_dicts

from .cpu_backends import BACKENDS, using_backend

# Blocks that divide nothing in particular, down to one byte of mask, and the default.
BLOCKS = st.sampled_from([8, 16, 24, 40, 96, 4096])
# Scales: ordinary; fp16-subnormal after rounding; large enough that fp16 rounding overflows to inf.
SCALES = st.sampled_from([2.0**-6, 2.0**-21, 2.0**13])
RESCALERS = st.sampled_from([0.0, 0.5, 1.0, 1.37, 3.0, 1e-3])


@pytest.fixture(scope="module", autouse=True, params=BACKENDS)
def backend(request):
    """The backend every kernel of the module uses, the shared KERNEL included."""
    with using_backend(request.param) as name:
        yield name


@contextlib.contextmanager
def one_thread(backend: str):
    """The backend runs its passes on one thread only."""
    if backend == "numba":
        import numba

        threads = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            yield
        finally:
            numba.set_num_threads(threads)
    else:
        with pytest.MonkeyPatch.context() as patch:
            from fusion.kernels import cpu_native

            patch.setattr(cpu_native, "_pool", None)  # a pool made now, for one thread
            patch.setattr(cpu_native, "_threads", lambda: 1)
            yield


def test_the_backend_asked_for_runs(backend):
    assert KERNEL.backend.NAME == backend and backend in repr(KERNEL)


def assert_same(result: reference.ChunkResult, expected: reference.ChunkResult) -> None:
    """Bits of u (so -0.0 and +0.0 differ) and of the masks; L1 sums to float64 tolerance."""
    assert result.unified.dtype == np.float32 and result.unified.shape == expected.unified.shape
    assert np.array_equal(result.unified.view(np.int32), expected.unified.view(np.int32))
    assert result.packed_masks.dtype == np.uint8
    assert np.array_equal(result.packed_masks, expected.packed_masks)
    assert result.delta_l1.dtype == result.masked_l1.dtype == np.float64
    np.testing.assert_allclose(result.delta_l1, expected.delta_l1, rtol=1e-12, atol=0)
    np.testing.assert_allclose(result.masked_l1, expected.masked_l1, rtol=1e-12, atol=0)


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
    rescalers = np.array(draw(st.lists(RESCALERS, min_size=num_old, max_size=num_old)), dtype=np.float64)
    # The store hands u back in its own dtype or already as float32: both must work.
    stored_u = as_dtype(stored.unified, unified_dtype) if draw(st.booleans()) else stored.unified
    assume(all_finite(round_through(stored.unified, unified_dtype)))  # the engine refuses an overflowing u
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
    stacked = stacked.astype(np.float32)
    stacked = np.where(stacked == 0, np.float32(-0.0), stacked).astype(np.float64)  # (T, n)
    strided = np.stack([stacked, stacked], axis=2)[:, :, 0]  # same values, stride 2
    assert strided.strides[1] == 2 * strided.itemsize
    result = CpuKernel(block=block).elect(strided, unified_dtype=unified_dtype)
    assert_same(result, reference.elect(stacked, unified_dtype=unified_dtype))


def test_one_task_keeps_its_values_and_masks():
    """T = 1: u is the delta itself (zeros become -0.0, elected -1), the mask is its non-zeros."""
    delta = np.array([[0.5, -0.25, 0.0, 3.0, -0.0, 1e-30, -7.0, 0.0, 2.0]], dtype=np.float32)
    result = KERNEL.elect(delta)
    assert np.array_equal(result.unified, delta[0])
    assert np.array_equal(reference.unpack_bits(result.packed_masks, 9)[0], delta[0] != 0)
    expected = 0.5 + 0.25 + 3.0 + float(np.float32(1e-30)) + 7.0 + 2.0
    assert result.delta_l1.tolist() == result.masked_l1.tolist() == [expected]


def test_rebuild_only_reunifies_stored_tasks():
    """T_new = 0: the stored tasks alone are rebuilt and unified again (remove, convergence)."""
    old = np.array([[1.0, -2.0, 0.0, 4.0, -1.0], [2.0, 1.0, -3.0, 0.0, -1.0]], dtype=np.float32)
    stored = reference.elect(old)
    rescalers = np.array([1.5, 0.75])
    empty = np.zeros((0, 5), dtype=np.float32)
    result = KERNEL.continual(stored.unified, stored.packed_masks, rescalers, empty)
    assert_same(result, reference.continual_chunk(stored.unified, stored.packed_masks, rescalers, empty))
    assert result.packed_masks.shape == (2, 1)


def test_thread_count_changes_no_bit(backend):
    """L1 partials are per block, summed in block order: one thread and all threads agree exactly."""
    stacked = np.random.default_rng(0).standard_normal((5, 100_003), dtype=np.float32)
    kernel = CpuKernel(block=1024)
    with one_thread(backend):
        single = kernel.elect(stacked)
    result = kernel.elect(stacked)
    assert np.array_equal(result.unified, single.unified) and np.array_equal(result.packed_masks, single.packed_masks)
    assert np.array_equal(result.delta_l1, single.delta_l1) and np.array_equal(result.masked_l1, single.masked_l1)


@pytest.mark.parametrize("block", [0, -8, 12])
def test_bad_block_is_refused(block):
    with pytest.raises(ValueError, match="multiple of 8"):
        CpuKernel(block=block)


def test_bad_inputs_are_refused():
    zeros = lambda *shape: np.zeros(shape, dtype=np.float32)  # noqa: E731
    with pytest.raises(ValueError, match=r"\(T, n\)"):
        KERNEL.elect(zeros(0, 4))
    with pytest.raises(ValueError, match="must be float, got int32"):
        KERNEL.elect(np.zeros((1, 4), dtype=np.int32))
    with pytest.raises(ValueError, match="packed masks"):
        KERNEL.continual(zeros(16), np.zeros((2, 1), dtype=np.uint8), np.ones(2), zeros(1, 16))
    with pytest.raises(ValueError, match="one rescaler per stored task"):
        KERNEL.continual(zeros(16), np.zeros((2, 2), dtype=np.uint8), np.ones(3), zeros(1, 16))
    with pytest.raises(ValueError, match="no stored and no new task"):
        KERNEL.continual(zeros(16), np.zeros((0, 2), dtype=np.uint8), np.ones(0), zeros(0, 16))


def test_dispatch_gives_this_kernel():
    assert get_kernel("cpu") is KERNEL and get_kernel(device="cpu", work=1 << 30) is KERNEL
    assert KERNEL.name == "cpu"


@given(state_dicts(num_tasks=st.integers(2, 5), max_numel=70), st.sampled_from([8, 24, 64]))
def test_unify_and_add_through_the_engine(deltas_list, chunk):
    """The whole pass (chunks that do not divide the tensors, rescalers, decouple) matches the reference."""
    for mode in ("model", "tensor"):
        ref = add(unify(deltas_list[:-1], rescaler=mode, kernel="reference", chunk=chunk), deltas_list[-1],
                  kernel="reference", chunk=chunk)
        cpu = add(unify(deltas_list[:-1], rescaler=mode, kernel="cpu", chunk=chunk), deltas_list[-1],
                  kernel="cpu", chunk=chunk)
        for name in ref.names:
            assert np.array_equal(cpu.unified[name].view(np.int32), ref.unified[name].view(np.int32))
            assert np.array_equal(cpu.masks[name], ref.masks[name])
            for task in range(1, ref.num_tasks + 1):
                assert np.array_equal(cpu.decouple(task)[name].view(np.int32), ref.decouple(task)[name].view(np.int32))
        np.testing.assert_allclose(cpu.rescalers, ref.rescalers, rtol=1e-12, atol=0)


def test_kernel_leaves_torch_thread_count_alone():
    # numba's OpenMP regions share libgomp's thread count with torch; the kernel restores it.
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        deltas = np.random.default_rng(0).standard_normal((4, 50_000), dtype=np.float32)
        result = KERNEL.elect(deltas)
        KERNEL.continual(result.unified, result.packed_masks, np.ones(4), deltas[:1])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# ---- theta0 subtracted inside the pass, and fidelity measured in it ---------------------------------


def _originals(draw, num_tasks: int, num_new: int, n: int, scale: float) -> reference.Originals:
    """Measure some tasks: new ones against their own row, stored ones against drawn originals or their
    own (rebuilt) row; and maybe every task against its own row too (drift)."""
    num_old = num_tasks - num_new
    rows = draw(deltas(num_tasks=max(num_old, 1), length=n, scale=scale))
    index = [draw(st.sampled_from([reference.NOT_MEASURED, reference.OWN_ROW, i])) for i in range(num_old)]
    index += [draw(st.sampled_from([reference.NOT_MEASURED, reference.OWN_ROW])) for _ in range(num_new)]
    return reference.Originals(rows, np.array(index, dtype=np.int64), drift=draw(st.booleans()))


def assert_same_fidelity(result: reference.ChunkResult, expected: reference.ChunkResult) -> None:
    assert_same(result, expected)
    assert result.fidelity.shape == expected.fidelity.shape
    np.testing.assert_allclose(result.fidelity, expected.fidelity, rtol=1e-10, atol=1e-12)
    assert (result.drift is None) == (expected.drift is None)
    if expected.drift is not None:
        assert result.drift.shape == expected.drift.shape == (len(expected.packed_masks), 5)
        np.testing.assert_allclose(result.drift, expected.drift, rtol=1e-10, atol=1e-12)


@given(data=st.data(), block=BLOCKS)
def test_elect_with_base_and_originals_equals_reference(data, block):
    stacked, unified_dtype, _ = data.draw(elect_cases(max_tasks=8, max_length=200))
    assume(all_finite(stacked))  # fidelity is measured on finite deltas only: a pass refuses the others
    assume(all_finite(reference.elect(stacked, unified_dtype=unified_dtype).unified))  # and on a representable u
    t, n = stacked.shape
    base = data.draw(deltas(num_tasks=1, length=n, scale=2.0**-3))[0]  # (n,)
    weights = stacked.astype(np.float32) + base  # what a checkpoint holds
    originals = _originals(data.draw, t, t, n, 2.0**-6)
    result = CpuKernel(block=block).elect(weights, unified_dtype=unified_dtype, base=base, originals=originals)
    assert_same_fidelity(result, reference.elect(weights, unified_dtype=unified_dtype, base=base, originals=originals))


@given(data=st.data())
def test_continual_with_base_and_originals_equals_reference(data):
    (stored_u, packed, rescalers, new), unified_dtype, block = data.draw(continual_cases())
    assume(all_finite(new))
    n = np.size(stored_u)
    base = data.draw(deltas(num_tasks=1, length=n, scale=2.0**-3))[0]
    weights = new.astype(np.float32) + base
    originals = _originals(data.draw, len(packed) + len(new), len(new), n, 2.0**-6)
    args = (stored_u, packed, rescalers, weights)
    options = dict(unified_dtype=unified_dtype, base=base, originals=originals)
    assert_same_fidelity(CpuKernel(block=block).continual(*args, **options), reference.continual_chunk(*args, **options))


def test_float16_rounding_in_the_pass_equals_numpy_on_every_kind_of_value():
    """The pass rounds u to float16 by bits (numba has no float16): ties, subnormals, overflow."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 400_000, dtype=np.uint64).astype(np.uint32)
    values = bits.view(np.float32)
    values = np.concatenate([values[np.isfinite(values)],
                             np.float32(2.0**-24) * np.arange(-64, 64, 0.5, dtype=np.float32),  # subnormal ties
                             np.array([65504, 65519.99, 65520, 1e9, 0.0, -0.0], dtype=np.float32)])
    values = values[None, :]  # one task: u is each value's rounding (-0.0 where it is not positive-or-negative)
    assert_same(KERNEL.elect(values, unified_dtype="float16"), reference.elect(values, unified_dtype="float16"))
