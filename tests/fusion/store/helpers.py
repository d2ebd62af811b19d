"""Shared helpers of the store tests: tiny models on disk, the CLI in-process, stored files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
