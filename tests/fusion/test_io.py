"""Checkpoint I/O: lazy reading of every input layout, the streaming writer, pickle refusal."""

import json
import struct

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fusion.io import (
    Checkpoint,
    SafetensorsWriter,
    ShardedWriter,
    copy_model_files,
    load,
    open_checkpoint,
    save,
)
from fusion.testing.checkpoints import tiny_base, write_checkpoint


def _mixed_tensors():
    return {
        "a": torch.randn(3, 5),
        "ids": torch.arange(6).reshape(2, 3),
        "half": torch.randn(4, 2).half(),
        "brain": torch.randn(7).bfloat16(),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
        "flag": torch.tensor([True, False, True]),
    }


def test_save_roundtrips_through_safetensors(tmp_path):
    tensors = _mixed_tensors()
    save(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    loaded = load_file(tmp_path / "x.safetensors")
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # no temporary left


def test_header_is_padded_to_eight_bytes(tmp_path):
    save({"a": torch.ones(3)}, tmp_path / "x.safetensors")
    raw = (tmp_path / "x.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert length % 8 == 0
    assert json.loads(raw[8 : 8 + length])["a"]["data_offsets"] == [0, 12]


def test_streaming_writer_accepts_chunks_in_order(tmp_path):
    full = torch.arange(20, dtype=torch.float32)
    writer = SafetensorsWriter(tmp_path / "s.safetensors", [("x", torch.float32, (4, 5)), ("y", torch.uint8, (3,))])
    for lo in range(0, 20, 6):
        writer.write("x", full[lo : lo + 6])
    writer.write("y", torch.tensor([1, 2, 3], dtype=torch.uint8))
    writer.finish()
    loaded = load_file(tmp_path / "s.safetensors")
    assert torch.equal(loaded["x"], full.reshape(4, 5)) and loaded["y"].tolist() == [1, 2, 3]
    assert writer.sha256 is not None and writer.size == (tmp_path / "s.safetensors").stat().st_size


def test_writer_abort_leaves_nothing(tmp_path):
    writer = SafetensorsWriter(tmp_path / "s.safetensors", [("x", torch.float32, (4,))])
    writer.write("x", torch.ones(2))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_sharded_writer_splits_and_keeps_order(tmp_path):
    layout = [(f"t{k}", torch.float32, (10,)) for k in range(5)]
    writer = ShardedWriter(tmp_path, layout, single="one.safetensors", max_shard_size=80,
                           shard_name=lambda k, n: f"part-{k}-of-{n}.safetensors")
    for k in range(5):
        writer.write(f"t{k}", torch.full((10,), float(k)))
    done = writer.finish()
    assert sorted(done) == ["part-1-of-3.safetensors", "part-2-of-3.safetensors", "part-3-of-3.safetensors"]
    merged = {}
    for name in done:
        merged.update(load_file(tmp_path / name))
    assert {n: float(t[0]) for n, t in merged.items()} == {f"t{k}": float(k) for k in range(5)}


@given(shape=st.sampled_from([(7,), (3, 5), (2, 3, 4), (1, 9)]), data=st.data(),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64]))
def test_read_flat_equals_slices_of_the_loaded_tensor(tmp_path_factory, shape, data, dtype):
    path = tmp_path_factory.mktemp("rf") / "x.safetensors"
    tensor = (torch.arange(int(np.prod(shape))) - 5).reshape(shape).to(dtype)
    save_file({"x": tensor}, str(path))
    n = tensor.numel()
    lo = data.draw(st.integers(0, n))
    hi = data.draw(st.integers(lo, n))
    got = open_checkpoint(path).read_flat("x", lo, hi)
    assert got.dtype == dtype and torch.equal(got, tensor.flatten()[lo:hi])


@pytest.mark.parametrize("layout", ["file", "folder", "sharded"])
def test_every_input_layout_reads_the_same_tensors(tmp_path, layout):
    tensors = tiny_base()
    name = "m.safetensors" if layout == "file" else "m"
    ckpt = open_checkpoint(write_checkpoint(tensors, tmp_path / name, layout=layout))
    assert set(ckpt.keys()) == set(tensors)
    for n, t in tensors.items():
        assert torch.equal(ckpt.read(n), t) and ckpt.info(n).shape == tuple(t.shape)
    assert ckpt.name == "m"
    assert load(tmp_path / name).keys() == tensors.keys()
    if layout == "sharded":
        assert len(ckpt.files) == 2


def test_fingerprint_is_stable_and_tracks_the_header(tmp_path):
    a = write_checkpoint(tiny_base(seed=1), tmp_path / "a.safetensors")
    b = write_checkpoint(tiny_base(seed=1), tmp_path / "b" / "a.safetensors")
    assert Checkpoint(a).fingerprint() == Checkpoint(b).fingerprint()  # same layout, another place
    changed = tiny_base(seed=1)
    changed["extra"] = torch.zeros(2)
    write_checkpoint(changed, b)
    assert Checkpoint(a).fingerprint() != Checkpoint(b).fingerprint()


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt"])
def test_pickle_files_are_refused_without_loading(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"not even a pickle")
    with pytest.raises(ValueError, match="convert it to safetensors"):
        open_checkpoint(path)


def test_folder_with_only_pickle_weights_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="pytorch_model.bin.*convert"):
        open_checkpoint(tmp_path)


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="no such checkpoint"):
        open_checkpoint(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(ValueError, match="junk.safetensors: not a safetensors file"):
        open_checkpoint(junk)
    good = write_checkpoint({"a": torch.ones(100)}, tmp_path / "cut.safetensors")
    good.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(ValueError, match="cut.safetensors: tensor 'a' has inconsistent byte offsets"):
        open_checkpoint(good)


def test_copy_model_files_takes_config_and_tokenizer_only(tmp_path):
    src = write_checkpoint(tiny_base(), tmp_path / "src", layout="sharded")
    (tmp_path / "dst").mkdir()
    copied = {p.name for p in copy_model_files(src, tmp_path / "dst")}
    assert copied == {"config.json", "tokenizer_config.json"}


@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       out_dtype=st.sampled_from([torch.float32, torch.float16]))
def test_read_flat_into_equals_read_flat(tmp_path_factory, data, dtype, out_dtype):
    path = tmp_path_factory.mktemp("ri") / "x.safetensors"
    tensor = (torch.arange(30) / 8 - 1).reshape(5, 6).to(dtype)
    save_file({"x": tensor}, str(path))
    lo = data.draw(st.integers(0, 30))
    hi = data.draw(st.integers(lo, 30))
    out = torch.full((hi - lo,), 7.0, dtype=out_dtype)
    open_checkpoint(path).read_flat_into("x", lo, hi, out)
    assert torch.equal(out, tensor.flatten()[lo:hi].to(out_dtype))
