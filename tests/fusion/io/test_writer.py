"""Streaming writes: files the reference implementation reads, checksummed as written, atomic."""

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fusion.dtypes import BF16, DTYPES, F32
from fusion.io import SafetensorsWriter, ShardedWriter, load, save
from fusion.io.integrity import digest_file


def _mixed():
    import ml_dtypes

    rng = np.random.default_rng(0)
    return {
        "a": rng.standard_normal((3, 5)).astype(np.float32),
        "ids": np.arange(6).reshape(2, 3),
        "half": rng.standard_normal((4, 2)).astype(np.float16),
        "brain": rng.standard_normal(7).astype(ml_dtypes.bfloat16),
        "empty": np.zeros((0, 4), np.float32),
        "scalar": np.array(2.5, np.float32),
        "flag": np.array([True, False, True]),
    }


def test_save_and_load_round_trip_through_the_reference_implementation(tmp_path):
    tensors = _mixed()
    save(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    theirs = load_file(tmp_path / "x.safetensors")
    ours = load(tmp_path / "x.safetensors")
    for name, array in tensors.items():
        assert ours[name].dtype == array.dtype and np.array_equal(ours[name], array), name
        expected = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16) if name == "brain" else torch.from_numpy(array)
        assert torch.equal(theirs[name], expected), name
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # no temporary left


def test_chunks_stream_in_order_and_the_digests_are_the_files(tmp_path):
    full = np.arange(20, dtype=np.float32)
    path = tmp_path / "s.safetensors"
    with SafetensorsWriter(path, [("x", F32, (4, 5)), ("y", DTYPES["U8"], (3,))], block=64) as writer:
        for lo in range(0, 20, 6):
            writer.write("x", full[lo : lo + 6])
        writer.write("y", np.array([1, 2, 3], np.uint8))
    assert np.array_equal(load(path)["x"], full.reshape(4, 5))
    assert writer.digests == digest_file(path, block=64)
    assert writer.size == path.stat().st_size


def test_an_exception_inside_the_block_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(tmp_path / "s.safetensors", [("x", F32, (4,))]) as writer:
            writer.write("x", np.ones(2, np.float32))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_data_of_another_dtype_is_refused(tmp_path):
    with SafetensorsWriter(tmp_path / "s.safetensors", [("x", BF16, (2,))], checksums=False) as writer:
        with pytest.raises(ValueError, match="float32 data for a bfloat16 tensor"):
            writer.write("x", np.ones(2, np.float32))
        writer.write("x", np.array([0x3F80, 0x4000], np.uint16))  # bfloat16 bits: 1.0, 2.0
    assert load(tmp_path / "s.safetensors")["x"].astype(np.float32).tolist() == [1.0, 2.0]


def test_sharded_writer_splits_in_order_and_never_splits_a_tensor(tmp_path):
    layout = [(f"t{i}", F32, (10,)) for i in range(5)]  # 40 bytes each
    with ShardedWriter(tmp_path, layout, single="model.safetensors", max_shard_size=100,
                       shard_name=lambda k, n: f"m-{k}-of-{n}.safetensors") as writer:
        for i in range(5):
            writer.write(f"t{i}", np.full(10, i, np.float32))
    assert [name for name, _ in writer.shards] == ["m-1-of-3.safetensors", "m-2-of-3.safetensors", "m-3-of-3.safetensors"]
    assert writer.weight_map == {"t0": "m-1-of-3.safetensors", "t1": "m-1-of-3.safetensors",
                                 "t2": "m-2-of-3.safetensors", "t3": "m-2-of-3.safetensors", "t4": "m-3-of-3.safetensors"}
    for name, shard in writer.weight_map.items():
        assert load(tmp_path / shard)[name].tolist() == [float(name[1])] * 10
