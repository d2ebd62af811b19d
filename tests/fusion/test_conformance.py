"""The conformance vectors in shared/vectors/condu-v1, computed by an independent implementation."""

import pytest

from fusion import add, unify
from fusion.testing.vectors import MODES, assert_rebuilds_match, assert_unified_matches, requires_vectors, vector_deltas

KERNEL_NAMES = ["reference", "cpu"]  # the triton kernel runs them in test_triton_kernel.py, interpreted

pytestmark = requires_vectors()


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("mode", MODES)
def test_oneshot_matches_vectors(mode, kernel):
    state = unify(vector_deltas()[:3], rescaler=mode, kernel=kernel, chunk=16)
    assert_unified_matches(state, mode)
    assert_rebuilds_match(state, mode, "oneshot123")


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("mode", MODES)
def test_continual_step_matches_vectors(mode, kernel):
    deltas = vector_deltas()
    state = add(unify(deltas[:3], rescaler=mode, kernel=kernel), deltas[3], kernel=kernel, chunk=24)
    assert_rebuilds_match(state, mode, "add4")


def test_torch_tensors_on_the_cpu_match_the_vectors():
    """The torch side of the in-memory API: CPU tensors in, CPU tensors out, the vectors' values."""
    torch = pytest.importorskip("torch")
    deltas = [{name: torch.from_numpy(t) for name, t in d.items()} for d in vector_deltas()]
    state = unify(deltas[:3], rescaler="tensor", kernel="cpu", chunk=16)
    assert all(isinstance(t, torch.Tensor) for t in state.unified.values())
    assert_unified_matches(state, "tensor")
    assert_rebuilds_match(state, "tensor", "oneshot123")
    assert_rebuilds_match(add(state, deltas[3], chunk=24), "tensor", "add4")


def test_sign_tie_elects_minus_one():
    deltas = vector_deltas()[:3]
    state = unify(deltas, kernel="reference")
    # Tasks 1 and 3 cancel at layer.1.weight[0, 0] and task 2 is 0 there: the tie elects -1, so
    # only the negative task keeps its mask.
    masks = [bool(state.mask(task, "layer.1.weight")[0, 0]) for task in (1, 2, 3)]
    negative = [bool(d["layer.1.weight"][0, 0] < 0) for d in deltas]
    assert masks == negative and sum(masks) == 1
    assert state.unified["layer.1.weight"][0] < 0
