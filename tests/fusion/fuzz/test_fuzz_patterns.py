"""rank_pattern / alpha_pattern keys: PEFT's answer on every ordinary key, in bounded time on hostile ones.

fusion.lora matches plain keys by lookup and the others on RE2; peft 0.21 runs each key through
Python's backtracking `re`. On the keys users write (module names, dotted suffixes, simple
regular expressions) the two must pick the same key for every module name.
"""

from __future__ import annotations

import time

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings
from peft.utils.other import get_pattern_key

from fusion.errors import InputError
from fusion.lora import MAX_REGEX_KEYS, Patterns, pattern_problem, pattern_value

WORDS = ["model", "layers", "0", "1", "12", "self_attn", "q_proj", "k_proj", "mlp", "fc1", "q", "proj", "a"]
# Pieces of ordinary keys: words, escaped and bare dots, and the regular expressions PEFT's docs show.
PIECES = WORDS + [r"\.", ".", r"\d+", ".*", "(q|k)_proj", "[0-9]", "[0-9]+", "(layers|h)", "q_proj?", r"\w+"]

names = st.lists(st.sampled_from(WORDS), min_size=1, max_size=5).map(".".join)
keys = st.builds(lambda anchor, pieces, end: anchor + "".join(pieces) + end, st.sampled_from(["", "^"]),
                 st.lists(st.sampled_from(PIECES + ["."] * 4), min_size=1, max_size=6), st.sampled_from(["", "$"]))


def _peft_value(patterns: dict, module: str, default):
    return patterns.get(get_pattern_key(patterns.keys(), module), default)


@settings(max_examples=300)
@given(keys=st.lists(st.one_of(keys, names), min_size=1, max_size=6, unique=True), modules=st.lists(names, max_size=8))
def test_the_key_picked_is_the_one_peft_picks(keys, modules):
    patterns = {key: k for k, key in enumerate(keys)}
    modules = modules + [k for k in keys if "\\" not in k]  # a key's own text as a name: PEFT's fallback
    for module in modules:
        assert pattern_value(patterns, module, -1) == _peft_value(patterns, module, -1), (module, patterns)


def test_a_catastrophic_key_runs_in_linear_time():
    """(a+)+b against 28 a's takes Python's re 15 s, doubling with each more; here well under 0.1 s."""
    patterns = {"(a+)+b": 2, "(a|aa)*c": 3, "(x+x+)+y": 4}
    for name in ["a" * 28, "a" * 40, "a" * 10_000, "x" * 5_000]:
        start = time.perf_counter()
        assert pattern_value(patterns, name, 8) == 8
        assert time.perf_counter() - start < 0.1
    assert pattern_value(patterns, "a" * 28 + "b", 8) == 2


@pytest.mark.parametrize("key, phrase", [
    ("(a", "not a regular expression PEFT can use"),
    ("(?<=a)b", "cannot be matched in linear time"),
    (r"(a)\1", "cannot be matched in linear time"),
    ("a*+", "cannot be matched in linear time"),
    ("a{,2}", "read differently"),
    ("[[:alpha:]]", "read differently"),
    ("a{4294967296}", "not a regular expression PEFT can use"),
    ("(" * 101 + ")" * 101, "more than 100 groups"),
    ("x" * 1025, "more than 1,024"),
], ids=["unbalanced", "lookbehind", "backreference", "possessive", "empty-min", "posix-class", "huge-count",
        "groups", "long"])
def test_keys_that_cannot_be_matched_as_peft_does_are_named(key, phrase):
    assert phrase in pattern_problem([key])
    with pytest.raises(InputError, match="rank_pattern/alpha_pattern key"):
        Patterns([key])


def test_regular_expression_keys_are_bounded_in_number_plain_ones_are_not():
    assert pattern_problem([f"layers.{i}.q_proj" for i in range(5000)]) is None  # each one a lookup
    assert "more than 256" in pattern_problem([f"layers.{i}.(q|k)" for i in range(MAX_REGEX_KEYS + 1)])
    many = Patterns([f"model.layers.{i}.self_attn.q_proj" for i in range(5000)])
    start = time.perf_counter()
    assert [many.first(f"model.layers.{i}.self_attn.q_proj") for i in (0, 4999)] == \
        ["model.layers.0.self_attn.q_proj", "model.layers.4999.self_attn.q_proj"]
    assert time.perf_counter() - start < 0.1
