"""The kernel contract and dispatch, and the rebuild and fidelity fast paths against the reference.

The elect and continual fast paths are tested in test_cpu_kernel.py and test_triton_kernel.py.
"""

import math
import os
import subprocess
import sys

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given

from fusion import fidelity, reference
from fusion.dtypes import BF16, F16, F32
from fusion.kernels import SMALL_WORK, Kernel, default_kernel_name, get_kernel, preload
from fusion.kernels import cpu as cpu_module
from fusion.testing.strategies import as_dtype, deltas

HOST_KERNELS = ["reference", "cpu"]  # the triton kernel's rebuild and sums: test_triton_kernel.py
RESCALERS = st.sampled_from([0.0, 1.0, 0.5, 1.37, 1 / 3, 3.0, 1e-3]) | st.floats(0.0, 4.0)


# ---- contract and dispatch ----------------------------------------------------------------------


@pytest.mark.parametrize("name", HOST_KERNELS)
def test_every_kernel_meets_the_protocol(name):
    kernel = get_kernel(name)
    assert isinstance(kernel, Kernel) and kernel.name == name


def test_unknown_kernel_names_are_refused():
    with pytest.raises(ValueError, match="unknown kernel 'gpu'; use one of reference, cpu, triton"):
        get_kernel("gpu")
    with pytest.raises(ValueError, match="unknown kernel"):
        preload("gpu")


def test_small_work_gets_the_reference_and_large_work_the_cpu_kernel():
    assert get_kernel(work=SMALL_WORK - 1).name == "reference"
    assert get_kernel(work=SMALL_WORK).name == "cpu"
    assert get_kernel().name == "cpu"  # unknown work: the fast path
    assert get_kernel("cpu", work=10).name == "cpu"  # a name wins over the work


def test_cuda_gets_triton_whatever_the_work():
    assert default_kernel_name("cuda", work=10) == default_kernel_name("cuda:1") == "triton"
    assert default_kernel_name("cpu", work=10) == "reference"


def test_without_the_built_library_or_numba_the_reference_does_the_work():
    """Neither backend of the cpu kernel can run: the default kernel is the reference, whatever the work."""
    code = ("import sys; sys.modules['numba'] = None  # import numba fails\n"
            "from fusion.kernels import cpu_native\n"
            "cpu_native._PATH = cpu_native.Path('/nonexistent/_cpu_native.so')  # as an install without a compiler\n"
            "from fusion.kernels import get_kernel\nprint(get_kernel(work=1 << 40).name)")
    env = dict(os.environ)
    env.pop("CONDU_CPU_BACKEND", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip() == "reference"


def test_preload_loads_and_warms_the_kernel_on_another_thread():
    future = preload("cpu")
    assert future.result(timeout=600) is get_kernel("cpu")
    assert preload("reference").result(timeout=60) is get_kernel("reference")


# ---- rebuild: theta0 + lambda * M * u, bit for bit ----------------------------------------------


@st.composite
def rebuild_cases(draw):
    """base and u of any float dtype (-0.0 in the base), a mask, a rescaler."""
    rows = draw(deltas(num_tasks=3, length=st.integers(0, 90), scale=draw(st.sampled_from([2.0**-6, 2.0**-20, 0.37]))))
    base = rows[0].copy()
    base[::3] = -0.0  # theta0 + 0 turns -0.0 into +0.0 in the reference: a fast path must too
    dtypes = st.sampled_from([F32, F16, BF16])
    packed = reference.pack_bits((rows[2] != 0)[None])[0]  # (n/8,)
    return as_dtype(base, draw(dtypes)), as_dtype(rows[1], draw(dtypes)), packed, draw(RESCALERS)


@pytest.mark.parametrize("name", HOST_KERNELS)
@given(case=rebuild_cases())
def test_rebuild_equals_the_reference_bit_for_bit(name, case):
    base, unified, packed, lam = case
    expected = reference.rebuild(base, unified, packed, lam)  # (n,) float32
    got = get_kernel(name).rebuild(base, unified, packed, lam)
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert np.array_equal(got.view(np.int32), expected.view(np.int32))
    into = np.full(expected.shape, np.nan, dtype=np.float32)  # a reused output buffer
    assert get_kernel(name).rebuild(base, unified, packed, lam, out=into) is into
    assert np.array_equal(into.view(np.int32), expected.view(np.int32))
    in_place = unified.astype(np.float32)  # a caller that reads u into its output buffer first
    get_kernel(name).rebuild(base, in_place, packed, lam, out=in_place)
    assert np.array_equal(in_place.view(np.int32), expected.view(np.int32))


def test_rebuild_rule_by_hand():
    """where the bit is set: theta0 + float32(u * float32(lambda)); elsewhere theta0 + 0.0."""
    base = np.array([1.0, -0.0, 0.25, -0.0], dtype=np.float32)
    unified = np.array([3.0, 2.0, -1.0, -0.5], dtype=np.float32)
    packed = np.array([0b0101], dtype=np.uint8)  # elements 0 and 2
    lam = 1 / 3
    scaled = np.float32(3.0) * np.float32(lam)
    for name in HOST_KERNELS:
        got = get_kernel(name).rebuild(base, unified, packed, lam)
        assert got.tolist() == [np.float32(1.0) + scaled, 0.0, np.float32(0.25) - np.float32(lam), 0.0]
        assert not np.signbit(got[[1, 3]]).any()


# ---- fidelity sums and their finish ------------------------------------------------------------------


@pytest.mark.parametrize("name", HOST_KERNELS)
@given(rows=deltas(num_tasks=3, length=st.integers(0, 90), scale=0.37), dtype=st.sampled_from([F32, F16, BF16]))
def test_fidelity_sums_equal_the_reference(name, rows, dtype):
    unified, original, mask_source = as_dtype(rows[0], dtype), as_dtype(rows[1], dtype), rows[2]
    packed = reference.pack_bits((mask_source != 0)[None])[0]
    got = get_kernel(name).fidelity_sums(unified, packed, original)
    expected = reference.fidelity_sums(unified, packed, original)
    assert got.dtype == np.float64 and got.shape == (fidelity.NUM_SUMS,)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-15)


@given(rows=deltas(num_tasks=3, length=st.integers(1, 70)), lam=st.floats(0.25, 4.0))
def test_fidelity_sums_give_the_direct_cosine_and_error(rows, lam):
    unified, original = rows[0].astype(np.float64), rows[1].astype(np.float64)
    mask = rows[2] != 0
    rebuilt = np.where(mask, unified * float(np.float32(lam)), 0.0)  # lambda as decouple rounds it
    sums = reference.fidelity_sums(rows[0], reference.pack_bits(mask[None])[0], rows[1])
    cosine, rel_l2 = fidelity.finish(sums[None], np.array([lam]))
    norm = math.sqrt(float(original @ original))
    if norm > 0:
        expected = math.sqrt(float((rebuilt - original) @ (rebuilt - original))) / norm
        assert rel_l2 == pytest.approx(expected, rel=1e-9, abs=1e-12)
    if norm > 0 and rebuilt.any():
        expected = float(rebuilt @ original) / (math.sqrt(float(rebuilt @ rebuilt)) * norm)
        assert cosine == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_finish_of_an_exact_rebuild_and_of_nothing():
    exact = np.array([[4.0, 0.0, 0.0, 0.0, 4.0]])  # u = o = [2] on the mask
    assert fidelity.finish(exact, np.array([1.0])) == (1.0, 0.0)
    assert fidelity.finish(np.zeros((1, 5)), np.array([1.0])) == (1.0, 0.0)
    lost = np.array([[0.0, 0.0, 0.0, 9.0, 9.0]])  # nothing rebuilt of a nonzero delta
    assert fidelity.finish(lost, np.array([0.0])) == (0.0, 1.0)


def test_cpu_module_has_one_kernel_object():
    assert cpu_module.KERNEL is get_kernel("cpu")
