"""A version 1 store: refused in one line that says how to migrate, and migrated exactly."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fusion import Store
from fusion.testing.checkpoints import snapshot

from .helpers import one_line_error, run
from .ondisk import disk_state

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "v1_store"


@pytest.fixture
def v1(tmp_path):
    """The shipped version 1 store, copied, its paths pointed at the copy."""
    root = shutil.copytree(FIXTURE, tmp_path / "v1")
    path = root / "store" / "condu.json"
    path.write_text(path.read_text().replace("/tmp/v1fixture", str(root)))
    return root


def test_opening_a_version_1_store_says_how_to_migrate(v1, tmp_path):
    before = snapshot(v1 / "store")
    one_line_error(run(["info", "--store", v1 / "store"], tmp_path), "condu-fuse migrate")
    assert snapshot(v1 / "store") == before


def test_migration_keeps_every_model_numbers_and_prototypes(v1, tmp_path):
    result = run(["migrate", "--store", v1 / "store"], tmp_path)
    assert result.exit_code == 0 and "migrated to version 2" in result.output
    store = Store.open(v1 / "store")
    assert [(t.number, t.name) for t in store.tasks] == [(2, "task-7"), (3, "gamma")]  # "7" is a number: renamed
    for number, old_name in ((2, "7"), (3, "gamma")):
        expected = load_file(v1 / f"expected-{old_name}.safetensors")
        rebuilt = store.load_task(number)
        assert set(rebuilt) == set(expected) and all(np.array_equal(rebuilt[n], expected[n]) for n in expected)
    assert np.array_equal(store.attachment("gamma", "prototypes")["prototypes"], np.arange(6.0).reshape(2, 3))
    assert store.verify().ok and not (v1 / "store" / "prototypes").exists()
    store.add(v1 / "ft1.safetensors", name="alpha-again")  # and it lives on as a version 2 store
    assert [t.number for t in store.tasks] == [2, 3, 4]


def test_a_damaged_version_1_store_is_not_migrated(v1, tmp_path):
    trigger = next((v1 / "store" / "triggers").iterdir())
    raw = bytearray(trigger.read_bytes())
    raw[-1] ^= 1
    trigger.write_bytes(raw)
    before = snapshot(v1 / "store")
    one_line_error(run(["migrate", "--store", v1 / "store"], tmp_path), "sha256 differs")
    assert snapshot(v1 / "store") == before


def test_migrating_twice_is_refused(v1, tmp_path):
    assert run(["migrate", "--store", v1 / "store"], tmp_path).exit_code == 0
    one_line_error(run(["migrate", "--store", v1 / "store"], tmp_path), "not a version 1 store")
    assert json.loads((v1 / "store" / "condu.json").read_text())["version"] == 2


# ---- what a version 1 manifest may name, and how it may be written ---------------------------


def _edit(v1, change):
    """Rewrite the version 1 manifest with `change(content)` applied."""
    path = v1 / "store" / "condu.json"
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))


def _gamma(content) -> dict:
    return next(t for t in content["tasks"] if t["name"] == "gamma")


def _refused(v1, tmp_path, phrase, *outside):
    """migrate fails in one line containing `phrase`; nothing in the store or `outside` changed."""
    before = disk_state(v1, *outside)
    line = one_line_error(run(["migrate", "--store", v1 / "store"], tmp_path), phrase)
    assert disk_state(v1, *outside) == before
    return line


@pytest.mark.parametrize("listed", [False, True])
def test_prototypes_outside_the_store_are_never_moved(v1, tmp_path, listed):
    victim = tmp_path / "elsewhere" / "x-g000003.safetensors"
    victim.parent.mkdir()
    shutil.copy(v1 / "store" / "prototypes" / "t0003-g000003.safetensors", victim)

    def point_outside(content):
        old = _gamma(content)["prototypes"]
        _gamma(content)["prototypes"] = str(victim)
        if listed:
            content["files"][str(victim)] = content["files"].pop(old)

    _edit(v1, point_outside)
    _refused(v1, tmp_path, "not a version 1", victim.parent)


@pytest.mark.parametrize("path", ["prototypes/../../x-g000003.safetensors", "prototypes/t0002-g000003.safetensors",
                                  "triggers/t0003-g000004.safetensors"])
def test_prototypes_that_leave_their_folder_or_task_are_refused(v1, tmp_path, path):
    victim = v1 / "x-g000003.safetensors"
    shutil.copy(v1 / "store" / "prototypes" / "t0003-g000003.safetensors", victim)
    _edit(v1, lambda content: _gamma(content).update(prototypes=path))
    _refused(v1, tmp_path, "is not a version 1 prototypes file name of its own")


def test_a_store_file_that_is_a_link_is_refused(v1, tmp_path):
    store = v1 / "store"
    outside = tmp_path / "outside.safetensors"
    os.rename(store / "prototypes" / "t0003-g000003.safetensors", outside)
    os.symlink(outside, store / "prototypes" / "t0003-g000003.safetensors")
    _refused(v1, tmp_path, "outside its folder", outside)
    os.unlink(store / "prototypes" / "t0003-g000003.safetensors")
    os.symlink("../" + "triggers/t0002-g000004.safetensors", store / "prototypes" / "t0003-g000003.safetensors")
    _refused(v1, tmp_path, "a link, where version 1 wrote a file")


def test_a_folder_on_the_way_that_links_out_is_refused(v1, tmp_path):
    store = v1 / "store"
    os.rename(store / "prototypes", tmp_path / "prototypes")
    os.symlink(tmp_path / "prototypes", store / "prototypes")
    _refused(v1, tmp_path, "outside its folder", tmp_path / "prototypes")


def _drop(*keys):
    def change(content):
        target = content
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]
    return change


@pytest.mark.parametrize("change, phrase", [
    (_drop("tasks"), "missing required field `tasks`"),
    (_drop("base", "fingerprint"), "missing required field `fingerprint` - at `$.base`"),
    (lambda c: c["tasks"][0].update(uid=5), "Expected `str`, got `int` - at `$.tasks[0].uid`"),
    (lambda c: c["tasks"][0].update(fidelity=None), "Expected `object`, got `null` - at `$.tasks[0].fidelity`"),
    (lambda c: c.update(files=[]), "Expected `object`, got `array` - at `$.files`"),
    (lambda c: c.update(generation="4"), "Expected `int`, got `str` - at `$.generation`"),
    (lambda c: c["tasks"][0].update(uid="t2"), "at `$.tasks[0].uid`"),
    (lambda c: c["tensors"][0].update(shape=[[[[[8]]]]]), "at `$.tensors[0].shape[0]`"),
    (lambda c: c.update(extra=1), "unknown field `extra`"),
])
def test_a_malformed_version_1_manifest_is_one_line(v1, tmp_path, change, phrase):
    _edit(v1, change)
    assert "a damaged version 1 manifest (" in _refused(v1, tmp_path, phrase)


def test_deeply_nested_json_is_one_line(v1, tmp_path):
    path = v1 / "store" / "condu.json"
    text = path.read_text()
    for deep in ("[" * 100000 + "]" * 100000, "[" * 100000):
        path.write_text(text.replace('"files":', f'"x": {deep}, "files":', 1))
        _refused(v1, tmp_path, "a damaged version 1 manifest")


def test_task_files_must_be_their_own(v1, tmp_path):
    def swap(content):
        content["tasks"][0]["triggers"], content["tasks"][1]["triggers"] = (content["tasks"][1]["triggers"],
                                                                          content["tasks"][0]["triggers"])
    _edit(v1, swap)
    _refused(v1, tmp_path, "task t0002's triggers 'triggers/t0003-g000004.safetensors' is not a version 1 triggers")


def test_a_migration_that_fails_late_leaves_nothing_behind(v1, tmp_path):
    """The last step, writing the manifest, fails: the links, their folders and the backup go."""
    (v1 / "store" / "condu.backup.json").mkdir()  # the backup cannot be written
    before = disk_state(v1)
    result = run(["migrate", "--store", v1 / "store"], tmp_path)
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert disk_state(v1) == before and not (v1 / "store" / "attachments").exists()


def test_a_store_without_a_lock_file_keeps_none_after_a_refusal(v1, tmp_path):
    os.unlink(v1 / "store" / "condu.lock")
    _edit(v1, _drop("tasks"))
    _refused(v1, tmp_path, "missing required field `tasks`")
