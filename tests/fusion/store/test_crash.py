"""A change that fails or is killed at any moment leaves a whole generation: the old one before
condu.json is swapped, the new one after."""

from pathlib import Path

import pytest

from fusion import Store
from fusion.store import faults
from fusion.testing.checkpoints import snapshot

from .helpers import OPTS, equal_models, killed_at, models

BEFORE_SWAP = ["pass-chunk", "files-written", "backup-written"]


@pytest.fixture
def store(tmp_path):
    base_path, paths, _, _ = models(tmp_path, 3)
    store = Store.unify(tmp_path / "s", base_path, paths[:2], **OPTS)
    store.old = {t.number: store.load_task(t.number) for t in store.tasks}
    return store


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp-" in p.name]


def _fail():
    raise RuntimeError("injected")


@pytest.mark.parametrize("point", BEFORE_SWAP)
def test_a_failure_before_the_swap_leaves_the_store_as_it_was(store, tmp_path, point):
    before = snapshot(store.path)
    with faults.inject(point, _fail), pytest.raises(RuntimeError, match="injected"):
        store.add(tmp_path / "task3.safetensors")
    assert snapshot(store.path) == before


def test_a_failure_after_the_swap_leaves_the_new_generation(store, tmp_path):
    with faults.inject("manifest-swapped", _fail), pytest.raises(RuntimeError):
        store.add(tmp_path / "task3.safetensors")
    assert store.generation == 1 and len(store.tasks) == 3 and store.verify().ok
    assert not _temporaries(store.path)
    assert sorted(p.name for p in store.path.glob("unified-*")) == ["unified-g000001.safetensors"]


@pytest.mark.parametrize("point", [*BEFORE_SWAP, "manifest-swapped"])
def test_kill_minus_nine_at_every_point(store, tmp_path, point):
    killed_at(point, tmp_path / "reached", f"from fusion import Store; Store.open({str(store.path)!r}, kernel='reference', "
              f"chunk=16).add({str(tmp_path / 'task3.safetensors')!r}, name='victim')")

    if point == "manifest-swapped":  # the new generation is whole: the victim is in
        assert store.generation == 1 and store.task("victim").number == 3
    else:  # the old generation is whole and reads exactly as before
        assert store.generation == 0
        assert all(equal_models(store.load_task(n), model) for n, model in store.old.items())
    assert store.verify().ok
    store.add(tmp_path / "task3.safetensors", name="after")  # the next writer clears the leftovers
    assert not _temporaries(store.path) and store.verify().ok
