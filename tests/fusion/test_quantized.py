"""The compact storage of the unified delta: int8 and int4 blocks of 64 elements with float32 scales.

The rule (fusion.reference.quantize_blocks), its byte layout (fusion.dtypes.encode_blocks), the
unify pass that rounds u to it before the masked L1 sums, and the cpu kernel on both backends
(native C and numba) equal to the reference bit for bit: dequantized u, block scales and masks.
The Triton kernel's equality is in test_quantized_triton.py."""

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given

from fusion import reference
from fusion.dtypes import (F16, QUANT_BLOCK, Q4, Q8, BlockQuant, decode_blocks, dequantize_raw, encode_blocks,
                           unified_form)
from fusion.engine import ChunkInputs, TensorSpec, fuse_pass
from fusion.errors import InputError
from fusion.kernels.cpu import KERNEL, CpuKernel
from fusion.testing.strategies import FLOAT_DTYPES, as_dtype, deltas

from .cpu_backends import BACKENDS, using_backend

FORMS = (Q8, Q4)
# Kernel blocks that hold whole quantization blocks: one, two, and the default.
BLOCKS = st.sampled_from([64, 128, 4096])


@st.composite
def chunks(draw, *, max_length: int = 300):
    """float32 values (n,) from a block boundary on: ordinary, with exact zeros, whole zero blocks,
    blocks too small for a normal scale, and blocks whose values span many binades."""
    n = draw(st.integers(1, max_length))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    x = rng.normal(size=n).astype(np.float32) * np.float32(draw(st.sampled_from([1e-3, 1.0, 3e4, 1e-37])))
    kind = draw(st.sampled_from(["plain", "zeros", "spread", "tiny-block"]))
    if kind == "zeros":
        x[rng.random(n) < 0.5] = 0.0
        x[: min(n, QUANT_BLOCK)] = 0.0  # a whole zero block
    elif kind == "spread":
        x *= (2.0 ** rng.integers(-30, 10, n)).astype(np.float32)
    elif kind == "tiny-block":
        x[: min(n, QUANT_BLOCK)] *= np.float32(1e-38)  # max / qmax below the smallest normal float32
    return x


def bits(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).view(np.uint32)


# ---- the rule ------------------------------------------------------------------------------------


@given(x=chunks(), form=st.sampled_from(FORMS))
def test_codes_and_scales_follow_the_rule(x, form):
    codes, scales = reference.quantize_blocks(x, form)
    assert codes.dtype == np.int8 and codes.shape == x.shape
    assert scales.dtype == np.float32 and scales.shape == (-(-x.size // form.block),)
    assert (np.abs(codes.astype(np.int16)) <= form.qmax).all()
    for k, scale in enumerate(scales):
        block, block_codes = x[k * form.block : (k + 1) * form.block], codes[k * form.block : (k + 1) * form.block]
        expected = np.float32(np.abs(block).max()) / np.float32(form.qmax)
        if expected < np.float32(2.0**-126):  # stored as zeros, so every code * scale is 0 or normal
            assert scale == 0 and not block_codes.any()
            continue
        assert scale == expected
        assert np.abs(block_codes).max() == form.qmax  # the block's largest |x| codes to +-qmax
        steps = block / scale  # float32 division, as every kernel does it
        assert (np.abs(steps - block_codes) <= 0.5).all()  # rounded to the nearest code
        ties = np.abs(steps - np.trunc(steps)) == 0.5
        assert (block_codes[ties] % 2 == 0).all()  # halves go to the even code


def test_a_worked_example_of_codes_scales_and_bytes():
    x = np.array([0.7, -0.35, 0.05, 0.0, 0.25], dtype=np.float32)
    codes, scales = reference.quantize_blocks(x, Q4)
    assert scales.tolist() == [np.float32(0.7) / np.float32(7)]
    assert codes.tolist() == [7, -4, 0, 0, 2]  # -0.35 / 0.1 = -3.5: half to even, -4
    raw = encode_blocks(codes, scales, Q4)
    # the scale's four little-endian bytes, then codes + 8 two a byte, low nibble first (an odd count's
    # last high nibble holds code 0)
    assert raw.tolist() == [*scales.view(np.uint8).tolist(), 15 | (4 << 4), 8 | (8 << 4), 10 | (8 << 4)]
    assert Q4.nbytes(5) == raw.size == 7 and Q8.nbytes(5) == 9
    assert Q8.nbytes(3 * 64) == 3 * 68 and Q4.nbytes(3 * 64 + 1) == 3 * 36 + 5


@given(x=chunks(), form=st.sampled_from(FORMS))
def test_records_give_back_codes_scales_and_values(x, form):
    codes, scales = reference.quantize_blocks(x, form)
    raw = encode_blocks(codes, scales, form)
    assert raw.dtype == np.uint8 and raw.size == form.nbytes(x.size)
    back_codes, back_scales = decode_blocks(raw, x.size, form)
    assert np.array_equal(back_codes, codes) and np.array_equal(bits(back_scales), bits(scales))
    values = reference.dequantize_blocks(codes, scales, form)
    assert np.array_equal(bits(dequantize_raw(raw, x.size, form)), bits(values))
    # a read from any block boundary decodes the same values
    lo = (x.size // 2) // form.block * form.block
    part = raw[slice(*form.byte_range(lo, x.size, x.size))]
    assert np.array_equal(bits(dequantize_raw(part, x.size - lo, form)), bits(values[lo:]))


def test_a_read_that_cuts_a_block_is_refused():
    with pytest.raises(InputError, match="multiple of 64"):
        Q8.byte_range(32, 128, 200)
    with pytest.raises(InputError, match="multiple of 64"):
        Q4.byte_range(0, 100, 200)
    assert Q4.byte_range(64, 200, 200) == (36, Q4.nbytes(200))


def test_forms_by_name_and_code():
    assert unified_form("int8") is Q8 and unified_form("Q4") is Q4 and unified_form(Q8) is Q8
    assert unified_form("float16") is F16
    with pytest.raises(InputError, match="or the blocks of int8 or int4"):
        unified_form("int16")


# ---- the pass --------------------------------------------------------------------------------------


@st.composite
def stacked(draw, *, max_tasks: int = 8, max_length: int = 300):
    """Deltas (T, n) on the small integer grid (ties of codes), or scaled per column to arbitrary
    values, in any input dtype."""
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    rows = draw(deltas(num_tasks=st.integers(1, max_tasks), length=st.integers(1, max_length),
                       scale=draw(st.sampled_from([2.0**-6, 2.0**-21, 2.0**10]))))  # (T, n) float32
    if draw(st.booleans()):
        rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
        rows = rows * (1 + rng.random(rows.shape[1], dtype=np.float32))
    return as_dtype(rows, dtype)


@given(rows=stacked(), form=st.sampled_from(FORMS))
def test_elect_stores_u_quantized_before_the_masked_sums(rows, form):
    plain = reference.elect(rows)  # u in float32
    result = reference.elect(rows, unified_dtype=form.name)
    codes, scales = reference.quantize_blocks(plain.unified, form)
    assert np.array_equal(bits(result.scales), bits(scales))
    assert np.array_equal(bits(result.unified), bits(reference.dequantize_blocks(codes, scales, form)))
    assert np.array_equal(result.packed_masks, plain.packed_masks)  # masks do not depend on u's form
    masks = reference.unpack_bits(result.packed_masks, result.unified.size)
    expected = np.where(masks, np.abs(result.unified), 0).astype(np.float64).sum(axis=1)
    np.testing.assert_allclose(result.masked_l1, expected, rtol=1e-12, atol=0)  # on the stored values
    assert reference.elect(rows, unified_dtype="float32").scales is None


@given(rows=stacked(max_tasks=6), form=st.sampled_from(FORMS), steps=st.integers(1, 3))
def test_rebuilds_never_change_sign_through_quantized_steps(rows, form, steps):
    """Lemma F.1 with a quantized u: a rebuilt delta keeps its sign or becomes 0, and 0 stays 0."""
    state = reference.elect(rows, unified_dtype=form)
    rescalers = np.ones(len(rows))
    before = np.sign(reference.reconstruct_all(state.unified, state.packed_masks, rescalers))
    for _ in range(steps):
        state = reference.continual_chunk(state.unified, state.packed_masks, rescalers, np.zeros((0, rows.shape[1])),
                                          unified_dtype=form)
        after = np.sign(reference.reconstruct_all(state.unified, state.packed_masks, rescalers))
        assert ((after == before) | (after == 0)).all()
        before = after


# ---- the cpu kernel, both backends -------------------------------------------------------------------


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    """The backend of the cpu kernels of the tests that take it (the shared KERNEL's too)."""
    with using_backend(request.param) as name:
        yield name


def assert_same(result: reference.ChunkResult, expected: reference.ChunkResult) -> None:
    """Bits of u and of its block scales, masks; L1 sums to float64 tolerance."""
    assert np.array_equal(bits(result.unified), bits(expected.unified))
    assert result.scales.dtype == np.float32 and np.array_equal(bits(result.scales), bits(expected.scales))
    assert np.array_equal(result.packed_masks, expected.packed_masks)
    np.testing.assert_allclose(result.delta_l1, expected.delta_l1, rtol=1e-12, atol=0)
    np.testing.assert_allclose(result.masked_l1, expected.masked_l1, rtol=1e-12, atol=0)


@given(rows=stacked(max_tasks=12), form=st.sampled_from(FORMS), block=BLOCKS)
def test_cpu_elect_equals_the_reference(backend, rows, form, block):
    kernel = CpuKernel(block=block, backend=backend)
    assert_same(kernel.elect(rows, unified_dtype=form), reference.elect(rows, unified_dtype=form))


@given(old=stacked(max_tasks=6), form=st.sampled_from(FORMS), block=BLOCKS, data=st.data())
def test_cpu_continual_step_equals_the_reference(backend, old, form, block, data):
    stored = reference.elect(old, unified_dtype=form)  # u as a store reads it back: code * scale
    rescalers = np.array([data.draw(st.sampled_from([0.0, 0.5, 1.0, 1.37, 3.0])) for _ in range(len(old))])
    new = data.draw(st.sampled_from([0, 1, 2]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    rows = (rng.normal(size=(new, old.shape[1])) * 1e-3).astype(np.float32)  # (T_new, n)
    kernel = CpuKernel(block=block, backend=backend)
    args = (stored.unified, stored.packed_masks, rescalers, rows)
    assert_same(kernel.continual(*args, unified_dtype=form), reference.continual_chunk(*args, unified_dtype=form))


def test_cpu_kernel_refuses_a_block_that_cuts_quantization_blocks(backend):
    rows = np.ones((2, 100), dtype=np.float32)
    with pytest.raises(InputError, match="multiple of 64"):
        CpuKernel(block=96, backend=backend).elect(rows, unified_dtype=Q8)
    CpuKernel(block=96, backend=backend).elect(rows, unified_dtype="bfloat16")  # float forms: any block


def test_a_pass_refuses_chunks_that_cut_quantization_blocks(backend):
    spec = TensorSpec("w", 200, "int4")
    assert isinstance(spec.unified_dtype, BlockQuant)

    def read(name, lo, hi, slot):
        return ChunkInputs(np.zeros((1, hi - lo), np.float32))

    with pytest.raises(InputError, match="multiple of 64"):
        fuse_pass([spec], num_tasks=1, read=read, emit=lambda *a: None, kernel=KERNEL, chunk=96)
    fuse_pass([spec], num_tasks=1, read=read, emit=lambda *a: None, kernel=KERNEL, chunk=128)


def test_the_command_line_offers_every_storage_form():
    from fusion.cli import UNIFIED_DTYPES
    from fusion.dtypes import UNIFIED_NAMES

    assert UNIFIED_DTYPES == UNIFIED_NAMES == ("float32", "float16", "bfloat16", "int8", "int4")
