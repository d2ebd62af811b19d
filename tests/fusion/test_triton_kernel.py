"""The Triton kernels equal the reference: masks and unified values bit for bit, L1 sums to tolerance.

The kernels take torch tensors; the reference (numpy) gets the same values as float32 arrays.
L1 sums come from float32 partials per block (summed in float64 on the host): their tolerance is
the float32 tree-sum bound, ceil(log2 BLOCK) roundings of 2**-24 (at most 6 * 2**-24 here).
Rebuilt weights and fidelity sums (torch operations on the device) are tested against the
reference too, and so is the in-memory API on the Triton path.

Without CUDA the kernels run in the Triton interpreter on CPU tensors. Triton reads
TRITON_INTERPRET when a @triton.jit decorator runs, so the kernel module is imported (or
reloaded) with the variable set, and the variable is restored right after: other test modules
see the environment they started with. Triton itself is imported first, as the environment has
it (a triton imported under the variable breaks once it is unset). With CUDA the same tests run
compiled, on the GPU.
The interpreter is slow (milliseconds per task and block), hence the small sizes and example counts.
"""

from __future__ import annotations

import importlib
import json

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from fusion import add, get_kernel, reference, remove, unify
from fusion.dtypes import BF16, F16, F32
from fusion.kernels import Kernel
from fusion.testing.strategies import deltas, state_dicts
from fusion.testing.triton import kernel_module
from fusion.testing.vectors import MODES, assert_rebuilds_match, assert_unified_matches, requires_vectors, vector_deltas

triton = pytest.importorskip("triton")  # before the variable is set: see the module docstring

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
UNIFIED_DTYPES = (F32, F16, BF16)
TORCH_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCKS = (8, 16, 32, 64)
L1_RTOL = 10 * 2.0**-24  # float32 partials over blocks of at most 1024 elements (the default): log2(1024) roundings


tk = kernel_module()


def host(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's values as a numpy array for the reference: fp16/bf16 as float32 (exact), others as they are."""
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor).numpy()


def _assert_same(result, expected) -> None:
    """Bit-equal unified (signed zeros included) and masks; L1 sums to the float32 partials' bound."""
    assert isinstance(result.unified, torch.Tensor) and result.unified.dtype == torch.float32
    assert result.unified.shape == expected.unified.shape
    assert np.array_equal(host(result.unified).view(np.int32), expected.unified.view(np.int32))
    assert result.packed_masks.dtype == torch.uint8
    assert np.array_equal(host(result.packed_masks), expected.packed_masks)
    assert result.delta_l1.dtype == torch.float64 and result.masked_l1.dtype == torch.float64
    np.testing.assert_allclose(host(result.delta_l1), expected.delta_l1, rtol=L1_RTOL, atol=1e-30)
    np.testing.assert_allclose(host(result.masked_l1), expected.masked_l1, rtol=L1_RTOL, atol=1e-30)


@st.composite
def task_rows(draw, *, num_tasks, length=st.integers(1, 80)):
    """Stacked deltas on the small integer grid (zeros and ties), sometimes scaled per column to
    arbitrary float32 values (rounding to fp16/bf16 then matters; a column's ties stay ties)."""
    dtype = draw(st.sampled_from(TORCH_DTYPES))
    rows = draw(deltas(num_tasks=num_tasks, length=length))  # (T, n) float32
    if draw(st.booleans()):
        rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
        rows = rows * (1 + rng.random(rows.shape[1], dtype=np.float32))  # (T, n)
    return torch.from_numpy(rows).to(dtype)


@settings(max_examples=20)
@given(rows=task_rows(num_tasks=st.integers(1, 16)), unified_dtype=st.sampled_from(UNIFIED_DTYPES),
       block=st.sampled_from(BLOCKS))
def test_elect_matches_reference(rows, unified_dtype, block):
    kernel = tk.TritonKernel(block=block)
    result = kernel.elect(rows.to(DEVICE), unified_dtype=unified_dtype)
    _assert_same(result, reference.elect(host(rows), unified_dtype=unified_dtype))


def stored_tensors(rows: torch.Tensor, unified_dtype, *, stored_dtype: bool = False):
    """(unified, packed masks) of rows unified by the reference, as tensors; u in its stored dtype if asked."""
    state = reference.elect(host(rows), unified_dtype=unified_dtype)
    unified = torch.from_numpy(state.unified)
    if stored_dtype:  # as read from disk
        unified = unified.to(TORCH_DTYPES[UNIFIED_DTYPES.index(unified_dtype)])
    return unified, torch.from_numpy(state.packed_masks)


@st.composite
def stored_states(draw):
    """A stored chunk (unified, packed masks, rescalers) of T_old tasks and T_new new deltas."""
    t_old = draw(st.integers(0, 8))
    t_new = draw(st.integers(0 if t_old else 1, 2))
    n = draw(st.integers(1, 80))
    unified_dtype = draw(st.sampled_from(UNIFIED_DTYPES))
    old = draw(task_rows(num_tasks=max(t_old, 1), length=n))  # (T_old, n)
    unified, packed = stored_tensors(old, unified_dtype, stored_dtype=draw(st.booleans()))
    scale = st.floats(0.0, 4.0, allow_nan=False, width=64) | st.sampled_from([0.0, 1.0, 1.0 / 3.0])
    rescalers = np.array([draw(scale) for _ in range(t_old)], dtype=np.float64)  # (T_old,)
    rescalers = torch.from_numpy(rescalers) if draw(st.booleans()) else rescalers  # the host's table may be numpy
    new = draw(task_rows(num_tasks=t_new, length=n)) if t_new else torch.zeros((0, n))  # (T_new, n)
    return unified, packed[:t_old], rescalers, new, unified_dtype


def _on_device(x):
    return x.to(DEVICE) if isinstance(x, torch.Tensor) else x


@settings(max_examples=20)
@given(state=stored_states(), block=st.sampled_from(BLOCKS))
def test_continual_matches_reference(state, block):
    unified, packed, rescalers, new, unified_dtype = state
    kernel = tk.TritonKernel(block=block)
    result = kernel.continual(*[_on_device(x) for x in (unified, packed, rescalers, new)], unified_dtype=unified_dtype)
    expected = reference.continual_chunk(host(unified), host(packed), np.asarray(rescalers), host(new),
                                         unified_dtype=unified_dtype)
    _assert_same(result, expected)


@pytest.mark.parametrize("dtype, unified_dtype", list(zip(TORCH_DTYPES, (torch.bfloat16, torch.float32, torch.float16))))
def test_sixteen_tasks_in_every_input_dtype(dtype, unified_dtype):
    """The largest task count of the property tests, every input dtype, whatever the draw; the
    stored dtype given as a torch dtype (parse_dtype reads it)."""
    gen = torch.Generator().manual_seed(16)
    rows = (torch.randint(-4, 5, (16, 77), generator=gen) * (1 + torch.rand(77, generator=gen))).to(dtype)  # (16, n)
    result = tk.TritonKernel(block=32).elect(rows.to(DEVICE), unified_dtype=unified_dtype)
    _assert_same(result, reference.elect(host(rows), unified_dtype=unified_dtype))
    unified, packed = stored_tensors(rows[:15], unified_dtype)
    args = (unified, packed, torch.linspace(0.25, 2.0, 15, dtype=torch.float64), rows[15:])
    result = tk.TritonKernel(block=32).continual(*[x.to(DEVICE) for x in args], unified_dtype=unified_dtype)
    _assert_same(result, reference.continual_chunk(*[host(x) for x in args], unified_dtype=unified_dtype))


@pytest.mark.parametrize("t_old, t_new", [(0, 40), (39, 1)])
def test_tasks_beyond_the_sign_bit_registers(t_old, t_new):
    """From task 32 on, signs do not fit the int32 bit registers and the rows are read again."""
    t = t_old + t_new
    assert t > tk.BIT_TASKS
    gen = torch.Generator().manual_seed(t)
    rows = torch.randint(-2, 3, (t, 21), generator=gen).float() * 0.25  # (T, n): many zeros and ties
    if t_old == 0:
        _assert_same(tk.TritonKernel(block=32).elect(rows.to(DEVICE)), reference.elect(host(rows)))
        return
    unified, packed = stored_tensors(rows[:t_old], F32)
    rescalers = torch.rand(t_old, generator=gen, dtype=torch.float64) + 0.5  # (T_old,)
    args = (unified, packed, rescalers, rows[t_old:])
    result = tk.TritonKernel(block=32).continual(*[x.to(DEVICE) for x in args])
    _assert_same(result, reference.continual_chunk(*[host(x) for x in args]))


def test_sign_tie_elects_minus_one_and_zeros_set_no_mask():
    rows = torch.tensor([[0.5, 0.0, 0.0, 1.0], [-0.5, 0.0, -2.0, 0.0], [0.0, 0.0, 2.0, -1.0]])  # (3, 4)
    result = tk.TritonKernel(block=8).elect(rows.to(DEVICE))
    _assert_same(result, reference.elect(host(rows)))
    masks = reference.unpack_bits(host(result.packed_masks), 4)  # (3, 4)
    assert masks[:, 0].tolist() == [False, True, False]  # the tie at 0 elects -1: only the negative task
    assert not masks[:, 1].any()  # an all-zero column sets no mask...
    assert result.unified.cpu().view(torch.int32)[1] == torch.tensor(-0.0).view(torch.int32)  # ...and u = -0.0
    assert masks[:, 2].tolist() == [False, True, False] and result.unified[2] == -2.0  # -2 + 2 = 0 elects -1
    assert masks[:, 3].tolist() == [False, False, True] and result.unified[3] == -1.0


def test_all_zero_deltas():
    rows = torch.zeros((5, 19))
    result = tk.TritonKernel(block=16).elect(rows.to(DEVICE), unified_dtype=BF16)
    _assert_same(result, reference.elect(host(rows), unified_dtype=BF16))
    assert not result.packed_masks.any() and not result.masked_l1.any() and not result.delta_l1.any()


@pytest.mark.parametrize("unified_dtype", [torch.bfloat16, torch.float16])
def test_unified_rounds_to_nearest_even(unified_dtype):
    """Halfway cases of the store's dtype round to the even neighbour, as torch's `.to()` does."""
    ulp = 2.0 ** (-7 if unified_dtype == torch.bfloat16 else -10)  # spacing just above 1.0
    values = torch.tensor([1 + ulp / 2, 1 + 3 * ulp / 2, -(1 + ulp / 2), 1 + ulp / 4, 3e-41, 65519.0])  # (6,)
    rows = values.unsqueeze(0)  # (1, 6)
    result = tk.TritonKernel(block=8).elect(rows.to(DEVICE), unified_dtype=unified_dtype)
    expected = values.to(unified_dtype).float()
    assert torch.equal(result.unified.cpu().view(torch.int32), expected.view(torch.int32))
    _assert_same(result, reference.elect(host(rows), unified_dtype=unified_dtype))


def test_empty_chunk_and_a_flat_new_delta():
    empty = tk.KERNEL.elect(torch.zeros((3, 0), device=DEVICE))
    assert empty.unified.shape == (0,) and empty.packed_masks.shape == (3, 0) and empty.delta_l1.tolist() == [0.0] * 3
    unified, packed = stored_tensors(torch.tensor([[1.0, -2.0, 3.0]]), F32)
    flat = torch.tensor([-1.0, 2.0, 0.5])  # (n,): one new task
    args = (unified, packed, torch.tensor([1.0], dtype=torch.float64))
    _assert_same(tk.KERNEL.continual(*args, flat), reference.continual_chunk(*[host(x) for x in (*args, flat)]))


def test_packed_masks_may_be_a_byte_slice():
    """The store hands over a column slice of a wider packed table: not contiguous."""
    gen = torch.Generator().manual_seed(3)
    rows = torch.randint(-3, 4, (4, 48), generator=gen).float()  # (T, n)
    unified, packed = stored_tensors(rows, F32)
    lo, hi = 16, 40  # elements; bytes 2..5
    packed = packed[:, lo // 8:hi // 8]
    assert not packed.is_contiguous()
    args = (unified[lo:hi], packed, torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=torch.float64), rows[:1, lo:hi])
    _assert_same(tk.TritonKernel(block=16).continual(*args), reference.continual_chunk(*[host(x) for x in args]))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAS_CUDA else []))
def test_results_come_back_on_the_inputs_device(device):
    rows = torch.tensor([[1.0, -1.0, 0.5], [0.5, 2.0, -0.5]], device=device)  # (2, 3)
    result = tk.KERNEL.elect(rows)
    assert {x.device.type for x in result if x is not None} == {device}
    again = tk.KERNEL.continual(result.unified, result.packed_masks, torch.ones(2, dtype=torch.float64), rows[:1])
    assert {x.device.type for x in again if x is not None} == {device}


def test_bad_inputs_are_rejected_with_a_clear_message():
    kernel = tk.KERNEL
    with pytest.raises(ValueError, match="shape \\(T, n\\)"):
        kernel.elect(torch.zeros(5))
    with pytest.raises(ValueError, match="floating-point"):
        kernel.elect(torch.zeros((2, 5), dtype=torch.int32))
    with pytest.raises(ValueError, match="at least one task"):
        kernel.elect(torch.zeros((0, 5)))
    with pytest.raises(ValueError, match="unified_dtype torch.int8: dtype int8 cannot hold a delta"):
        kernel.elect(torch.zeros((1, 5)), unified_dtype=torch.int8)
    unified, packed, rescalers = torch.zeros(9), torch.zeros((2, 2), dtype=torch.uint8), torch.ones(2)
    with pytest.raises(ValueError, match="packed_masks"):
        kernel.continual(unified, packed[:, :1], rescalers, torch.zeros((1, 9)))
    with pytest.raises(ValueError, match="rescalers"):
        kernel.continual(unified, packed, rescalers[:1], torch.zeros((1, 9)))
    with pytest.raises(ValueError, match="new_deltas"):
        kernel.continual(unified, packed, rescalers, torch.zeros((1, 8)))
    with pytest.raises(ValueError, match="both are empty"):
        kernel.continual(unified, packed[:0], rescalers[:0], torch.zeros((0, 9)))
    with pytest.raises(ValueError, match="power of two"):
        tk.TritonKernel(block=24)


def test_dispatch_loads_this_kernel():
    kernel = get_kernel("triton")
    assert kernel is tk.KERNEL and kernel.name == "triton" and isinstance(kernel, Kernel)
    if HAS_CUDA:
        assert get_kernel(device="cuda") is tk.KERNEL


# ---- rebuild and fidelity sums: torch operations on the device, the reference's bits ------------------


@settings(max_examples=30)
@given(rows=deltas(num_tasks=3, length=st.integers(0, 90), scale=0.37), lam=st.floats(0.0, 4.0),
       dtypes=st.tuples(st.sampled_from(TORCH_DTYPES), st.sampled_from(TORCH_DTYPES)))
def test_rebuild_equals_the_reference_bit_for_bit(rows, lam, dtypes):
    base = torch.from_numpy(rows[0]).to(dtypes[0])
    base[::3] = -0.0  # theta0 + 0 turns -0.0 into +0.0
    unified = torch.from_numpy(rows[1]).to(dtypes[1])
    packed = torch.from_numpy(reference.pack_bits((rows[2] != 0)[None])[0])  # (n/8,)
    expected = reference.rebuild(host(base), host(unified), host(packed), lam)
    got = tk.KERNEL.rebuild(base.to(DEVICE), unified.to(DEVICE), packed.to(DEVICE), lam)
    assert got.dtype == torch.float32 and got.device.type == DEVICE.type
    assert np.array_equal(host(got).view(np.int32), expected.view(np.int32))
    in_place = unified.float().to(DEVICE).clone()  # a caller that reads u into its output buffer first
    tk.KERNEL.rebuild(base.to(DEVICE), in_place, packed.to(DEVICE), lam, out=in_place)
    assert np.array_equal(host(in_place).view(np.int32), expected.view(np.int32))


@settings(max_examples=30)
@given(rows=deltas(num_tasks=3, length=st.integers(0, 90), scale=0.37))
def test_fidelity_sums_equal_the_reference(rows):
    packed = reference.pack_bits((rows[2] != 0)[None])[0]
    got = tk.KERNEL.fidelity_sums(*[torch.from_numpy(x).to(DEVICE) for x in (rows[0], packed, rows[1])])
    assert got.dtype == torch.float64 and got.device.type == DEVICE.type
    np.testing.assert_allclose(host(got), reference.fidelity_sums(rows[0], packed, rows[1]), rtol=1e-12, atol=1e-15)


# ---- the in-memory API on the Triton path: torch tensors in, torch tensors out --------------------------


def _assert_same_unified_and_masks(state, expected) -> None:
    for name in expected.names:
        assert state.unified[name].device.type == DEVICE.type and state.masks[name].device.type == DEVICE.type
        assert np.array_equal(host(state.unified[name]).view(np.int32), expected.unified[name].view(np.int32)), name
        assert np.array_equal(host(state.masks[name]), expected.masks[name]), name


def _assert_rebuilds(state, expected, *, rtol: float) -> None:
    """Rescalers (host tables, torch tensors) and every rebuilt delta (on the device), to `rtol`."""
    assert isinstance(state.rescalers, torch.Tensor)
    np.testing.assert_allclose(host(state.rescalers), expected.rescalers, rtol=rtol, atol=0)
    for task in range(1, expected.num_tasks + 1):
        rebuilt = state.decouple(task)
        for name, values in expected.decouple(task).items():
            assert rebuilt[name].device.type == DEVICE.type and rebuilt[name].shape == values.shape
            if rtol == 0:
                assert np.array_equal(host(rebuilt[name]).view(np.int32), values.view(np.int32)), (task, name)
            else:
                np.testing.assert_allclose(host(rebuilt[name]), values, rtol=rtol, atol=0)


@settings(max_examples=10)
@given(state_dicts(num_tasks=st.integers(2, 4), max_numel=30), st.sampled_from(MODES))
def test_in_memory_api_on_the_triton_path_equals_the_numpy_results(deltas_list, mode):
    """One-shot: grid values make every float32 L1 partial exact, so everything is the numpy path's
    bit for bit, rescalers and rebuilt deltas included. A continual step reads those same stored
    rescalers, so its unified delta and masks are bit-identical too; its own L1 sums run over
    rebuilt values off the grid, so its rescalers agree to the float32 partials' bound."""
    tensors = [{name: torch.from_numpy(t).to(DEVICE) for name, t in d.items()} for d in deltas_list]
    expected = unify(deltas_list[:-1], rescaler=mode, kernel="cpu", chunk=16)
    state = unify(tensors[:-1], rescaler=mode, kernel="triton", chunk=16)
    _assert_same_unified_and_masks(state, expected)
    _assert_rebuilds(state, expected, rtol=0)
    if expected.num_tasks > 1:
        _assert_same_unified_and_masks(remove(state, 1, kernel="triton"), remove(expected, 1, kernel="cpu"))
    expected, state = add(expected, deltas_list[-1], kernel="cpu"), add(state, tensors[-1], kernel="triton")
    _assert_same_unified_and_masks(state, expected)
    _assert_rebuilds(state, expected, rtol=4 * L1_RTOL)


# The conformance vectors (shared/vectors/condu-v1), through the triton kernel.
def _vector_tensors() -> list[dict[str, torch.Tensor]]:
    return [{name: torch.from_numpy(t).to(DEVICE) for name, t in d.items()} for d in vector_deltas()]


@requires_vectors()
@pytest.mark.parametrize("mode", MODES)
def test_conformance_oneshot(mode):
    state = unify(_vector_tensors()[:3], rescaler=mode, kernel="triton", chunk=40)
    assert_unified_matches(state, mode)
    assert_rebuilds_match(state, mode, "oneshot123")


@requires_vectors()
@pytest.mark.parametrize("mode", MODES)
def test_conformance_continual_step(mode):
    deltas_ = _vector_tensors()
    state = add(unify(deltas_[:3], rescaler=mode, kernel="triton"), deltas_[3], kernel="triton", chunk=24)
    assert_rebuilds_match(state, mode, "add4")


def _gpu_benchmark_module():
    """benchmarks.gpu_kernels, imported after the kernel module above (interpreted without CUDA)."""
    return importlib.import_module("benchmarks.gpu_kernels")


def test_gpu_benchmark_script_reports_a_wrong_kernel(tmp_path, monkeypatch):
    """benchmarks.gpu_kernels at a tiny size: with an elect that flips one mask bit, the elect
    checks fail, the continual checks pass, the results are written and the exit code is 1."""
    gpu = _gpu_benchmark_module()

    class FlipsABit:
        name, block, num_warps = "triton", tk.KERNEL.block, tk.KERNEL.num_warps
        continual = staticmethod(tk.KERNEL.continual)

        @staticmethod
        def elect(deltas, *, unified_dtype=F32):
            result = tk.KERNEL.elect(deltas, unified_dtype=unified_dtype)
            result.packed_masks[0, 0] ^= 1
            return result

    monkeypatch.setattr(gpu, "KERNEL", FlipsABit())
    code = gpu.main(["--quick", "--numel", "1024", "--repeats", "1", "--out", str(tmp_path)])
    assert code == 1
    report = json.loads((tmp_path / "gpu_kernels.json").read_text())
    outcomes = {(c["kernel"], c["ok"]) for c in report["checks"]}
    assert outcomes == {("elect", False), ("continual", True)}
    assert [r["tasks"] for r in report["throughput"]] == [2, 8, 16]
    assert all(r["gbps"]["elect"] > 0 and r["gbps"]["copy"] > 0 for r in report["throughput"])
    assert "masks differ" in (tmp_path / "gpu_kernels.md").read_text()


def test_gpu_benchmark_store_row_runs_the_command_line(tmp_path):
    """The store row's workload and timed `condu-fuse unify` processes, on the CPU here."""
    gpu = _gpu_benchmark_module()
    row = gpu.store_row(8 * 1024, 2, repeats=1, devices=("cpu",))
    assert row["tasks"] == 2 and row["cpu_s"] > 0
    assert row["cuda_output"].startswith("unified 2 task(s)"), row["cuda_output"]


@settings(max_examples=10, deadline=None)
@given(data=st.data(), old=st.integers(0, 3), new=st.integers(1, 3))
def test_base_and_originals_equal_the_reference(data, old, new):
    """theta0 subtracted from weight rows, and fidelity sums of the measured tasks, as the reference."""
    n = data.draw(st.integers(1, 40))
    rows = torch.from_numpy(data.draw(deltas(num_tasks=old + new, length=n)))  # (T, n)
    base = torch.from_numpy(data.draw(deltas(num_tasks=1, length=n, scale=2.0**-3))[0])
    originals = reference.Originals(data.draw(deltas(num_tasks=max(old, 1), length=n)),
                                    np.array([reference.NOT_MEASURED, 0, 0][: old] + [reference.OWN_ROW] * new))
    stored = reference.elect(host(rows[:max(old, 1)]))
    args = (torch.from_numpy(stored.unified), torch.from_numpy(stored.packed_masks[:old]),
            torch.full((old,), 0.75, dtype=torch.float64), rows[old:] + base)
    result = tk.TritonKernel(block=16).continual(*args, base=base, originals=originals)
    expected = reference.continual_chunk(*[host(a) for a in args], base=host(base), originals=originals)
    _assert_same(result, expected)
    np.testing.assert_allclose(host(result.fidelity), expected.fidelity, rtol=1e-9, atol=1e-12)


@settings(max_examples=10, deadline=None)
@given(data=st.data(), old=st.integers(0, 3), new=st.integers(0, 2))
def test_drift_sums_equal_the_reference(data, old, new):
    """With Originals.drift every task's sums against its own row (a stored task's rebuild, a new
    delta), and a stored task measured against its own row (OWN_ROW), as the reference."""
    if old + new == 0:
        new = 1
    n = data.draw(st.integers(1, 40))
    rows = torch.from_numpy(data.draw(deltas(num_tasks=old + new, length=n)))  # (T, n)
    base = torch.from_numpy(data.draw(deltas(num_tasks=1, length=n, scale=2.0**-3))[0])
    index = [data.draw(st.sampled_from([reference.NOT_MEASURED, reference.OWN_ROW, 0])) for _ in range(old)]
    index += [data.draw(st.sampled_from([reference.NOT_MEASURED, reference.OWN_ROW])) for _ in range(new)]
    originals = reference.Originals(data.draw(deltas(num_tasks=1, length=n)), np.array(index), drift=True)
    stored = reference.elect(host(rows[:max(old, 1)]))
    rescalers = data.draw(st.lists(st.sampled_from([0.0, 0.75, 1.0, 1.37]), min_size=old, max_size=old))
    args = (torch.from_numpy(stored.unified), torch.from_numpy(stored.packed_masks[:old]),
            torch.tensor(rescalers, dtype=torch.float64), rows[old:] + base)
    result = tk.TritonKernel(block=16).continual(*args, base=base, originals=originals)
    expected = reference.continual_chunk(*[host(a) for a in args], base=host(base), originals=originals)
    _assert_same(result, expected)
    np.testing.assert_allclose(host(result.fidelity), expected.fidelity, rtol=1e-9, atol=1e-12)
    assert result.drift.shape == (old + new, 5)
    np.testing.assert_allclose(host(result.drift), expected.drift, rtol=1e-9, atol=1e-12)
    if new:  # elect (no stored task) measures the same way
        elected = tk.TritonKernel(block=16).elect(rows[old:] + base, base=base, originals=originals._replace(
            index=np.array(index[old:])))
        reference_elected = reference.elect(host(rows[old:] + base), base=host(base),
                                            originals=originals._replace(index=np.array(index[old:])))
        np.testing.assert_allclose(host(elected.drift), reference_elected.drift, rtol=1e-9, atol=1e-12)
