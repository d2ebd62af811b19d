"""LoRA's dense delta: the streaming rows equal the readable rule, and the rule is PEFT's."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fusion.lora import delta_operands, delta_rows, dense_delta, lora_scaling, pattern_value
from fusion.testing.strategies import lora_factors


def _streamed(a, b, scaling, transpose, cuts):
    """The flattened delta, read piece by piece over [0, numel) cut at `cuts`, through delta_rows."""
    left, right = delta_operands(a, b, transpose=transpose)
    numel = left.shape[0] * right.shape[1]
    bounds = [0, *sorted({c % (numel + 1) for c in cuts}), numel]
    out = np.full(numel, np.nan, dtype=np.float32)
    for lo, hi in zip(bounds, bounds[1:]):
        piece = np.full(hi - lo, np.nan, dtype=np.float32)
        delta_rows(left, right, scaling, lo, hi, piece)
        out[lo:hi] = piece
    return out


@given(factors=lora_factors(), cuts=st.lists(st.integers(0, 200), max_size=6))
def test_streamed_rows_equal_the_rule_bit_for_bit(factors, cuts):
    a, b, scaling, transpose = factors
    expected = dense_delta(a, b, scaling, transpose=transpose)
    assert np.array_equal(_streamed(a, b, scaling, transpose, cuts), expected.reshape(-1))


@pytest.mark.parametrize("transpose", [False, True])
def test_the_rule_is_peft_merge_rule_on_real_valued_factors(transpose):
    """PEFT: transpose(B @ A, fan_in_fan_out) * scaling, in torch; rows cut mid-row and whole."""
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((6, 37)).astype(np.float32), rng.standard_normal((23, 6)).astype(np.float32)
    scaling = lora_scaling(16, 6, rslora=True)
    product = torch.from_numpy(b) @ torch.from_numpy(a)
    peft = ((product.T if transpose else product) * scaling).numpy()
    np.testing.assert_allclose(dense_delta(a, b, scaling, transpose=transpose), peft, rtol=1e-5, atol=1e-5)
    streamed = _streamed(a, b, scaling, transpose, cuts=[5, 37, 120, 121, 500])
    np.testing.assert_allclose(streamed, peft.reshape(-1), rtol=1e-5, atol=1e-5)


def test_scaling_is_alpha_over_rank_or_its_square_root():
    assert lora_scaling(16, 8) == 2.0
    assert lora_scaling(16, 64, rslora=True) == 2.0
    assert lora_scaling(8, 3, rslora=True) == pytest.approx(8 / math.sqrt(3))


def test_patterns_match_modules_as_peft_matches_them():
    from peft.utils.other import get_pattern_key

    patterns = {"h.1.mlp.c_fc": 2, "c_fc": 3, r"layers\.\d+\.q": 5, "proj": 7}
    modules = ["h.1.mlp.c_fc", "h.0.mlp.c_fc", "x.c_fc", "c_fc", "model.layers.3.q", "out_proj", "a.proj", "fc"]
    for module in modules:
        key = get_pattern_key(patterns.keys(), module)
        assert pattern_value(patterns, module, default=-1) == patterns.get(key, -1), module
    assert pattern_value(None, "anything", 4) == 4
