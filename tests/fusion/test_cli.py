"""`condu-fuse` end to end: every command through click's runner, and one real process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from fusion import Store
from fusion.cli import main
from fusion.testing.checkpoints import snapshot, tiny_base, tiny_finetune, write_checkpoint

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def models(tmp_path):
    base = tiny_base()
    base_path = write_checkpoint(base, tmp_path / "base", layout="folder")
    paths = [write_checkpoint(tiny_finetune(base, seed=i), tmp_path / f"ckpt_{c}.safetensors") for i, c in enumerate("abc")]
    return base_path, paths


def _run(args, cwd):
    runner = CliRunner()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
    finally:
        os.chdir(old)


def test_the_card_spelling_end_to_end(tmp_path, models):
    base, (a, b, c) = models
    result = _run(["unify", "--base", base, "--quiet", "--kernel", "reference", a, b], tmp_path)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "condu-store" / "condu.json").is_file()  # the default --store
    assert _run(["add", c, "--name", "third", "-q"], tmp_path).exit_code == 0
    result = _run(["decouple", "--task", "3", "-o", "out/", "-q"], tmp_path)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors", "tokenizer_config.json"]
    expected = Store.open(tmp_path / "condu-store").load_task("third")
    decoupled = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(decoupled[n], t) for n, t in expected.items())

    info = _run(["info"], tmp_path)
    assert info.exit_code == 0
    for text in ("ckpt_a", "ckpt_b", "third", "rescaler", "density", "cosine", "separate checkpoints"):
        assert text in info.output
    report = json.loads(_run(["info", "--json"], tmp_path).output)
    assert [t["name"] for t in report["tasks"]] == ["ckpt_a", "ckpt_b", "third"]
    verify = _run(["verify"], tmp_path)
    assert verify.exit_code == 0 and "ok" in verify.output

    assert _run(["remove", "--task", "ckpt_b", "-q"], tmp_path).exit_code == 0
    assert [t.name for t in Store.open(tmp_path / "condu-store").tasks] == ["ckpt_a", "third"]


def test_options_reach_the_store(tmp_path, models):
    base, paths = models
    store = tmp_path / "s"
    result = _run(["unify", "--base", base, "--store", store, "--rescaler", "tensor", "--dtype", "bfloat16",
                   "--name", "x", "--name", "y", "--name", "z", "-q", *paths], tmp_path)
    assert result.exit_code == 0, result.output
    opened = Store.open(store)
    assert [t.name for t in opened.tasks] == ["x", "y", "z"] and isinstance(opened.task("y").rescaler, dict)
    assert _run(["decouple", "--task", "y", "--store", store, "-o", "y.safetensors", "--dtype", "float16", "-q"],
                tmp_path).exit_code == 0
    assert load_file(tmp_path / "y.safetensors")["embed.weight"].dtype == torch.float16


def test_errors_are_one_line_and_change_nothing(tmp_path, models):
    base, (a, b, c) = models
    assert _run(["unify", "--base", base, "-q", a], tmp_path).exit_code == 0
    before = snapshot(tmp_path / "condu-store")
    pickle = tmp_path / "old.bin"
    pickle.write_bytes(b"x")
    cases = [
        (["unify", "--base", base, "-q", b], "already holds a ConDU store; use add"),
        (["add", pickle, "-q"], "convert it to safetensors"),
        (["decouple", "--task", "9", "-o", "x.safetensors"], "no task '9'; choose one of 1 (ckpt_a)"),
        (["remove", "--task", "1"], "cannot remove the only task"),
        (["info", "--store", tmp_path / "none"], "no ConDU store here"),
    ]
    for args, message in cases:
        result = _run(args, tmp_path)
        assert result.exit_code == 1, args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("condu-fuse: error: ") and message in lines[0], lines
    assert snapshot(tmp_path / "condu-store") == before


def test_verify_fails_on_a_corrupt_store(tmp_path, models):
    base, (a, *_) = models
    assert _run(["unify", "--base", base, "-q", a], tmp_path).exit_code == 0
    trig = next((tmp_path / "condu-store" / "triggers").iterdir())
    trig.write_bytes(trig.read_bytes()[:-1] + b"\x00")
    result = _run(["verify"], tmp_path)
    assert result.exit_code == 1 and "sha256" in result.output
    assert "condu-fuse: error: 1 problem(s)" in result.stderr


def test_a_real_process(tmp_path, models):
    base, (a, b, _) = models
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, "-m", "fusion.cli", "unify", "--base", str(base), "--store", str(tmp_path / "p"),
               "--kernel", "reference", str(a), str(b)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "unified 2 task(s)" in done.stdout
    assert "fuse" in done.stderr  # the progress bar goes to stderr
    assert Store.open(tmp_path / "p").verify() == []
