"""The Triton kernels equal the reference: masks and unified values bit for bit, L1 sums to tolerance.

Without CUDA the kernels run in the Triton interpreter on CPU tensors. Triton reads
TRITON_INTERPRET when a @triton.jit decorator runs, so the kernel module is imported (or
reloaded) with the variable set, and the variable is restored right after: other test modules
see the environment they started with. Triton itself is imported first, as the environment has
it (a triton imported under the variable breaks once it is unset). With CUDA the same tests run
compiled, on the GPU.
The interpreter is slow (tens of ms per task and block), hence the small sizes and example counts.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from safetensors.torch import load_file

from fusion import add, get_kernel, reference, task_delta, unify
from fusion.testing.strategies import FLOAT_DTYPES, deltas

triton = pytest.importorskip("triton")  # before the variable is set: see the module docstring

MODULE = "fusion.kernels.triton_kernels"
HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
VECTORS = Path(__file__).resolve().parents[3] / "shared" / "vectors" / "condu-v1"
UNIFIED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCKS = (8, 16, 32, 64)


def _load_kernels():
    """The kernel module, interpreted when there is no CUDA, without leaving TRITON_INTERPRET set."""
    if HAS_CUDA:
        return importlib.import_module(MODULE)
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        module = importlib.import_module(MODULE)
        if not module.is_interpreted():  # imported earlier without the interpreter
            module = importlib.reload(module)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return module


tk = _load_kernels()


def _assert_same(result, expected) -> None:
    """Bit-equal unified (signed zeros included) and masks; L1 sums to float64 tolerance."""
    assert result.unified.dtype == torch.float32 and result.unified.shape == expected.unified.shape
    assert torch.equal(result.unified.cpu().view(torch.int32), expected.unified.cpu().view(torch.int32))
    assert result.packed_masks.dtype == torch.uint8
    assert torch.equal(result.packed_masks.cpu(), expected.packed_masks.cpu())
    assert result.delta_l1.dtype == torch.float64 and result.masked_l1.dtype == torch.float64
    torch.testing.assert_close(result.delta_l1.cpu(), expected.delta_l1.cpu(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.masked_l1.cpu(), expected.masked_l1.cpu(), rtol=1e-12, atol=1e-12)


@st.composite
def task_rows(draw, *, num_tasks, length=st.integers(1, 80)):
    """Stacked deltas on the small integer grid (zeros and ties), sometimes scaled per column to
    arbitrary float32 values (rounding to fp16/bf16 then matters; a column's ties stay ties)."""
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    rows = draw(deltas(num_tasks=num_tasks, length=length, dtype=torch.float32))  # (T, n)
    if draw(st.booleans()):
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        rows = rows * (1 + torch.rand(rows.shape[1], generator=gen))  # (T, n)
    return rows.to(dtype)


@settings(max_examples=20)
@given(rows=task_rows(num_tasks=st.integers(1, 16)), unified_dtype=st.sampled_from(UNIFIED_DTYPES),
       block=st.sampled_from(BLOCKS))
def test_elect_matches_reference(rows, unified_dtype, block):
    kernel = tk.TritonKernel(block=block)
    result = kernel.elect(rows.to(DEVICE), unified_dtype=unified_dtype)
    _assert_same(result, reference.elect(rows, unified_dtype=unified_dtype))


@st.composite
def stored_states(draw):
    """A stored chunk (unified, packed masks, rescalers) of T_old tasks and T_new new deltas."""
    t_old = draw(st.integers(0, 8))
    t_new = draw(st.integers(0 if t_old else 1, 2))
    n = draw(st.integers(1, 80))
    unified_dtype = draw(st.sampled_from(UNIFIED_DTYPES))
    old = draw(task_rows(num_tasks=max(t_old, 1), length=n))  # (T_old, n)
    state = reference.elect(old, unified_dtype=unified_dtype)
    unified = state.unified.to(unified_dtype) if draw(st.booleans()) else state.unified  # as read from disk
    scale = st.floats(0.0, 4.0, allow_nan=False, width=64) | st.sampled_from([0.0, 1.0, 1.0 / 3.0])
    rescalers = torch.tensor([draw(scale) for _ in range(t_old)], dtype=torch.float64)  # (T_old,)
    new = draw(task_rows(num_tasks=t_new, length=n)) if t_new else torch.zeros((0, n))  # (T_new, n)
    return unified, state.packed_masks[:t_old], rescalers, new, unified_dtype


@settings(max_examples=20)
@given(state=stored_states(), block=st.sampled_from(BLOCKS))
def test_continual_matches_reference(state, block):
    unified, packed, rescalers, new, unified_dtype = state
    kernel = tk.TritonKernel(block=block)
    moved = [x.to(DEVICE) for x in (unified, packed, rescalers, new)]
    result = kernel.continual(*moved, unified_dtype=unified_dtype)
    _assert_same(result, reference.continual_chunk(unified, packed, rescalers, new, unified_dtype=unified_dtype))
