"""A writer killed at any moment leaves the previous generation whole and readable."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import fusion.store
from fusion import Store
from fusion.testing.checkpoints import snapshot, tiny_base, tiny_finetune, write_checkpoint

REPO = Path(__file__).resolve().parents[2]
SHAPES = {"embed.weight": (256, 256), "layer.0.weight": (128, 256), "layer.0.bias": (256,), "layer.1.weight": (256, 256)}

ADD_SCRIPT = textwrap.dedent("""
    import sys
    from fusion import Store
    # small chunks and the reference kernel: the pass takes long enough to be killed mid-way
    Store.open(sys.argv[1], kernel="reference", chunk=4096).add(sys.argv[2], name="victim")
""")


def _model(seed: int, base=None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if base is None:
        return {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}
    return {n: t + 0.01 * torch.randn(t.shape, generator=gen) * (torch.rand(t.shape, generator=gen) < 0.5)
            for n, t in base.items()}


@pytest.fixture
def store(tmp_path):
    base = _model(0)
    base_path = write_checkpoint(base, tmp_path / "base.safetensors")
    paths = [write_checkpoint(_model(i, base), tmp_path / f"ft{i}.safetensors") for i in (1, 2, 3)]
    return Store.unify(tmp_path / "s", base_path, paths[:2], kernel="reference", chunk=1 << 16), paths[2]


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp-" in p.name]


def _kill_mid_add(store_dir: Path, checkpoint: Path) -> None:
    """Start `add` in a process; kill -9 it once its unified temp file holds some data."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", ADD_SCRIPT, str(store_dir), str(checkpoint)], env=env,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            unified = [p for p in _temp_files(store_dir) if p.name.startswith("unified-")]
            if unified and unified[0].stat().st_size > 32 * 1024:
                break
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"add ended before it could be killed: {proc.stderr.read()!r}"


def test_kill_minus_nine_in_the_middle_of_add(store, tmp_path):
    store, new_checkpoint = store
    before_files = snapshot(store.path)
    before = {i: store.load_task(i) for i in (1, 2)}
    _kill_mid_add(store.path, new_checkpoint)

    assert _temp_files(store.path), "the writer was killed before it wrote anything"
    reopened = Store.open(store.path)
    assert reopened.verify() == []
    assert reopened.generation == 1 and [t.name for t in reopened.tasks] == ["ft1", "ft2"]
    assert {p: h for p, h in snapshot(store.path).items() if ".tmp-" not in p} == before_files
    out = reopened.decouple(2, tmp_path / "after.safetensors")
    decoupled = fusion.io.load(out)
    assert all(torch.equal(decoupled[n], t) for n, t in before[2].items())

    # the next writer cleans the dead writer's leftovers and succeeds
    reopened.add(new_checkpoint, name="victim")
    assert not _temp_files(store.path) and reopened.verify() == [] and len(reopened.tasks) == 3


@pytest.mark.parametrize("stage", ["pass", "manifest"])
def test_a_failure_at_any_stage_leaves_the_store_unchanged(tmp_path, monkeypatch, stage):
    base = tiny_base()
    paths = [write_checkpoint(t, tmp_path / f"m{i}.safetensors") for i, t in
             enumerate([base, *(tiny_finetune(base, seed=i) for i in range(3))])]
    store = Store.unify(tmp_path / "s", paths[0], paths[1:3], kernel="reference")
    new_checkpoint = paths[3]
    before = snapshot(store.path)
    boom = OSError("disk full")

    def fail(*args, **kwargs):
        raise boom

    if stage == "pass":
        monkeypatch.setattr(fusion.store, "_run_pass", fail)
    else:
        monkeypatch.setattr(fusion.store, "atomic_write_text", fail)
    with pytest.raises(OSError, match="disk full"):
        store.add(new_checkpoint)
    assert snapshot(store.path) == before
    assert store.verify() == []
