"""Fuzz: version 1 manifests, valid and broken, through every entry point that reads one.

A copy of the shipped version 1 store gets a drawn condu.json. `migrate` and `condu-fuse migrate`
either migrate it to a store that verifies, or refuse in one line leaving every file as it was;
`Store.open` and `condu-fuse info` refuse it in one line (a version 1 store is migrated first),
changing nothing. Each within a bounded time.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from hypothesis import given, settings

from fusion.store import Store
from fusion.store.migrate import migrate
from fusion.testing.checkpoints import snapshot
from fusion.testing.strategies import v1_manifests

from .outcomes import call, cli

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "v1_store"
PLACEHOLDER = "/tmp/v1fixture"  # where the fixture's manifest says its base and sources are
EXAMPLES = 30
MANIFEST = json.loads((FIXTURE / "store" / "condu.json").read_text())


def _store(root: Path, manifest: bytes) -> Path:
    """A copy of the version 1 store whose condu.json is `manifest`, its paths pointed at the copy."""
    copy = shutil.copytree(FIXTURE, root)
    (copy / "store" / "condu.json").write_bytes(manifest.replace(PLACEHOLDER.encode(), str(copy).encode()))
    return copy / "store"


def _refusal_changes_nothing(kind: str, detail, store: Path, before: dict) -> None:
    if kind == "refused":
        assert snapshot(store.parent) == before, f"refused ({detail}), yet files changed"


@settings(max_examples=EXAMPLES)
@given(manifest=v1_manifests(manifest=MANIFEST))
def test_a_version_1_manifest_is_migrated_whole_or_refused_in_one_line(manifest):
    with tempfile.TemporaryDirectory() as scratch:
        here = Path(scratch)
        store = _store(here / "library", manifest)
        before = snapshot(store.parent)
        kind, detail = call(migrate, store)
        _refusal_changes_nothing(kind, detail, store, before)
        if kind == "ok":
            assert Store.open(store).verify().ok

        store = _store(here / "command", manifest)
        before = snapshot(store.parent)
        if not cli(["migrate", "--store", store], here):
            assert snapshot(store.parent) == before

        store = _store(here / "opened", manifest)
        before = snapshot(store.parent)
        kind, detail = call(Store.open, store)
        assert kind == "refused", "a version 1 (or broken) store opened without migrating"
        assert not cli(["info", "--store", store], here)
        assert snapshot(store.parent) == before


def test_a_tensor_table_that_disagrees_with_the_files_is_not_migrated(tmp_path):
    """Found by the test above: version 1 checked each file's sha256 but not its tensors against the table."""
    content = json.loads(json.dumps(MANIFEST))
    next(t for t in content["tensors"] if t["name"] == "layer.0.weight")["shape"] = [8]
    store = _store(tmp_path / "v1", json.dumps(content).encode())
    before = snapshot(store.parent)
    kind, detail = call(migrate, store)
    assert kind == "refused" and "its tensors differ from the manifest's tensor table" in detail
    assert snapshot(store.parent) == before
