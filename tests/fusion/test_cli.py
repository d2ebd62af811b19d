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
from .store.test_surprises import far_apart

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


# ---- no silent surprises ----------------------------------------------------------------------

DEGRADED = ("condu-fuse: warning: task 2 (b) is rebuilt farther from its fine-tune than the base is (rel_l2 1.414{at}); "
            "it is better served by its own checkpoint or a store of its own kind")


def test_tasks_rebuilt_farther_than_the_base_warn_on_one_line_each(tmp_path):
    paths = far_apart(tmp_path)
    result = run(["unify", "--base", paths["base"], "--kernel", "reference", "-q", paths["a"], paths["b"]], tmp_path)
    assert result.exit_code == 0 and result.stderr.splitlines() == [DEGRADED.format(at="")]
    assert "unified 2 task(s)" in result.stdout and "warning" not in result.stdout
    info = run(["info"], tmp_path)
    assert info.exit_code == 0 and info.stderr.splitlines() == [DEGRADED.format(at="")]
    assert [t["degraded"] for t in json.loads(run(["info", "--json"], tmp_path).stdout)["tasks"]] == [False, True]
    paths["b"].unlink()  # b's fidelity can no longer be measured: the last measure stands, and says when
    added = run(["add", paths["c"], "-q"], tmp_path)
    assert added.exit_code == 0 and "added task 3 (c)" in added.stdout
    assert added.stderr.splitlines() == [DEGRADED.format(at=", measured at generation 0")]


def test_no_warning_when_every_task_is_nearer_than_the_base(tmp_path, models):
    base, (a, b, c) = models
    assert run(["unify", "--base", base, "-q", "--kernel", "reference", a, b], tmp_path).stderr == ""
    assert run(["info"], tmp_path).stderr == ""


def test_the_same_content_twice_is_one_line_and_changes_nothing(tmp_path, models):
    base, (a, b, c) = models
    assert run(["unify", "--base", base, "-q", "--kernel", "reference", a, b], tmp_path).exit_code == 0
    before = snapshot(tmp_path / "condu-store")
    copy = tmp_path / "b-copy.safetensors"
    copy.write_bytes(b.read_bytes())
    line = one_line_error(run(["add", "-q", copy], tmp_path), f"{copy}: the same content as task 2 (ckpt_b)")
    assert line.endswith("; pass --name to keep a second copy")
    assert snapshot(tmp_path / "condu-store") == before
    assert run(["add", "-q", "--name", "b-again", copy], tmp_path).exit_code == 0
    one_line_error(run(["unify", "--base", base, "--store", "t", "-q", a, c, a], tmp_path),
                   f"{a}: the same content as task 1 (ckpt_a); give each checkpoint a --name to keep both")
    assert not (tmp_path / "t").exists()
