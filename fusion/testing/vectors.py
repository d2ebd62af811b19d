"""The ConDU conformance vectors (shared/vectors/condu-v1): where they are and how to read them.

They live beside the checkout (`../shared/vectors/condu-v1`) or wherever `CONDU_VECTORS` points.
Tests skip them when absent on a developer's machine, but never under CI (`CI` set): there a
missing folder fails loudly instead of passing unchecked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

try:
    from safetensors.numpy import load_file
except ImportError as error:
    raise ImportError(f"{__name__} needs safetensors ({error}): pip install 'condu[test]'") from error

from ..arrays import to_host
from ..fuse import task_delta
from ..constants import RESCALER_MODES

__all__ = [
    "MODES", "vectors_dir", "requires_vectors", "vector_deltas", "expected_rescalers", "expected_delta",
    "assert_rebuilds_match", "assert_unified_matches",
]

MODES = RESCALER_MODES


def vectors_dir() -> Path:
    default = Path(__file__).resolve().parents[3] / "shared" / "vectors" / "condu-v1"
    return Path(os.environ.get("CONDU_VECTORS", default))


def requires_vectors():
    """A pytest mark: skip without the vectors, except under CI, where their absence must fail."""
    import pytest

    absent = not vectors_dir().is_dir() and not os.environ.get("CI")
    return pytest.mark.skipif(absent, reason=f"conformance vectors not found at {vectors_dir()} (set CONDU_VECTORS)")


def vector_deltas() -> list[dict[str, np.ndarray]]:
    """The four tasks' deltas from the base, float tensors only."""
    root = vectors_dir()
    base = load_file(root / "base.safetensors")
    return [task_delta(base, load_file(root / f"task{i}.safetensors")) for i in range(1, 5)]


def expected_rescalers(mode: str, step: str, names: list[str]) -> np.ndarray:
    """`(T, K)` float64 rescalers of `mode` after `step` ("oneshot123" or "add4"), columns in `names` order."""
    raw = json.loads((vectors_dir() / "expected" / "rescalers.json").read_text())[f"{mode}/{step}"]["rescalers"]
    rows = [[r[name] for name in names] if isinstance(r, dict) else [r] * len(names) for r in raw]
    return np.array(rows, dtype=np.float64)


def expected_delta(mode: str, step: str, task: int) -> dict[str, np.ndarray]:
    """The rebuilt delta of `task` (1-based) after `step`, or the unified delta with task="unified"."""
    suffix = "unified" if task == "unified" else f"task{task}"
    return load_file(vectors_dir() / "expected" / f"{mode}_{step}_{suffix}.safetensors")


def assert_rebuilds_match(state, mode: str, step: str) -> None:
    """Every task's rebuilt delta and the rescalers of `state` (a FusedDeltas of numpy arrays or
    torch tensors) equal the vectors'."""
    for task in range(1, state.num_tasks + 1):
        expected = expected_delta(mode, step, task)
        rebuilt = {name: to_host(t) for name, t in state.decouple(task).items()}
        assert set(rebuilt) == set(expected), f"task {task}: tensors {sorted(rebuilt)} != {sorted(expected)}"
        for name, tensor in expected.items():
            assert rebuilt[name].dtype == np.float32 and rebuilt[name].shape == tensor.shape, f"task {task} {name}"
            np.testing.assert_allclose(rebuilt[name], tensor, rtol=1e-6, atol=1e-7, err_msg=f"task {task} {name}")
    np.testing.assert_allclose(to_host(state.rescalers), expected_rescalers(mode, step, state.names), rtol=1e-6,
                               atol=1e-9)


def assert_unified_matches(state, mode: str) -> None:
    """The one-shot unified delta of tasks 1-3 equals the vectors' exactly (a zero's sign aside)."""
    for name, tensor in expected_delta(mode, "oneshot123", "unified").items():
        unified = to_host(state.unified[name]).reshape(tensor.shape)
        assert unified.dtype == tensor.dtype == np.float32, name
        assert np.array_equal(unified, tensor), name
