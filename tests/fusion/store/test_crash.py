"""A change that fails or is killed at any moment leaves a whole generation: the old one before
condu.json is swapped, the new one after."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fusion import Store
from fusion.store import faults
from fusion.testing.checkpoints import snapshot

from .helpers import OPTS, equal_models, models

REPO = Path(__file__).resolve().parents[3]
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


KILLED = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from fusion import Store
    from fusion.store import faults

    def stop_here():
        Path(sys.argv[3]).touch()  # tell the test, then wait for SIGKILL
        time.sleep(120)

    with faults.inject(sys.argv[2], stop_here):
        Store.open(sys.argv[1], kernel="reference", chunk=16).add(sys.argv[4], name="victim")
""")


@pytest.mark.parametrize("point", [*BEFORE_SWAP, "manifest-swapped"])
def test_kill_minus_nine_at_every_point(store, tmp_path, point):
    marker = tmp_path / "reached"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(store.path), point, str(marker),
                             str(tmp_path / "task3.safetensors")], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert marker.exists(), proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    if point == "manifest-swapped":  # the new generation is whole: the victim is in
        assert store.generation == 1 and store.task("victim").number == 3
    else:  # the old generation is whole and reads exactly as before
        assert store.generation == 0
        assert all(equal_models(store.load_task(n), model) for n, model in store.old.items())
    assert store.verify().ok
    store.add(tmp_path / "task3.safetensors", name="after")  # the next writer clears the leftovers
    assert not _temporaries(store.path) and store.verify().ok
