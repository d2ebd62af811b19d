"""A version 1 store: refused in one line that says how to migrate, and migrated exactly."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fusion import Store
from fusion.testing.checkpoints import snapshot

from .helpers import one_line_error, run

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
