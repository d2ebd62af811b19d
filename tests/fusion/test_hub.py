"""Hub ids: resolved from a hub cache laid out on disk as huggingface_hub lays it out
(tests/hub_cache.py), under a temporary HF_HOME, offline."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fusion.hub import ResolvedCheckpoint, parse_hub_id, recorded_base, resolve_checkpoint

from tests.hub_cache import add_to_cache

MAIN_COMMIT = "a" * 40
TAGGED_COMMIT = "b" * 40


def checkpoint_folder(folder: Path, seed: int) -> Path:
    """A small model folder: safetensors weights, a config naming its base, a tokenizer file."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    save_file({"w": rng.standard_normal((3, 4)).astype(np.float32)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "org/base", "model_type": "toy"}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"pickled weights are never fetched")
    return folder


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline hub cache holding org/model at two commits: main, and the tag v1."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    locals_ = {name: checkpoint_folder(tmp_path / "local" / name, seed) for seed, name in enumerate(("main", "v1"))}
    snapshots = {
        "main": add_to_cache(home / "hub", "org/model", MAIN_COMMIT, locals_["main"], refs=("main",)),
        "v1": add_to_cache(home / "hub", "org/model", TAGGED_COMMIT, locals_["v1"], refs=("v1",)),
    }
    return locals_, snapshots


def same_weights(a: Path, b: Path) -> bool:
    left, right = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return left.keys() == right.keys() and all(np.array_equal(left[k], right[k]) for k in left)


@pytest.mark.parametrize("argument, ref, commit, revision", [
    ("org/model", "main", MAIN_COMMIT, None),
    ("org/model@main", "main", MAIN_COMMIT, "main"),
    ("org/model@v1", "v1", TAGGED_COMMIT, "v1"),
    (f"org/model@{TAGGED_COMMIT}", "v1", TAGGED_COMMIT, TAGGED_COMMIT),
])
def test_an_id_resolves_to_its_snapshot_offline(hub_cache, argument, ref, commit, revision):
    locals_, snapshots = hub_cache
    resolved = resolve_checkpoint(argument)
    assert resolved == ResolvedCheckpoint(path=resolved.path, hub_id="org/model", revision=revision, commit=commit)
    assert resolved.from_hub
    assert Path(resolved.path).resolve() == snapshots[ref].resolve()
    assert same_weights(resolved.path, locals_[ref])  # the same checkpoint as the local folder
    assert recorded_base(resolved.path) == recorded_base(locals_[ref]) == "org/base"


def test_a_local_path_wins_over_an_id_of_the_same_name(hub_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoint_folder(tmp_path / "org" / "model", seed=7)
    resolved = resolve_checkpoint("org/model")
    assert resolved == ResolvedCheckpoint(path=Path("org/model"))
    assert not resolved.from_hub and resolved.commit is None


def one_line_error(argument: str) -> str:
    with pytest.raises(ValueError) as err:
        resolve_checkpoint(argument)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{argument}: ")
    return message


def test_an_uncached_id_offline_is_one_line_naming_the_id_and_the_fix(hub_cache):
    message = one_line_error("org/absent")
    assert "hub id org/absent is not in the hub cache" in message and "unset HF_HUB_OFFLINE" in message
    assert "org/model@v2" in one_line_error("org/model@v2")


def test_an_uncached_id_without_a_connection_is_one_line(hub_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: the connection is refused
    code = ("import sys; from fusion.hub import resolve_checkpoint\n"
            "try:\n    resolve_checkpoint('org/absent')\nexcept ValueError as err:\n    sys.exit(str(err))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.startswith("org/absent: ") and done.stderr.count("\n") == 1
    assert "no connection to the hub" in done.stderr and "connect once" in done.stderr


@pytest.mark.parametrize("argument", ["./missing", "/no/such/folder", "just-a-name", "a/b/c", "org/na me"])
def test_a_missing_path_that_is_no_id_is_one_line(hub_cache, argument):
    assert "no such file or folder, and not a hub id" in one_line_error(argument)


def test_parse_hub_id_follows_the_hub_naming_rules():
    assert parse_hub_id("openai/clip-vit-base-patch16") == ("openai/clip-vit-base-patch16", None)
    assert parse_hub_id("org/name@refs/pr/3") == ("org/name", "refs/pr/3")
    for bad in ("name", "org/na--me", "org/a..b", "org/name.git", "-org/name", "org/name@", "org/name@a@b", "/abs/x"):
        assert parse_hub_id(bad) is None, bad


def test_only_checkpoint_files_are_fetched(hub_cache):
    from fusion.hub import HUB_FILES
    from huggingface_hub.utils import filter_repo_objects

    files = ["model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
             "config.json", "tokenizer.json", "adapter_config.json", "adapter_model.safetensors",
             "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "training_args.bin", "README.md"]
    kept = list(filter_repo_objects(files, allow_patterns=list(HUB_FILES)))
    assert kept == [*files[:7], "README.md"]  # the model card names the base


def test_a_snapshot_without_safetensors_weights_is_refused(hub_cache, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    add_to_cache(tmp_path / "hf-home" / "hub", "org/pickled", "c" * 40, pickled, refs=("main",))
    assert "no .safetensors weights" in one_line_error("org/pickled")


def test_recorded_base_reads_the_adapter_record_first(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/clip", "r": 8}))
    (adapter / "config.json").write_text(json.dumps({"_name_or_path": "elsewhere"}))
    assert recorded_base(adapter) == "org/clip"
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text(json.dumps({"_name_or_path": ""}))
    assert recorded_base(tmp_path / "bare") is None
    assert recorded_base(tmp_path / "bare" / "config.json") is None  # a file names no base
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: config is not valid JSON"):
        recorded_base(tmp_path / "broken")


def test_the_module_needs_neither_torch_nor_the_hub_library_to_import():
    root = Path(__file__).resolve().parents[2]
    code = ("import sys\n"
            "from fusion import hub\n"
            "assert hub.resolve_checkpoint('.').path.exists()\n"
            "print(sorted({'torch', 'numpy', 'huggingface_hub'} & {m.split('.')[0] for m in sys.modules}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                          cwd=root)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("revision", ["../refs/main", "/etc", "-x", "a..b", "main.lock", "refs/.hidden", "a//b", "v1/",
                                      "v1.", "a~1", "a^", "a:b", "a?", "a*", "a[b", "a\\b", "a\x01b", "a\x7fb"])
def test_a_revision_that_is_no_ref_name_is_refused_in_one_line(revision):
    with pytest.raises(ValueError) as err:
        parse_hub_id(f"org/model@{revision}")
    message = str(err.value)
    assert message.startswith("org/model: revision ") and "is not a branch, tag or commit name" in message
    assert "\n" not in message and not any(ord(c) < 32 or ord(c) == 127 for c in message)


@pytest.mark.parametrize("revision", ["main", "v1.0", "refs/pr/3", "feature/x-y_z", TAGGED_COMMIT])
def test_branch_tag_and_commit_revisions_are_kept(revision):
    assert parse_hub_id(f"org/model@{revision}") == ("org/model", revision)


def test_a_bad_revision_is_one_line_in_the_cli_and_creates_nothing(hub_cache, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from fusion.cli import main

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["unify", "--base", "org/model@../refs/main", "--store", "s", "org/model"])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "revision '../refs/main' is not a branch, tag or commit name" in result.stderr
    assert not (tmp_path / "s").exists()
