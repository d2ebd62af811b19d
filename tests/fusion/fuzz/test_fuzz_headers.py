"""Fuzz: safetensors files, valid and broken, through every entry point that reads one.

Each drawn file is read by `fusion.load`, `open_checkpoint`, `Store.unify` (as a task and as the
base), `condu-fuse unify` and `condu-fuse add`. Each gives the reference implementation's tensors
or refuses in one line, within a bounded time and memory, and a refusal changes no file. What we
accept the reference reads the same; we may refuse more (a repeated key, deeper nesting than the
format has, metadata past its bound).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings
from safetensors.numpy import load_file

import fusion
from fusion.io import open_checkpoint
from fusion.store import Store
from fusion.testing.checkpoints import snapshot, tiny_base, tiny_finetune, write_checkpoint
from fusion.testing.strategies import safetensors_files

from .outcomes import call, cli

LAYOUT = {"embed.weight": (4, 3), "layer.0.weight": (3, 3), "norm.weight": (3,)}
EXAMPLES = 60


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A base of LAYOUT, a fine-tune of it, and a store of the two (a template for `add`)."""
    root = tmp_path_factory.mktemp("headers")
    base = tiny_base(shapes=LAYOUT, buffers=False)
    write_checkpoint(base, root / "base.safetensors")
    write_checkpoint(tiny_finetune(base, seed=1), root / "ft.safetensors")
    Store.unify(root / "store", root / "base.safetensors", [root / "ft.safetensors"])
    return root


def _reference(path: Path) -> dict | None:
    try:
        return load_file(path)
    except Exception:  # the reference's refusals are of several types; any one counts
        return None


def _same_tensors(ours: dict, reference: dict) -> bool:
    return ours.keys() == reference.keys() and all(
        ours[n].dtype == reference[n].dtype and ours[n].shape == reference[n].shape
        and np.array_equal(ours[n], reference[n]) for n in ours)


def _placed(data: bytes, folder: Path, as_folder: bool) -> Path:
    """The file alone, or as a model folder's model.safetensors."""
    if not as_folder:
        (folder / "in.safetensors").write_bytes(data)
        return folder / "in.safetensors"
    (folder / "model").mkdir()
    (folder / "model" / "model.safetensors").write_bytes(data)
    return folder / "model"


def _files(*folders: Path) -> list[dict]:
    return [snapshot(f) for f in folders]


def _readable(stores: Path) -> None:
    """Every safetensors file the stores under `stores` (s-*) wrote is one the reference reads."""
    for file in stores.glob("s-*/**/*.safetensors"):
        load_file(file)


def _library(fn, *args, watch: tuple[Path, ...]) -> str:
    """An entry point's outcome ("ok" or "refused"); a refusal changes no file under `watch`."""
    before = _files(*watch)
    kind, detail = call(fn, *args)
    if kind == "refused":
        assert _files(*watch) == before, f"refused ({detail}), yet files changed"
    return kind


def _command(args, cwd: Path, *, watch: tuple[Path, ...]) -> None:
    before = _files(*watch)
    if not cli(args, cwd):
        assert _files(*watch) == before, f"condu-fuse {args[0]} refused, yet files changed"


@settings(max_examples=EXAMPLES)
@given(data=st.one_of(safetensors_files(layout=LAYOUT), safetensors_files()), as_folder=st.booleans())
def test_a_safetensors_file_is_read_as_the_reference_reads_it_or_refused_in_one_line(workspace, data, as_folder):
    with tempfile.TemporaryDirectory() as scratch:
        here = Path(scratch)
        path = _placed(data, here, as_folder)
        file = path / "model.safetensors" if as_folder else path
        reference = _reference(file)

        kind, loaded = call(fusion.load, path, traced=True, only_condu=True)
        if kind == "ok":
            assert reference is not None, "accepted a file the reference implementation refuses"
            assert _same_tensors(loaded, reference)
        kind_opened, opened = call(open_checkpoint, path, only_condu=True)
        assert kind_opened == kind
        if kind_opened == "ok":
            opened.close()

        base, ft, watch = workspace / "base.safetensors", workspace / "ft.safetensors", (workspace, here)
        _library(Store.unify, here / "s-task", base, [path], watch=watch)
        _library(Store.unify, here / "s-base", path, [ft], watch=watch)
        _command(["unify", "--base", base, "--store", here / "s-cli", "-q", path], here, watch=watch)
        shutil.copytree(workspace / "store", here / "s-add")
        _command(["add", "--store", here / "s-add", "-q", "--name", "fuzzed", path], here, watch=watch)
        _readable(here)  # what the stores accepted, they wrote as files the reference reads
