"""benchmarks.kernels: its naive peer computes ConDU, and its peak-RSS child reports its own peak
(its quick run, reports included, is in test_quick_runs.py)."""

import json

import numpy as np
import torch

from benchmarks.kernels import child_fuse_pass, naive_continual, naive_elect, naive_numel
from fusion import reference


def _integer_deltas(num_tasks: int, n: int, seed: int) -> np.ndarray:
    """Small integers: every sum is exact, so the naive mean and the reference sum elect alike."""
    return np.random.default_rng(seed).integers(-3, 4, (num_tasks, n)).astype(np.float32)  # (T, n), zeros and ties


def _masks_of(masks: list[torch.Tensor]) -> np.ndarray:
    """The naive peer's bool masks, packed as the store packs them."""
    return reference.pack_bits(torch.stack(masks).numpy())


def test_naive_peer_elects_like_the_reference():
    deltas = _integer_deltas(5, 1000, seed=1)
    unified, masks, _ = naive_elect(list(torch.from_numpy(deltas)))
    expected = reference.elect(deltas)
    assert np.array_equal(unified.float().numpy(), expected.unified)
    assert np.array_equal(_masks_of(masks), expected.packed_masks)


def test_naive_peer_continual_step_like_the_reference():
    old, new = _integer_deltas(3, 999, seed=2), _integer_deltas(1, 999, seed=3)
    unified, masks, _ = naive_elect(list(torch.from_numpy(old)))
    rescalers = [1.0, 2.0, 0.5]  # exact in float32: both rebuild the same values
    got, got_masks, _ = naive_continual(unified.float(), masks, rescalers, torch.from_numpy(new[0]))
    stored = reference.elect(old)
    expected = reference.continual_chunk(stored.unified, stored.packed_masks, np.array(rescalers), new)
    assert np.array_equal(got.float().numpy(), expected.unified)
    assert np.array_equal(_masks_of(got_masks), expected.packed_masks)


def test_naive_size_shrinks_to_the_memory_budget():
    assert naive_numel(2, 1 << 24, budget=8 << 30) == 1 << 24
    assert naive_numel(16, 1 << 26, budget=6 << 30) == 1 << 24
    assert naive_numel(16, 1 << 26, budget=0) == 1 << 20  # never below 1M


def test_fuse_pass_child_reports_its_peak(capsys):
    child_fuse_pass(20_000, 3, "add")
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["numel"] == 20_000 and report["tasks"] == 3
    assert report["self_peak_rss_bytes"] >= report["rss_before_pass_bytes"] > 0
