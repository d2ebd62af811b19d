"""fusion.atomic_write: a file or a whole folder appears complete or not at all, durably."""

import os

import pytest

import fusion
from fusion.io import files


@pytest.fixture
def fsyncs(monkeypatch):
    """Every path fusion fsyncs as a folder, in order."""
    seen = []
    real = files.fsync_dir

    def spy(path):
        seen.append(os.fspath(path))
        real(path)

    monkeypatch.setattr(files, "fsync_dir", spy)
    return seen


def test_bytes_and_text_replace_a_file_and_its_folder_is_synced(tmp_path, fsyncs):
    path = tmp_path / "state.json"
    assert fusion.atomic_write(path, b"old") == path
    fusion.atomic_write(path, "névé\n")
    assert path.read_bytes() == "névé\n".encode("utf-8")
    assert fsyncs == [str(tmp_path)] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temporary left


def test_a_folder_is_written_whole_under_a_new_name(tmp_path, fsyncs):
    out = tmp_path / "model"
    fusion.atomic_write(out, {"config.json": "{}\n", "model.safetensors": b"\x00\x01"})
    assert (out / "config.json").read_text() == "{}\n" and (out / "model.safetensors").read_bytes() == b"\x00\x01"
    assert fsyncs[-1] == str(tmp_path)  # the rename of the folder is made durable last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with pytest.raises(FileExistsError, match="exists"):
        fusion.atomic_write(out, {"config.json": "{}"})


def test_a_failed_folder_write_leaves_nothing(tmp_path, monkeypatch):
    def full_disk(path, data, **_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "atomic_write_bytes", full_disk)
    with pytest.raises(OSError):
        fusion.atomic_write(tmp_path / "model", {"config.json": "{}"})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="not a file name"):
        fusion.atomic_write(tmp_path / "model", {"../escape": "x"})
    assert list(tmp_path.iterdir()) == []
