"""Hostile headers, adapter configs and indexes: refused in one line, in bounded time and memory.

One test per way such an input used to get through: a RecursionError from deep nesting, a
TypeError or re.error from a config's field, a pattern that backtracks for ever, a header that
costs gigabytes before it is refused, and a dimension that numpy cannot describe.
"""

from __future__ import annotations

import json
import struct
import time
import tracemalloc

import hypothesis.strategies as st
import pytest
from hypothesis import given
from safetensors.numpy import load_file

from fusion.errors import InputError
from fusion.io import SafetensorsFile, open_checkpoint
from fusion.io.adapter import read_adapter_config
from fusion.io.bounded_json import JsonLimits, loads, nesting
from fusion.io.checkpoint import MAX_INDEX_BYTES
from fusion.io.format import MAX_METADATA_CHARS, MAX_TENSORS
from fusion.testing.checkpoints import tiny_base, write_checkpoint


def _file(path, header: bytes, data: bytes = b""):
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def _refused(path, phrase: str, *, seconds: float = 2.0, peak: int | None = None) -> str:
    """The one-line InputError opening `path` raises, within `seconds` and `peak` traced bytes."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(InputError) as caught:
            SafetensorsFile(path).close()
        elapsed, held = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(caught.value)
    assert phrase in message and str(path) in message and "\n" not in message, message
    assert elapsed < seconds, f"took {elapsed:.2f} s"
    assert peak is None or held < peak, f"held {held} bytes"
    return message


# ---- safetensors headers -----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["[" * 100_000 + "]" * 100_000, '{"k":' * 100_000 + "0" + "}" * 100_000],
                         ids=["lists", "objects"])
def test_a_deeply_nested_header_is_refused_before_it_is_parsed(tmp_path, value):
    path = _file(tmp_path / "deep.safetensors", ('{"a":{"dtype":"F32","shape":' + value + "}}").encode())
    _refused(path, "nests objects and lists 100002 deep, more than the 3 it may have")
    path = _file(tmp_path / "meta.safetensors", ('{"__metadata__":{"a":' + value + "}}").encode())
    _refused(path, "more than the 3 it may have")


def test_a_header_of_a_million_zero_size_tensors_is_refused_at_once(tmp_path):
    """1.5 M entries, 89 MB: refused from a count of its objects, never parsed."""
    body = b",".join(b'"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}' % i for i in range(1_500_000))
    path = _file(tmp_path / "many.safetensors", b"{" + body + b"}")
    del body
    size = path.stat().st_size
    _refused(path, f"more than the {MAX_TENSORS:,} a file may hold", peak=size + size // 4)


def test_metadata_is_bounded_before_and_after_parsing(tmp_path):
    huge = b'{"__metadata__":{"a":"' + b"x" * 90_000_000 + b'"}}'
    path = _file(tmp_path / "huge.safetensors", huge)
    del huge
    size = path.stat().st_size
    _refused(path, "more than its 0 tensor entries and the metadata allowed take", peak=size + size // 4)
    over = json.dumps({"__metadata__": {"notes": "x" * MAX_METADATA_CHARS}}).encode()  # and its key's 5
    _refused(_file(tmp_path / "over.safetensors", over), f"more than the {MAX_METADATA_CHARS:,} allowed")
    at = json.dumps({"__metadata__": {"notes": "x" * (MAX_METADATA_CHARS - 5)}}).encode()
    with SafetensorsFile(_file(tmp_path / "at.safetensors", at)) as f:
        assert len(f.metadata["notes"]) == MAX_METADATA_CHARS - 5


def test_metadata_may_be_an_eighth_of_a_large_file(tmp_path):
    data = 16 * MAX_METADATA_CHARS  # bytes of one uint8 tensor: the file is sparse
    header = json.dumps({"__metadata__": {"notes": "x" * (2 * MAX_METADATA_CHARS - 5)},  # an eighth, with its key
                         "t": {"dtype": "U8", "shape": [data], "data_offsets": [0, data]}}).encode()
    path = _file(tmp_path / "large.safetensors", header)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size + data)
    with SafetensorsFile(path) as f:
        assert len(f.metadata["notes"]) == 2 * MAX_METADATA_CHARS - 5


@pytest.mark.parametrize("shape", [[0, 2**64], [2**64, 0], [0, 2**63], [2**63 - 1, 0], [2**62, 2**62, 0],
                                   [0, 2**61], [2**40, 0, 2**40]])
def test_a_zero_size_tensor_too_large_for_numpy_is_refused(tmp_path, shape):
    header = json.dumps({"empty": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}).encode()
    path = _file(tmp_path / "x.safetensors", header)
    _refused(path, "too large")
    with pytest.raises(Exception):  # the reference implementation, or numpy under it, refuses it too
        load_file(path)


@pytest.mark.parametrize("shape", [[0], [0, 5], [2**60, 0], [0, 2**20, 2**20]])
def test_a_zero_size_tensor_numpy_can_describe_is_read_as_the_reference_reads_it(tmp_path, shape):
    header = json.dumps({"empty": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}).encode()
    path = _file(tmp_path / "x.safetensors", header)
    with SafetensorsFile(path) as f:
        assert f.read("empty").shape == tuple(shape) == load_file(path)["empty"].shape


def test_a_shape_has_at_most_numpys_64_dimensions(tmp_path):
    for rank, accepted in ((64, True), (65, False)):
        header = json.dumps({"t": {"dtype": "F32", "shape": [1] * rank, "data_offsets": [0, 4]}}).encode()
        path = _file(tmp_path / f"r{rank}.safetensors", header, b"\0" * 4)
        if accepted:
            with SafetensorsFile(path) as f:
                assert f.read("t").shape == (1,) * 64
        else:
            _refused(path, "65 dimensions, more than numpy's 64")


# ---- the bounded scan itself -----------------------------------------------------------------

_TEXT = st.text(st.sampled_from(list('ab"\\[]{},:é\n')), max_size=6)
_JSON = st.recursive(st.none() | st.booleans() | st.integers() | _TEXT,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
                     max_leaves=12)


def _depth(value) -> int:
    children = list(value.values()) if isinstance(value, dict) else value if isinstance(value, list) else None
    return 0 if children is None else 1 + max(map(_depth, children), default=0)


@given(_JSON, st.booleans())
def test_the_scan_measures_the_nesting_the_parser_sees(value, ascii_only):
    """Quotes, backslashes and brackets inside strings never count; the depth is the parser's."""
    assert nesting(json.dumps(value, ensure_ascii=ascii_only).encode()) == _depth(value)


def test_counts_are_refused_before_the_parse():
    limits = JsonLimits(depth=3, brackets=8, commas=2)
    assert loads(b'{"a": [1, 2]}', limits, where="f", what="text", fix="fix it") == {"a": [1, 2]}
    for raw, phrase in [(b"[1, 2, 3, 4]", "3 commas"), (b"[[[]]], [[]]", "10 brackets"),
                        (b"[[[[1]]]]", "nests objects and lists 4 deep"), (b'{"a": NaN', "not valid JSON"),
                        (b'"\xff"', "not UTF-8")]:
        with pytest.raises(InputError, match=phrase) as caught:
            loads(raw, limits, where="f", what="text", fix="fix it")
        assert str(caught.value).startswith("f: text ") and str(caught.value).endswith("; fix it")


# ---- adapter_config.json -----------------------------------------------------------------------

GOOD = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}


def _config(tmp_path, content) -> str:
    """The one-line refusal of an adapter folder holding this config (a dict, or raw text)."""
    text = content if isinstance(content, str) else json.dumps(content)
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(InputError) as caught:
        read_adapter_config(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'adapter_config.json'}: ") and "\n" not in message
    return message


def test_a_deeply_nested_adapter_config_is_refused(tmp_path):
    for value in ["[" * 100_000 + "]" * 100_000, '{"k":' * 100_000 + "0" + "}" * 100_000]:
        message = _config(tmp_path, json.dumps(GOOD)[:-1] + ', "x": ' + value + "}")
        assert "adapter config nests objects and lists 100001 deep, more than the 8 it may have" in message


@pytest.mark.parametrize("field, value, phrase", [
    ("lora_alpha", "16", 'lora_alpha is "16" (expected `int | float`, got `str`)'),
    ("lora_alpha", None, "lora_alpha is null"),
    ("lora_alpha", -1, "lora_alpha is -1 (expected `int` >= 0)"),
    ("lora_alpha", -0.5, "lora_alpha is -0.5"),
    ("r", 0, "r is 0 (expected `int` >= 1)"),
    ("r", 8.0, "r is 8.0"),
    ("alpha_pattern", ["q_proj"], 'alpha_pattern is ["q_proj"] (expected `object | null`, got `array`)'),
    ("alpha_pattern", {"q_proj": "2"}, "alpha_pattern is"),
    ("rank_pattern", {"q_proj": 0}, "rank_pattern is"),
    ("target_modules", 5, "target_modules is 5 (expected `str | array | null`, got `int`)"),
    ("target_modules", None, "target_modules is null, but PEFT saves a LoRA adapter with the modules it adapts"),
    ("use_rslora", "true", 'use_rslora is "true" (expected `bool`, got `str`)'),
    ("fan_in_fan_out", "false", "fan_in_fan_out is"),
    ("use_dora", 0, "use_dora is 0"),
    ("bias", "some", 'bias is "some"'),
], ids=lambda v: str(v)[:20])
def test_a_field_of_the_wrong_type_is_refused_naming_it(tmp_path, field, value, phrase):
    assert phrase in _config(tmp_path, {**GOOD, field: value})


def test_a_missing_target_modules_is_allowed_beside_target_parameters(tmp_path):
    assert "target_modules is null" in _config(tmp_path, {k: v for k, v in GOOD.items() if k != "target_modules"})
    (tmp_path / "adapter_config.json").write_text(json.dumps({**GOOD, "target_modules": None,
                                                              "target_parameters": ["experts.w1"]}))
    assert read_adapter_config(tmp_path)["target_parameters"] == ["experts.w1"]


@pytest.mark.parametrize("key, phrase", [("(", "is not a regular expression PEFT can use"),
                                         ("(?<=q)_proj", "cannot be matched in linear time")])
def test_a_broken_or_backtracking_only_pattern_is_refused_naming_the_key(tmp_path, key, phrase):
    message = _config(tmp_path, {**GOOD, "alpha_pattern": {key: 2}})
    assert f"alpha_pattern key {key!r} {phrase}" in message


def test_a_catastrophic_pattern_is_accepted_and_matched_in_linear_time(tmp_path):
    from fusion.lora import pattern_value

    (tmp_path / "adapter_config.json").write_text(json.dumps({**GOOD, "alpha_pattern": {"(a+)+b": 2}}))
    config = read_adapter_config(tmp_path)
    start = time.perf_counter()
    assert pattern_value(config["alpha_pattern"], "a" * 28, config["lora_alpha"]) == 16
    assert time.perf_counter() - start < 0.1


def test_unknown_fields_pass_whatever_they_hold_and_other_peft_types_keep_their_own(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({**GOOD, "lora_dropout": "0.1", "future": [[{}]],
                                                              "loftq_config": {}, "eva_config": None}))
    assert read_adapter_config(tmp_path)["lora_alpha"] == 16
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "ADALORA", "r": 8,
                                                              "rank_pattern": {"q": [True, False]}}))
    assert read_adapter_config(tmp_path)["rank_pattern"] == {"q": [True, False]}  # AdaLoRA's, compared only


def test_configs_peft_writes_are_read_as_written(tmp_path):
    peft = pytest.importorskip("peft")
    variants = [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                dict(r=8, lora_alpha=16.5, target_modules=r".*\.q_proj", use_rslora=True, fan_in_fan_out=True),
                dict(r=8, target_modules=["q"], rank_pattern={"layers.0.q": 4}, alpha_pattern={r"layers\.\d+\.q": 2},
                     layers_to_transform=[0, 1], layers_pattern="layers", modules_to_save=["score"], bias="all")]
    for k, options in enumerate(variants):
        folder = tmp_path / f"v{k}"
        peft.LoraConfig(**options).save_pretrained(str(folder))
        written = json.loads((folder / "adapter_config.json").read_text())
        read = read_adapter_config(folder)
        assert all(read[f] == written[f] for f in read if f in written), k


# ---- model.safetensors.index.json --------------------------------------------------------------


def test_a_deep_or_oversized_index_is_refused_in_one_line(tmp_path):
    folder = write_checkpoint(tiny_base(), tmp_path / "m", layout="sharded")
    index = folder / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    index.write_text(json.dumps(content)[:-1] + ', "x": ' + "[" * 1000 + "]" * 1000 + "}")
    with pytest.raises(InputError, match="safetensors index nests objects and lists 1001 deep"):
        open_checkpoint(folder)
    index.write_text(json.dumps(content))
    with open(index, "r+b") as f:
        f.truncate(MAX_INDEX_BYTES + 1)  # sparse: nothing is written
    with pytest.raises(InputError, match="larger than the 67,108,864 bytes an index may have"):
        open_checkpoint(folder)
