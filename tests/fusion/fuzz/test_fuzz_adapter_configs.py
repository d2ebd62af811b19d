"""Fuzz: adapter_config.json, valid and broken, through every entry point that reads one.

A LoRA adapter of rank 2 on the tiny base's `layer.0` carries a drawn config. It is read by
`read_adapter_config`, `Store.unify` (dense, and in factor space beside a base adapter),
`condu-fuse unify` (with --base, and without: the base the config records) and `condu-fuse add`.
Each refuses in one line within a bounded time, changing no file, or takes the adapter as PEFT
would: the task a dense store rebuilds is base + scaling * B @ A, with the rank and alpha PEFT's
own `get_pattern_key` picks for the module.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from peft.utils.other import get_pattern_key
from safetensors.numpy import save_file

from fusion.io.adapter import read_adapter_config
from fusion.store import Store
from fusion.testing.checkpoints import snapshot, tiny_base, tiny_finetune, write_checkpoint
from fusion.testing.strategies import adapter_configs

from .outcomes import call, cli

MODULE, RANK = "layer.0", 2
EXAMPLES = 50
_RNG = np.random.default_rng(7)
A = (_RNG.integers(-8, 9, (RANK, 8)) / 8).astype(np.float32)  # (r, in)
B = (_RNG.integers(-8, 9, (8, RANK)) / 8).astype(np.float32)  # (out, r)
BASE_ADAPTER_CONFIG = b'{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["layer.0"]}'


def _adapter(folder: Path, config: bytes, a: np.ndarray = A, b: np.ndarray = B) -> Path:
    folder.mkdir()
    save_file({f"base_model.model.{MODULE}.lora_A.weight": a, f"base_model.model.{MODULE}.lora_B.weight": b},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_bytes(config)
    return folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """The tiny base, a dense store of it (a template for `add`) and a base adapter (factor space)."""
    root = tmp_path_factory.mktemp("configs")
    base = tiny_base()
    write_checkpoint(base, root / "base.safetensors")
    write_checkpoint(tiny_finetune(base, seed=1), root / "ft.safetensors")
    Store.unify(root / "store", root / "base.safetensors", [root / "ft.safetensors"])
    _adapter(root / "base-adapter", BASE_ADAPTER_CONFIG, A / 2, B / 2)
    return root


def _peft_delta(config: dict) -> np.ndarray:
    """The delta PEFT merges for MODULE: its rank and alpha picked by PEFT's own function."""
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rank = ranks.get(get_pattern_key(ranks.keys(), MODULE), config.get("r", 8))
    alpha = alphas.get(get_pattern_key(alphas.keys(), MODULE), config.get("lora_alpha", 8))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    product = B.astype(np.float64) @ A  # (out, in); layer.0 is square, so fan_in_fan_out decides
    return scaling * (product.T if config.get("fan_in_fan_out") else product)


def _checked(fn, *args, watch: tuple[Path, ...]) -> tuple[str, object]:
    before = [snapshot(f) for f in watch]
    kind, detail = call(fn, *args)
    if kind == "refused":
        assert [snapshot(f) for f in watch] == before, f"refused ({detail}), yet files changed"
    return kind, detail


def _command(args, cwd: Path, *, watch: tuple[Path, ...]) -> None:
    before = [snapshot(f) for f in watch]
    if not cli(args, cwd):
        assert [snapshot(f) for f in watch] == before, f"condu-fuse {args[0]} refused, yet files changed"


@settings(max_examples=EXAMPLES)
@given(config=adapter_configs(modules=[MODULE], rank=RANK))
def test_an_adapter_config_is_taken_as_peft_takes_it_or_refused_in_one_line(workspace, config):
    with tempfile.TemporaryDirectory() as scratch:
        here = Path(scratch)
        adapter = _adapter(here / "adapter", config)
        watch = (workspace, here)
        kind, typed = call(read_adapter_config, adapter, traced=True, only_condu=True)

        base = workspace / "base.safetensors"
        kind, store = _checked(Store.unify, here / "s-dense", base, [adapter], watch=watch)
        if kind == "ok":
            assert typed is not None
            rebuilt = store.load_task(1)["layer.0.weight"].astype(np.float64)
            expected = tiny_base()["layer.0.weight"] + _peft_delta(typed)
            np.testing.assert_allclose(rebuilt, expected, rtol=1e-5, atol=1e-6)
        _checked(Store.unify, here / "s-factor", workspace / "base-adapter", [adapter], watch=watch)
        _command(["unify", "--base", base, "--store", here / "s-cli", "-q", adapter], here, watch=watch)
        _command(["unify", "--store", here / "s-inferred", "-q", adapter], here, watch=watch)
        shutil.copytree(workspace / "store", here / "s-add")
        _command(["add", "--store", here / "s-add", "-q", "--name", "fuzzed", adapter], here, watch=watch)
