"""The safetensors header: what we write is what the format says, and what it forbids we refuse."""

import json
import struct

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given
from safetensors.numpy import load_file

from fusion.dtypes import DTYPES
from fusion.io import SafetensorsFile
from fusion.io.format import encode_header, parse_header

LAYOUT_DTYPES = [DTYPES[c] for c in ("F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "I8")]


@st.composite
def layouts(draw):
    names = draw(st.lists(st.text("abcdefgh.0123", min_size=1, max_size=6), min_size=0, max_size=5, unique=True))
    shapes = st.lists(st.integers(0, 5), max_size=3).map(tuple)
    return [(n, draw(st.sampled_from(LAYOUT_DTYPES)), draw(shapes)) for n in names]


@given(layouts())
def test_encoded_headers_parse_back_to_the_same_layout(layout):
    header, entries = encode_header(layout, {"format": "pt"})
    (length,) = struct.unpack("<Q", header[:8])
    assert length == len(header) - 8 and length % 8 == 0  # the data section starts 8-byte aligned
    data_size = sum(e.nbytes for e in entries.values())
    parsed, metadata = parse_header(header[8:], data_size=data_size, where="x")
    assert metadata == {"format": "pt"}
    assert [(e.name, e.dtype, e.shape) for e in parsed.values()] == [(n, d, tuple(s)) for n, d, s in layout]


def _write(path, header_obj, data: bytes, *, raw: bytes | None = None):
    text = raw if raw is not None else json.dumps(header_obj).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _entry(offsets, shape=(2,), dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


# (id, header object or raw JSON bytes, data, a phrase the refusal contains)
MALFORMED = [
    ("trailing-bytes", {"a": _entry([0, 8])}, b"\0" * 9, "trailing"),
    ("gap", {"a": _entry([4, 8], shape=(1,))}, b"\0" * 8, "gap"),
    ("overlap", {"a": _entry([0, 8]), "b": _entry([4, 8], shape=(1,))}, b"\0" * 8, "overlaps"),
    ("float-offset", {"a": _entry([0.0, 8])}, b"\0" * 8, "data_offsets"),
    ("negative-shape", {"a": _entry([0, 8], shape=(-2,))}, b"\0" * 8, "shape"),
    ("bool-shape", {"a": _entry([0, 8], shape=(True, 2))}, b"\0" * 8, "shape"),
    ("span-mismatch", {"a": _entry([0, 8], shape=(3,))}, b"\0" * 8, "needs 12"),
    ("unknown-dtype", {"a": _entry([0, 8], dtype="Q7")}, b"\0" * 8, "unknown dtype"),
    ("metadata-not-strings", {"__metadata__": {"a": 1}, "a": _entry([0, 8])}, b"\0" * 8, "__metadata__"),
    ("missing-field", {"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "needs dtype"),
    ("not-an-object", [1, 2], b"", "not a JSON object"),
    ("not-json", None, b"", "not valid JSON"),
    ("not-utf8", None, b"", "not UTF-8"),
    ("repeated-key", None, b"\0" * 8, "appears twice"),
]
RAW = {"not-json": b"{nope", "not-utf8": b'{"\xff": 1}',
       "repeated-key": b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                       b'"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'}


@pytest.mark.parametrize("case, header, data, phrase", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_headers_are_refused_in_one_line_naming_the_file(tmp_path, case, header, data, phrase):
    path = _write(tmp_path / f"{case}.safetensors", header, data, raw=RAW.get(case))
    with pytest.raises(ValueError) as caught:
        SafetensorsFile(path).close()
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and phrase in message
    if case != "repeated-key":  # the reference implementation refuses every other case too
        with pytest.raises(Exception):
            load_file(path)


def test_header_length_beyond_the_file_is_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(ValueError, match="does not fit the file"):
        SafetensorsFile(path)


def test_the_reference_implementation_reads_what_we_accept(tmp_path):
    """Extra keys inside an entry are allowed by the format; both readers take such a file."""
    header = {"a": {**_entry([0, 8]), "note": "x"}}
    path = _write(tmp_path / "x.safetensors", header, np.array([1.5, -2], np.float32).tobytes())
    with SafetensorsFile(path) as f:
        assert f.read("a").tolist() == [1.5, -2.0] == load_file(path)["a"].tolist()
