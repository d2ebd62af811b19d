"""`condu-fuse` end to end: every command through click's runner, and real processes without torch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fusion import Store
from fusion.cli import parse_size
from fusion.testing.checkpoints import snapshot, tiny_base, tiny_finetune, write_checkpoint

from .store.helpers import one_line_error, run

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def models(tmp_path):
    base = tiny_base()
    base_path = write_checkpoint(base, tmp_path / "base", layout="folder")
    paths = [write_checkpoint(tiny_finetune(base, seed=i), tmp_path / f"ckpt_{c}.safetensors") for i, c in enumerate("abc")]
    return base_path, paths


def test_the_design_spelling_end_to_end(tmp_path, models):
    base, (a, b, c) = models
    result = run(["unify", "--base", base, "--quiet", "--kernel", "reference", a, b], tmp_path)
    assert result.exit_code == 0 and "1 (ckpt_a), 2 (ckpt_b)" in result.output
    assert (tmp_path / "condu-store" / "condu.json").is_file()  # the default --store
    assert run(["add", c, "--name", "third", "-q"], tmp_path).exit_code == 0
    result = run(["decouple", "--task", "3", "-q"], tmp_path)  # no -o: ./third/
    assert result.exit_code == 0 and "third" in result.output
    assert sorted(p.name for p in (tmp_path / "third").iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                                      "tokenizer_config.json"]
    expected = Store.open(tmp_path / "condu-store").load_task("third")
    decoupled = load_file(tmp_path / "third" / "model.safetensors")
    assert all(np.array_equal(decoupled[n], t) for n, t in expected.items())

    info = run(["info"], tmp_path)
    for text in ("ckpt_a", "ckpt_b", "third", "rescaler", "density", "cosine", "separate checkpoints", "format v2"):
        assert text in info.output
    report = json.loads(run(["info", "--json"], tmp_path).output)
    assert [(t["number"], t["name"]) for t in report["tasks"]] == [(1, "ckpt_a"), (2, "ckpt_b"), (3, "third")]
    verify = run(["verify"], tmp_path)
    assert verify.exit_code == 0 and "task 3 (third): whole" in verify.output and "ok" in verify.output

    assert run(["remove", "--task", "ckpt_b", "-q"], tmp_path).exit_code == 0
    assert [(t.number, t.name) for t in Store.open(tmp_path / "condu-store").tasks] == [(1, "ckpt_a"), (3, "third")]
    assert json.loads(run(["verify", "--json"], tmp_path).output)["ok"] is True


def test_options_reach_the_store(tmp_path, models):
    base, paths = models
    store = tmp_path / "s"
    result = run(["unify", "--base", base, "--store", store, "--rescaler", "tensor", "--dtype", "bfloat16",
                  "--name", "x", "--name", "y", "--name", "z", "-q", *paths], tmp_path)
    assert result.exit_code == 0, result.output
    opened = Store.open(store)
    assert [t.name for t in opened.tasks] == ["x", "y", "z"] and isinstance(opened.task("y").rescaler, dict)
    assert run(["decouple", "--task", "y", "--store", store, "-o", "y.safetensors", "--dtype", "float16", "-q"],
               tmp_path).exit_code == 0
    assert load_file(tmp_path / "y.safetensors")["embed.weight"].dtype == np.float16


def test_errors_are_one_line_and_change_nothing(tmp_path, models):
    base, (a, b, c) = models
    assert run(["unify", "--base", base, "-q", a], tmp_path).exit_code == 0
    before = snapshot(tmp_path / "condu-store")
    pickle = tmp_path / "old.bin"
    pickle.write_bytes(b"x")
    cases = [
        (["unify", "--base", base, "-q", b], "already holds a ConDU store; use add"),
        (["add", pickle, "-q"], "convert it to safetensors"),
        (["add", b, "--name", "5"], "is a number"),
        (["add", tmp_path / "nowhere", "-q"], "no such file or folder, and not a hub id"),
        (["decouple", "--task", "9", "-o", "x.safetensors"], "no task '9'; choose a number or a name: 1 (ckpt_a)"),
        (["remove", "--task", "1"], "is the only one"),
        (["info", "--store", tmp_path / "none"], "no ConDU store here"),
    ]
    for args, message in cases:
        one_line_error(run(args, tmp_path), message)
    assert snapshot(tmp_path / "condu-store") == before


def test_sizes_parse_like_save_pretrained():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size("123") == 123
    assert parse_size("2g") == 2 * 10**9


# A `torch` package that refuses to be imported: the CPU path must never need it.
NO_TORCH = "raise ImportError('condu-fuse imported torch on its CPU path')\n"


def _cli(args, tmp_path, blocker):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "fusion.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)


@pytest.mark.parametrize("kernel", ["reference", "cpu"])
def test_real_processes_never_import_torch(tmp_path, models, kernel):
    blocker = tmp_path / "blocker"
    (blocker / "torch").mkdir(parents=True)
    (blocker / "torch" / "__init__.py").write_text(NO_TORCH)
    base, (a, b, c) = models
    store = tmp_path / "p"
    for args in (["unify", "--base", base, "--store", store, "--kernel", kernel, a, b],
                 ["add", "--store", store, c], ["decouple", "--store", store, "--task", "2", "-o", tmp_path / "o"],
                 ["remove", "--store", store, "--task", "1"], ["info", "--store", store], ["verify", "--store", store],
                 ["--help"]):
        done = _cli(args, tmp_path, blocker)
        assert done.returncode == 0, (args, done.stderr)
    assert Store.open(store).verify().ok
