"""Checkpoints: every layout reads the same tensors; indexes as strict as files; pickles refused."""

import json

import numpy as np
import pytest

from fusion.io import open_checkpoint
from fusion.io.files import model_side_files
from fusion.testing.checkpoints import tiny_base, write_checkpoint


@pytest.mark.parametrize("layout", ["file", "folder", "sharded"])
def test_every_layout_reads_the_same_tensors(tmp_path, layout):
    base = tiny_base()
    path = write_checkpoint(base, tmp_path / ("m.safetensors" if layout == "file" else "m"), layout=layout)
    with open_checkpoint(path) as ckpt:
        assert sorted(ckpt.keys()) == sorted(base)
        for name, array in base.items():
            assert np.array_equal(ckpt.read(name), array), name


def test_fingerprint_is_stable_and_tracks_the_headers(tmp_path):
    base = tiny_base()
    a = write_checkpoint(base, tmp_path / "a.safetensors")
    b = write_checkpoint(base, tmp_path / "b" / "a.safetensors")
    c = write_checkpoint({**base, "extra": np.ones(2, np.float32)}, tmp_path / "c" / "a.safetensors")
    with open_checkpoint(a) as x, open_checkpoint(b) as y, open_checkpoint(c) as z:
        assert x.fingerprint() == y.fingerprint() != z.fingerprint()


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt"])
def test_pickle_files_are_refused_without_loading(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04 not even read")
    with pytest.raises(ValueError, match="pickle checkpoints are not read"):
        open_checkpoint(path)


def test_a_folder_with_only_pickle_weights_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"only pickle weights \(pytorch_model.bin\)"):
        open_checkpoint(tmp_path)


def _sharded(tmp_path):
    return write_checkpoint(tiny_base(), tmp_path / "m", layout="sharded")


def _edit_index(folder, edit):
    index = folder / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    edit(content["weight_map"])
    index.write_text(json.dumps(content))


@pytest.mark.parametrize("edit, phrase", [
    (lambda m: m.update({"embed.weight": "../escape.safetensors"}), "not a plain file name"),
    (lambda m: m.update({"embed.weight": "/etc/passwd"}), "not a plain file name"),
    (lambda m: m.update({"embed.weight": ".."}), "not a plain file name"),
    (lambda m: m.update({"embed.weight": "gone.safetensors"}), "not in"),
    (lambda m: m.update({"ghost": "model-00001-of-00002.safetensors"}), "does not hold it"),
    (lambda m: m.pop("embed.weight"), "is not listed"),
], ids=["parent", "absolute", "dotdot", "missing-shard", "ghost-tensor", "unlisted-tensor"])
def test_an_index_is_as_strict_as_the_files(tmp_path, edit, phrase):
    folder = _sharded(tmp_path)
    _edit_index(folder, edit)
    with pytest.raises(ValueError, match=phrase) as caught:
        open_checkpoint(folder)
    assert "\n" not in str(caught.value)


def test_an_unreadable_index_is_one_line(tmp_path):
    folder = _sharded(tmp_path)
    (folder / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="safetensors index is not valid JSON"):
        open_checkpoint(folder)


def test_side_files_are_small_non_weight_files(tmp_path):
    folder = write_checkpoint(tiny_base(), tmp_path / "m", layout="sharded")
    (folder / "pytorch_model.bin").write_bytes(b"x")
    (folder / ".hidden").write_text("x")
    assert [p.name for p in model_side_files(folder)] == ["config.json", "tokenizer_config.json"]
