"""Shared helpers of the store tests: tiny models on disk, the CLI in-process, stored files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from fusion.cli import main
from fusion.testing.checkpoints import tiny_base, tiny_finetune, write_checkpoint

OPTS = dict(kernel="reference", chunk=16)  # small chunks: tensors span several chunks
REPO = Path(__file__).resolve().parents[3]


def models(tmp_path: Path, num_tasks: int = 3, *, layout: str = "file", dtype=None):
    """A base and fine-tunes on disk: (base path, checkpoint paths, base dict, fine-tune dicts)."""
    base = tiny_base()
    base_path = write_checkpoint(base, tmp_path / ("base.safetensors" if layout == "file" else "base"), layout=layout,
                                 dtype=dtype)
    fts = [tiny_finetune(base, seed=i) for i in range(num_tasks)]
    paths = [write_checkpoint(ft, tmp_path / f"task{i + 1}.safetensors", dtype=dtype) for i, ft in enumerate(fts)]
    return base_path, paths, base, fts


def run(args, cwd: Path):
    """`condu-fuse ARGS` in `cwd`, in-process; the result has exit_code, stdout, stderr."""
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    finally:
        os.chdir(old)


def one_line_error(result, phrase: str) -> str:
    """The single stderr line of a failed command; it must contain `phrase`."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("condu-fuse: error: "), lines
    assert phrase in lines[0], lines[0]
    return lines[0]


def manifest(store_dir: Path) -> dict:
    return json.loads((store_dir / "condu.json").read_text())


def stored_unified(store_dir: Path) -> dict[str, np.ndarray]:
    out = {}
    for rel in manifest(store_dir)["unified"]["files"]:
        out.update(load_file(store_dir / rel))
    return out


def task_entry(store_dir: Path, name: str) -> dict:
    return next(t for t in manifest(store_dir)["tasks"] if t["name"] == name)


def flip_byte(path: Path, offset: int, mask: int = 0x01) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset % len(raw)] ^= mask
    path.write_bytes(raw)


def equal_models(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(np.array_equal(np.asarray(a[n]), np.asarray(b[n])) for n in a)


def assert_matches_state(store, state):
    """The stored unified delta, masks and rescalers equal an in-memory FusedDeltas."""
    unified = stored_unified(store.path)
    for k, name in enumerate(state.names):
        assert np.array_equal(unified[name].reshape(-1), state.unified[name]), name
        for i, task in enumerate(store.tasks):
            masks = load_file(store.path / task_entry(store.path, task.name)["triggers"])
            assert np.array_equal(masks[name], state.masks[name][i]), (task.name, name)
            assert task.rescaler_of(name) == pytest.approx(float(state.rescalers[i, k]), rel=1e-12)


def cli_process(args, cwd: Path, *, block: str) -> subprocess.CompletedProcess:
    """`condu-fuse ARGS` in a fresh process in `cwd`, where importing the package `block` fails."""
    blocker = cwd / "blocker"
    (blocker / block).mkdir(parents=True, exist_ok=True)
    (blocker / block / "__init__.py").write_text(f"raise ImportError('condu-fuse imported {block}')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "fusion.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def flip_a_bit_and_decouple_every_task(store, tmp_path: Path, data) -> None:
    """Flip one bit (Hypothesis draws the file, byte and bit) of a store with `store.truth`; every task
    then decouples exactly or fails in one line, never a wrong model with exit 0."""
    files = sorted(p for p in store.path.rglob("*") if p.is_file() and p.name != "condu.lock")
    target = data.draw(st.sampled_from(files), label="file")
    offset = data.draw(st.integers(0, target.stat().st_size - 1), label="offset")
    bit = data.draw(st.integers(0, 7), label="bit")
    original = target.read_bytes()
    flip_byte(target, offset, 1 << bit)
    try:
        for number, truth in store.truth.items():
            out = tmp_path / f"t{number}.safetensors"
            result = run(["decouple", "--store", store.path, "--task", str(number), "-o", out, "--force", "-q"], tmp_path)
            if result.exit_code == 0:
                assert equal_models(load_file(out), truth), (target.name, offset, bit, number)
            else:
                one_line_error(result, "")
                assert not out.exists() or equal_models(load_file(out), truth)
            out.unlink(missing_ok=True)
    finally:
        target.write_bytes(original)


# A child that runs a Python statement with a fault point that stops it: it touches the marker, then
# waits for a signal (SIGKILL, SIGINT) or for `<marker>.release`, which lets a thread's chunk finish.
_WAITING_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from fusion.store import faults

    marker = Path(sys.argv[2])

    def wait_here():
        marker.touch()
        release, deadline = Path(sys.argv[2] + ".release"), time.monotonic() + 120
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.01)

    with faults.inject(sys.argv[1], wait_here):
        exec(sys.argv[3])
""")


def child_stopped_at(point: str, marker: Path, statement: str) -> subprocess.Popen:
    """Start `statement` in a child process and return once it has reached fault point `point`."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", _WAITING_CHILD, point, str(marker), statement], env=env,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert marker.exists(), proc.stderr.read()
    return proc


def killed_at(point: str, marker: Path, statement: str) -> None:
    """`statement` in a child process, killed with SIGKILL at fault point `point`."""
    proc = child_stopped_at(point, marker, statement)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
