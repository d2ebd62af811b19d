"""Store.exists: whether a folder holds a store, asked without opening it (or naming its files)."""

import shutil
from pathlib import Path

import pytest

from fusion import ManifestError, Store

from .helpers import OPTS, models

V1_STORE = Path(__file__).resolve().parents[1] / "data" / "v1_store" / "store"  # the shipped older-format store


def test_a_store_exists_once_unified_and_nothing_else_is_one(tmp_path):
    base, paths, _, _ = models(tmp_path, 2)
    store_dir = tmp_path / "s"
    assert not Store.exists(store_dir)  # no folder
    store_dir.mkdir()
    (store_dir / "notes.txt").write_text("not a store")
    assert not Store.exists(store_dir)  # a folder of other files
    assert not Store.exists(paths[0])  # a checkpoint file
    shutil.rmtree(store_dir)
    Store.unify(store_dir, base, paths, **OPTS)
    assert Store.exists(store_dir) and Store.exists(str(store_dir))
    assert [t.name for t in Store.open(store_dir).tasks] == [Path(p).stem for p in paths]


def test_a_store_that_lost_its_manifest_still_exists_and_unify_there_refuses(tmp_path):
    base, paths, _, _ = models(tmp_path, 2)
    store_dir = tmp_path / "s"
    Store.unify(store_dir, base, paths[:1], **OPTS)
    (store_dir / "condu.json").unlink()  # the backup the store keeps is still there
    assert Store.exists(store_dir)
    with pytest.raises(ManifestError, match="repair"):
        Store.open(store_dir)
    with pytest.raises(ValueError, match="repair"):
        Store.unify(store_dir, base, paths[1:], **OPTS)


def test_an_older_format_store_exists(tmp_path):
    old = shutil.copytree(V1_STORE, tmp_path / "v1")
    assert Store.exists(old)
    with pytest.raises(ManifestError, match="migrate"):
        Store.open(old)
