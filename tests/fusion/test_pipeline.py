"""The pipelined pass: the same calls, in the same order, with the same results as one after the other."""

import threading
import time

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

from fusion import reference
from fusion.engine import ChunkInputs, TensorSpec, fuse_pass
from fusion.kernels import get_kernel
from fusion.pipeline import run_stages
from fusion.testing.strategies import deltas


@settings(max_examples=20, deadline=None)
@given(count=st.integers(0, 12), delays=st.lists(st.floats(0, 0.003), min_size=3, max_size=3))
def test_threaded_stages_finish_every_item_in_order_and_never_reuse_a_busy_slot(count, delays):
    in_use, finished = set(), []
    lock = threading.Lock()

    def read(item, slot):
        with lock:
            assert slot not in in_use, f"slot {slot} refilled while item read into it is not computed"
            in_use.add(slot)
        time.sleep(delays[0])
        return (item, slot)

    def compute(item, inputs):
        assert inputs[0] == item
        time.sleep(delays[1])
        with lock:
            in_use.discard(inputs[1])
        return item * 10

    def finish(item, result):
        time.sleep(delays[2])
        finished.append((item, result))

    run_stages(list(range(count)), read, compute, finish)
    assert finished == [(i, 10 * i) for i in range(count)]


@pytest.mark.parametrize("stage", ["read", "compute", "finish"])
def test_an_error_in_any_stage_stops_the_others_and_is_raised(stage):
    calls = []

    def maybe_fail(name, item):
        calls.append((name, item))
        if name == stage and item == 3:
            raise RuntimeError(f"{name} failed")

    with pytest.raises(RuntimeError, match=f"{stage} failed"):
        run_stages(list(range(50)), lambda i, s: maybe_fail("read", i) or i,
                   lambda i, x: maybe_fail("compute", i) or x, lambda i, r: maybe_fail("finish", i))
    assert max(item for name, item in calls if name == "finish") < 50 - 1  # it did not run to the end


@settings(max_examples=10, deadline=None)
@given(data=st.data(), kernel=st.sampled_from(["reference", "cpu"]))
def test_a_pipelined_pass_equals_a_sequential_one(data, kernel):
    n, tasks = data.draw(st.integers(1, 200)), data.draw(st.integers(1, 5))
    rows = data.draw(deltas(num_tasks=tasks, length=n))
    specs = [TensorSpec("a", n), TensorSpec("b", n)]
    results = {}
    for pipelined in (False, True):
        slots = [np.empty((tasks, 16), np.float32) for _ in range(2)]
        emitted = []

        def read(name, lo, hi, slot):
            out = slots[slot][:, : hi - lo]
            out[...] = rows[:, lo:hi]  # the slot's buffer, refilled chunk after chunk
            return ChunkInputs(out)

        tables = fuse_pass(specs, num_tasks=tasks, read=read, emit=lambda *args: emitted.append(args),
                           kernel=get_kernel(kernel), chunk=16, pipelined=pipelined)
        results[pipelined] = (tables, emitted)
    (t0, e0), (t1, e1) = results[False], results[True]
    assert np.array_equal(t0.delta_l1, t1.delta_l1) and np.array_equal(t0.masked_l1, t1.masked_l1)
    assert [(n, lo, hi) for n, lo, hi, _ in e0] == [(n, lo, hi) for n, lo, hi, _ in e1]
    for (*_, a), (*_, b) in zip(e0, e1):
        assert np.array_equal(a.unified, b.unified) and np.array_equal(a.packed_masks, b.packed_masks)
    expected = reference.elect(rows)
    assert np.array_equal(np.concatenate([r.unified for name, lo, hi, r in e1 if name == "a"]), expected.unified)
