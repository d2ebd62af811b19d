"""Hub ids as checkpoint arguments, and the base taken from the checkpoints' own records.

A hub cache is laid out by hand under a temporary HF_HOME (as huggingface_hub lays it out), and
HF_HUB_OFFLINE=1 keeps every resolution to it: ids must give the same store as the local folders
they were made from, and the store records each id and its commit.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from fusion import Store
from fusion.testing.checkpoints import snapshot, tiny_base, tiny_finetune, write_checkpoint

from tests.hub_cache import add_to_cache

from ..test_hub import MAIN_COMMIT, TAGGED_COMMIT
from .helpers import OPTS, cli_process, manifest, one_line_error, run

def _record(folder: Path, base: str) -> Path:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_name_or_path": base}))
    return folder


def _lora(folder: Path, base: str, seed: int) -> Path:
    """A PEFT-layout LoRA adapter of the tiny base's `layer.0` (8 x 8), recording `base`."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    save_file({"base_model.model.layer.0.lora_A.weight": (rng.integers(-8, 9, (2, 8)) / 8).astype(np.float32),
               "base_model.model.layer.0.lora_B.weight": (rng.integers(-8, 9, (8, 2)) / 8).astype(np.float32)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                            "target_modules": ["layer.0"],
                                                            "base_model_name_or_path": base}))
    return folder


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """Local folders (base, ft-a, ft-b, lora-c) and the same in an offline hub cache as org/<name>;
    org/base also at the tag v1. The fine-tunes record org/base as their base."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = tiny_base()
    local = tmp_path / "local"
    folders = {"base": write_checkpoint(base, local / "base", layout="folder")}
    for seed, name in enumerate(("ft-a", "ft-b")):
        folders[name] = _record(write_checkpoint(tiny_finetune(base, seed=seed), local / name, layout="folder"),
                                "org/base")
    folders["lora-c"] = _lora(local / "lora-c", "org/base", seed=3)
    for name, folder in folders.items():
        add_to_cache(home / "hub", f"org/{name}", MAIN_COMMIT, folder, refs=("main",))
    add_to_cache(home / "hub", "org/base", TAGGED_COMMIT, folders["base"], refs=("v1",))
    return folders


def _fused_files(store_dir: Path) -> dict[str, bytes]:
    """The unified delta and every trigger file by role, and the rescalers: what a pass computed."""
    m = manifest(store_dir)
    files = {f"unified{k}": (store_dir / rel).read_bytes() for k, rel in enumerate(m["unified"]["files"])}
    files.update({f"{t['name']} triggers": (store_dir / t["triggers"]).read_bytes() for t in m["tasks"]})
    files.update({f"{t['name']} rescaler": repr(t["rescaler"]).encode() for t in m["tasks"]})
    return files


@pytest.mark.parametrize("revision", ["", "@main", f"@{MAIN_COMMIT}"])
def test_hub_ids_give_the_same_store_as_the_local_folders(hub, tmp_path, revision):
    ids = [f"org/{name}{revision}" for name in ("ft-a", "ft-b", "lora-c")]
    by_id = run(["unify", "--base", f"org/base{revision}", "--store", "by-id", "-q", *ids], tmp_path)
    assert by_id.exit_code == 0, by_id.output
    local = run(["unify", "--base", hub["base"], "--store", "by-path", "-q", hub["ft-a"], hub["ft-b"], hub["lora-c"]],
                tmp_path)
    assert local.exit_code == 0, local.output
    assert _fused_files(tmp_path / "by-id") == _fused_files(tmp_path / "by-path")

    m = manifest(tmp_path / "by-id")
    expected = {"revision": revision[1:] or None, "commit": MAIN_COMMIT}
    assert m["base"]["hub"] == {"id": "org/base", **expected}
    assert [(t["name"], t["kind"], t["source"]["hub"]) for t in m["tasks"]] == [
        ("ft-a", "model", {"id": "org/ft-a", **expected}), ("ft-b", "model", {"id": "org/ft-b", **expected}),
        ("lora-c", "adapter", {"id": "org/lora-c", **expected})]
    info = run(["info", "--store", "by-id"], tmp_path).output
    assert f"(hub org/base{revision} (commit {MAIN_COMMIT[:12]}))" in info and f"hub org/lora-c{revision}" in info


def test_an_id_at_a_tag_reads_that_commit_and_add_takes_ids(hub, tmp_path):
    store = Store.unify(tmp_path / "s", "org/base@v1", ["org/ft-a"], **OPTS)
    assert manifest(store.path)["base"]["hub"] == {"id": "org/base", "revision": "v1", "commit": TAGGED_COMMIT}
    record = store.add("org/lora-c@main")
    assert (record.name, record.kind, record.hub) == ("lora-c", "adapter",
                                                      {"id": "org/lora-c", "revision": "main", "commit": MAIN_COMMIT})
    report = store.info()
    assert report["base"]["hub"]["commit"] == TAGGED_COMMIT and report["tasks"][1]["hub"]["id"] == "org/lora-c"


def test_an_uncached_id_is_one_line_and_changes_nothing(hub, tmp_path):
    assert run(["unify", "--base", hub["base"], "--store", "s", "-q", hub["ft-a"]], tmp_path).exit_code == 0
    before = snapshot(tmp_path / "s")
    line = one_line_error(run(["add", "--store", "s", "org/absent", "-q"], tmp_path), "org/absent: ")
    assert "hub id org/absent is not in the hub cache" in line and "unset HF_HUB_OFFLINE" in line
    one_line_error(run(["add", "--store", "s", "org/ft-a@v9", "-q"], tmp_path), "org/ft-a@v9")
    assert snapshot(tmp_path / "s") == before
    one_line_error(run(["unify", "--base", "org/absent", "--store", "t", "-q", hub["ft-a"]], tmp_path),
                   "hub id org/absent is not in the hub cache")
    assert not (tmp_path / "t").exists()


def test_the_design_example_takes_the_base_the_checkpoints_record(hub, tmp_path):
    """`condu-fuse unify ckpt_a ckpt_b`: both record org/base (a hub id in the cache)."""
    for name in ("ckpt_a", "ckpt_b"):
        os.symlink(hub["ft-a" if name == "ckpt_a" else "ft-b"], tmp_path / name)
    result = run(["unify", "ckpt_a", "ckpt_b"], tmp_path)
    assert result.exit_code == 0, result.output
    assert (f"condu-fuse: base: org/base at commit {MAIN_COMMIT[:12]} (_name_or_path in ckpt_a/config.json, agreed "
            "by 2 checkpoints)") in result.stderr
    explicit = run(["unify", "--base", hub["base"], "--store", "explicit", "-q", "ckpt_a", "ckpt_b"], tmp_path)
    assert explicit.exit_code == 0
    assert _fused_files(tmp_path / "condu-store") == _fused_files(tmp_path / "explicit")


def test_an_adapter_records_its_base_and_a_local_path_record_works(hub, tmp_path):
    _record(hub["ft-b"], str(hub["base"]))
    adapter_config = json.loads((hub["lora-c"] / "adapter_config.json").read_text())
    (hub["lora-c"] / "adapter_config.json").write_text(json.dumps({**adapter_config,
                                                                   "base_model_name_or_path": str(hub["base"])}))
    result = run(["unify", "--store", "s", hub["ft-b"], hub["lora-c"]], tmp_path)
    assert result.exit_code == 0 and f"base: {hub['base']} (_name_or_path in {hub['ft-b']}/config.json" in result.stderr
    assert manifest(tmp_path / "s")["base"]["hub"] is None


@pytest.mark.parametrize("case, phrase", [
    ("disagree", "the checkpoints record different bases: ft-a 'org/base' (_name_or_path in ft-a/config.json), "
                 "base 'org/other' (_name_or_path in base/config.json); pass --base with"),
    ("none", "records no base model"),
    ("unresolvable", "the checkpoints record the base 'org/gone' (_name_or_path in ft-a/config.json, agreed by 2 "
                     "checkpoints), which does not resolve"),
])
def test_without_a_usable_record_unify_asks_for_the_base(hub, tmp_path, case, phrase):
    os.symlink(hub["ft-a"], tmp_path / "ft-a")
    other = tmp_path / "base"
    if case == "disagree":
        os.symlink(_record(hub["ft-b"], "org/other"), other)
    elif case == "none":
        os.symlink(hub["base"], other)  # the base folder itself records nothing
    else:
        _record(hub["ft-a"], "org/gone")
        os.symlink(_record(hub["ft-b"], "org/gone"), other)
    line = one_line_error(run(["unify", "-q", "ft-a", "base"], tmp_path), phrase)
    assert line.endswith("pass --base") or "pass --base with" in line
    assert not (tmp_path / "condu-store").exists()


def test_local_paths_never_import_the_hub_library(hub, tmp_path):
    """--help and a whole local unify, in processes where importing huggingface_hub fails."""
    for args in (["--help"], ["unify", "--base", hub["base"], "--store", "s", hub["ft-a"], hub["lora-c"]],
                 ["info", "--store", "s"]):
        done = cli_process(args, tmp_path, block="huggingface_hub")
        assert done.returncode == 0, (args, done.stderr)


def test_set_base_takes_an_id_of_the_same_content_and_records_it(hub, tmp_path):
    store = Store.unify(tmp_path / "s", hub["base"], [hub["ft-a"]], **OPTS)
    result = run(["set-base", "org/base@v1", "--store", store.path], tmp_path)
    assert result.exit_code == 0, result.output
    assert manifest(store.path)["base"]["hub"] == {"id": "org/base", "revision": "v1", "commit": TAGGED_COMMIT}
    assert store.verify().ok
    one_line_error(run(["set-base", "org/ft-b", "--store", store.path], tmp_path), "differs from the base")
