"""Inputs the store refuses, each in one line that names the file, and each leaving the store as it was."""

import json
import struct

import numpy as np
import pytest

from fusion import Store
from fusion.testing.checkpoints import snapshot, tiny_base, tiny_finetune, write_checkpoint

from .helpers import OPTS, models, one_line_error, run


@pytest.fixture
def store(tmp_path):
    base_path, paths, _, _ = models(tmp_path, 2)
    return Store.unify(tmp_path / "s", base_path, paths, **OPTS)


def _overlapping(path, ft):
    """A fine-tune whose second tensor's bytes overlap the first's (the format forbids it)."""
    header = {}
    offset = 0
    for name, array in ft.items():
        size = array.nbytes
        header[name] = {"dtype": "F32" if array.dtype == np.float32 else "I64", "shape": list(array.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    first, second = list(header)[:2]
    header[second]["data_offsets"] = [header[first]["data_offsets"][0] + 4,
                                      header[first]["data_offsets"][0] + 4 + ft[second].nbytes]
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(a.tobytes() for a in ft.values()))
    return path


def test_a_file_with_overlapping_tensors_is_refused(store, tmp_path):
    bad = _overlapping(tmp_path / "bad.safetensors", tiny_finetune(tiny_base(), seed=4))
    before = snapshot(store.path)
    one_line_error(run(["add", "--store", store.path, bad, "-q"], tmp_path), "overlaps the tensor before it")
    assert snapshot(store.path) == before


def test_a_checkpoint_of_another_model_is_refused_even_with_missing_zero(store, tmp_path):
    other = write_checkpoint({"encoder.w": np.ones((4, 4), np.float32)}, tmp_path / "other.safetensors")
    before = snapshot(store.path)
    for missing in ("error", "zero"):
        result = run(["add", "--store", store.path, other, "--missing", missing, "-q"], tmp_path)
        one_line_error(result, "does not fine-tune this base" if missing == "zero" else "is missing")
    assert snapshot(store.path) == before
    with pytest.raises(ValueError, match="shares no fused tensor"):
        Store.unify(tmp_path / "n", tmp_path / "base.safetensors", [other], missing="zero")
    assert not (tmp_path / "n").exists()


def test_add_takes_missing_and_reports_what_it_zero_filled(store, tmp_path):
    ft = tiny_finetune(tiny_base(), seed=7)
    del ft["norm.weight"]
    partial = write_checkpoint(ft, tmp_path / "partial.safetensors")
    result = run(["add", "--store", store.path, partial, "--missing", "zero", "-q"], tmp_path)
    assert result.exit_code == 0 and "1 tensor(s) it lacks counted as unchanged" in result.output


def test_an_integer_tensor_where_the_base_has_floats_is_refused(store, tmp_path):
    ft = tiny_finetune(tiny_base(), seed=7)
    ft["norm.weight"] = np.zeros(8, np.int64)
    bad = write_checkpoint(ft, tmp_path / "ints.safetensors")
    one_line_error(run(["add", "--store", store.path, bad, "-q"], tmp_path), "does not fine-tune this base")


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("kernel", ["reference", "cpu"])
def test_non_finite_deltas_are_refused_with_every_kernel(tmp_path, value, kernel):
    base_path, paths, base, _ = models(tmp_path, 1)
    ft = tiny_finetune(base, seed=3)
    ft["layer.0.weight"][2, 3] = value
    bad = write_checkpoint(ft, tmp_path / "bad.safetensors")
    store = Store.unify(tmp_path / "s", base_path, paths, kernel=kernel)
    before = snapshot(store.path)
    with pytest.raises(ValueError, match=r"bad.safetensors: tensor 'layer.0.weight' has NaN or Inf"):
        store.add(bad)
    assert snapshot(store.path) == before


def test_a_bad_unify_creates_no_store(tmp_path):
    base_path, paths, _, _ = models(tmp_path, 2)
    cases = [
        dict(checkpoints=[paths[0], paths[0]], names=["a", "a"]),
        dict(checkpoints=[tmp_path / "nope.safetensors"]),
        dict(checkpoints=paths, rescaler="nope"),
        dict(checkpoints=paths, names=["only-one"]),
    ]
    for case in cases:
        with pytest.raises(ValueError):
            Store.unify(tmp_path / "s", base_path, **{"names": None, **case})
        assert not (tmp_path / "s").exists(), case


def test_a_store_inside_a_checkpoint_folder_is_refused(tmp_path):
    base = tiny_base()
    base_path = write_checkpoint(base, tmp_path / "base", layout="folder")
    ft = write_checkpoint(tiny_finetune(base, seed=0), tmp_path / "ft.safetensors")
    with pytest.raises(ValueError, match="overlap"):
        Store.unify(base_path / "store", base_path, [ft])
    assert not (base_path / "store").exists()


def test_a_second_writer_is_stopped_by_the_lock(store, tmp_path):
    import fcntl

    with open(store.path / "condu.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        one_line_error(run(["remove", "--store", store.path, "--task", "1", "-q"], tmp_path), "another process is writing")
    assert len(store.tasks) == 2
