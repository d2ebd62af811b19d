"""The conformance vectors in shared/vectors/condu-v1, computed by an independent implementation."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fusion import add, task_delta, unify

VECTORS = Path(__file__).resolve().parents[3] / "shared" / "vectors" / "condu-v1"
MODES = ["model", "tensor-mean", "tensor"]
KERNEL_NAMES = ["reference", "cpu"]

pytestmark = pytest.mark.skipif(not VECTORS.is_dir(), reason=f"conformance vectors not found at {VECTORS}")


def _deltas():
    base = load_file(VECTORS / "base.safetensors")
    return [task_delta(base, load_file(VECTORS / f"task{i}.safetensors")) for i in range(1, 5)]


def _expected_rescalers(mode: str, step: str, names: list[str]) -> torch.Tensor:
    raw = json.loads((VECTORS / "expected" / "rescalers.json").read_text())[f"{mode}/{step}"]["rescalers"]
    rows = [[r[name] for name in names] if isinstance(r, dict) else [r] * len(names) for r in raw]
    return torch.tensor(rows, dtype=torch.float64)


def _assert_rebuilds(state, mode: str, step: str, num_tasks: int) -> None:
    for i in range(num_tasks):
        expected = load_file(VECTORS / "expected" / f"{mode}_{step}_task{i + 1}.safetensors")
        rebuilt = state.decouple(i)
        assert set(rebuilt) == set(expected)
        for name, tensor in expected.items():
            torch.testing.assert_close(rebuilt[name], tensor, rtol=1e-6, atol=1e-7, msg=f"task {i + 1} {name}")
    torch.testing.assert_close(state.rescalers, _expected_rescalers(mode, step, state.names), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("mode", MODES)
def test_oneshot_matches_vectors(mode, kernel):
    state = unify(_deltas()[:3], mode=mode, kernel=kernel, chunk=16)
    unified = load_file(VECTORS / "expected" / f"{mode}_oneshot123_unified.safetensors")
    for name, tensor in unified.items():
        torch.testing.assert_close(state.unified[name].reshape(tensor.shape), tensor, rtol=0, atol=0)
    _assert_rebuilds(state, mode, "oneshot123", 3)


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("mode", MODES)
def test_continual_step_matches_vectors(mode, kernel):
    deltas = _deltas()
    state = add(unify(deltas[:3], mode=mode, kernel=kernel), deltas[3], kernel=kernel, chunk=24)
    _assert_rebuilds(state, mode, "add4", 4)


def test_sign_tie_elects_minus_one():
    state = unify(_deltas()[:3], kernel="reference")
    # tasks 1 and 3 cancel at layer.1.weight[0, 0], task 2 is 0 there: the tie elects -1, so
    # only the negative task keeps its mask.
    masks = [bool(state.mask(i, "layer.1.weight")[0, 0]) for i in range(3)]
    d = _deltas()
    negative = [bool(d[i]["layer.1.weight"][0, 0] < 0) for i in range(3)]
    assert masks == negative and sum(masks) == 1
    assert state.unified["layer.1.weight"][0] < 0
