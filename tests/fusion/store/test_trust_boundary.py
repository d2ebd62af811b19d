"""The trust boundary around the files a command follows or loads from outside the store: a link
that leaves an input folder (or a hub cache repository's blobs/), a special file, an oversized
side file are refused in one line and change nothing; copies are no more open than their source;
a damaged side file blocks only reads that use it; `verify` reports a backup manifest that could
not restore the store; a full disk names the file it was writing."""

import errno
import json
import os
import stat

import pytest

import fusion.io.files as files
from fusion import Store
from fusion.errors import InputError
from fusion.hub import recorded_base
from fusion.io.adapter import read_adapter_config
from fusion.io.files import SIDE_FILE_BYTES, atomic_write_bytes, check_opened, read_side_file
from fusion.store.transaction import change
from fusion.testing.checkpoints import tiny_base, tiny_finetune, write_checkpoint

from tests.hub_cache import add_to_cache

from .helpers import OPTS, equal_models, one_line_error, run
from .ondisk import disk_state

SECRET = '{"token": "hunter2"}'
SIDE_NAMES = ["config.json", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json",
              "README.md", "adapter_config.json", "model.safetensors.index.json"]


@pytest.fixture
def models(tmp_path):
    """A base folder, two fine-tune folders (one sharded, with an index), and a private file outside them."""
    base = tiny_base()
    secret = tmp_path / "private" / "secret.json"
    secret.parent.mkdir()
    secret.write_text(SECRET)
    secret.chmod(0o600)
    return {"base": write_checkpoint(base, tmp_path / "base", layout="folder"),
            "ft": write_checkpoint(tiny_finetune(base, seed=1), tmp_path / "ft", layout="folder"),
            "sharded": write_checkpoint(tiny_finetune(base, seed=2), tmp_path / "sharded", layout="sharded"),
            "secret": secret, "truth": tiny_finetune(base, seed=1)}


def _link(path, target):
    path.unlink(missing_ok=True)
    path.symlink_to(target)


def _refused(tmp_path, args, phrase):
    """`condu-fuse ARGS` fails in one line containing `phrase` and changes nothing under tmp_path
    (the store, the models, the private file, the hub cache: every test keeps them all there)."""
    before = disk_state(tmp_path)
    line = one_line_error(run(args, tmp_path), phrase)
    assert disk_state(tmp_path) == before
    assert "hunter2" not in line
    return line


# ---- links out of an input folder ------------------------------------------------------------


@pytest.mark.parametrize("name", SIDE_NAMES)
def test_unify_refuses_a_side_file_linking_out_of_its_folder(models, tmp_path, name):
    folder = models["sharded" if name == "model.safetensors.index.json" else "ft"]
    _link(folder / name, models["secret"])
    line = _refused(tmp_path, ["unify", "--base", models["base"], "--store", "s", "-q", folder], "outside its folder")
    assert f"{folder / name}: a link to {models['secret']}" in line and "copy the file into the folder" in line


def test_a_link_to_proc_is_refused(models, tmp_path):
    _link(models["ft"] / "tokenizer_config.json", "/proc/self/environ")
    _refused(tmp_path, ["unify", "--base", models["base"], "--store", "s", "-q", models["ft"]], "outside its folder")


def test_add_refuses_a_linked_side_file_and_the_store_is_unchanged(models, tmp_path):
    assert run(["unify", "--base", models["base"], "--store", "s", "-q", models["sharded"]], tmp_path).exit_code == 0
    _link(models["ft"] / "config.json", models["secret"])
    _refused(tmp_path, ["add", models["ft"], "--store", "s", "-q"], "outside its folder")


@pytest.mark.parametrize("weights", ["model.safetensors", "model-00001-of-00002.safetensors"])
def test_weights_linking_out_of_their_folder_are_refused(models, tmp_path, weights):
    folder = models["ft" if weights == "model.safetensors" else "sharded"]
    outside = tmp_path / "private" / weights
    os.rename(folder / weights, outside)
    _link(folder / weights, outside)
    _refused(tmp_path, ["unify", "--base", models["base"], "--store", "s", "-q", folder], "outside its folder")


def test_links_inside_the_folder_are_followed(models, tmp_path):
    folder = models["ft"]
    (folder / "real").mkdir()
    os.rename(folder / "config.json", folder / "real" / "config.json")
    _link(folder / "config.json", "real/config.json")
    store = Store.unify(tmp_path / "s", models["base"], [folder], **OPTS)
    copied = store.path / "files" / "t0001" / "config.json"
    assert copied.read_bytes() == (folder / "real" / "config.json").read_bytes()


def test_special_and_oversized_side_files_are_refused(models, tmp_path):
    os.mkfifo(models["ft"] / "tokenizer.json")  # opening it would block
    _refused(tmp_path, ["unify", "--base", models["base"], "--store", "s", "-q", models["ft"]], "not a regular file")
    os.unlink(models["ft"] / "tokenizer.json")
    with open(models["ft"] / "tokenizer.json", "wb") as f:
        f.truncate(SIDE_FILE_BYTES + 1)  # sparse: nothing is written
    _refused(tmp_path, ["unify", "--base", models["base"], "--store", "s", "-q", models["ft"]],
             f"more than the {SIDE_FILE_BYTES} a side file may have")


def test_the_base_record_is_not_read_through_a_link_out(models, tmp_path):
    _link(models["ft"] / "config.json", models["secret"])
    with pytest.raises(InputError, match="outside its folder"):
        recorded_base(models["ft"])
    _refused(tmp_path, ["unify", "--store", "s", "-q", models["ft"]], "outside its folder")


def test_an_adapter_config_is_not_read_through_a_link_out(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (tmp_path / "elsewhere.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (folder / "adapter_config.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(InputError, match="outside its folder"):
        read_adapter_config(folder)


def test_a_file_is_checked_as_opened_not_by_its_path(models, tmp_path):
    """A folder swapped for a link between the check and the open: the descriptor shows where it went."""
    fd = os.open(models["secret"], os.O_RDONLY)
    try:
        with pytest.raises(InputError, match=f"a link to {models['secret']}, outside its folder"):
            check_opened(fd, models["ft"] / "config.json", folder=models["ft"])
    finally:
        os.close(fd)


def test_copied_side_files_are_no_more_open_than_their_source(models, tmp_path):
    (models["ft"] / "tokenizer_config.json").chmod(0o600)
    store = Store.unify(tmp_path / "s", models["base"], [models["ft"]], **OPTS)
    copied = store.path / "files" / "t0001"
    assert stat.S_IMODE((copied / "tokenizer_config.json").stat().st_mode) & 0o077 == 0
    assert read_side_file(copied / "config.json").data == (models["ft"] / "config.json").read_bytes()


def test_the_base_folder_side_files_copied_at_decouple_follow_the_same_rules(models, tmp_path):
    """A task added from a lone file gets the base folder's side files in its decoupled folder."""
    lone = write_checkpoint(models["truth"], tmp_path / "lone.safetensors")
    store = Store.unify(tmp_path / "s", models["base"], [lone], **OPTS)
    (models["base"] / "tokenizer_config.json").chmod(0o600)
    store.decouple("lone", tmp_path / "out")
    assert stat.S_IMODE((tmp_path / "out" / "tokenizer_config.json").stat().st_mode) & 0o077 == 0
    _link(models["base"] / "config.json", models["secret"])
    _refused(tmp_path, ["decouple", "--task", "lone", "-o", "out2", "--store", "s", "-q"], "outside its folder")


@pytest.mark.parametrize("depth, phrase", [(100, "nests objects and lists 100 deep, more than the 32"),
                                          (100000, "nests objects and lists 100000 deep")])
def test_outside_json_is_bounded_in_depth(models, depth, phrase):
    (models["ft"] / "config.json").write_text("[" * depth + "]" * depth)
    with pytest.raises(InputError, match=phrase):
        recorded_base(models["ft"])


# ---- a hub cache ---------------------------------------------------------------------------------


@pytest.fixture
def hub(models, tmp_path, monkeypatch):
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return add_to_cache(home / "hub", "org/ft", "a" * 40, models["ft"], refs=("main",))


def test_hub_snapshot_links_into_blobs_are_followed(models, hub, tmp_path):
    store = Store.unify(tmp_path / "s", models["base"], ["org/ft"], **OPTS)
    assert equal_models(store.load_task(1), models["truth"])
    assert (store.path / "files" / "t0001" / "config.json").read_bytes() == (models["ft"] / "config.json").read_bytes()


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_hub_snapshot_links_out_of_blobs_are_refused(models, hub, tmp_path, name):
    """A snapshot link to another file, even one inside the cache: only the repository's blobs/ hold content."""
    elsewhere = {"config.json": models["secret"], "model.safetensors": models["ft"] / "model.safetensors"}[name]
    _link(hub / name, elsewhere)
    line = _refused(tmp_path, ["unify", "--base", models["base"], "--store", "s", "-q", "org/ft"],
                    "outside its hub cache repository's blobs/")
    assert f"{hub / name}: a link to {elsewhere}" in line


# ---- a damaged side file blocks only what reads it ----------------------------------------------


def test_a_damaged_side_file_blocks_a_folder_but_not_a_weights_file(models, tmp_path):
    store = Store.unify(tmp_path / "s", models["base"], [models["ft"]], **OPTS)
    config = store.path / "files" / "t0001" / "config.json"
    config.write_bytes(b"X" + config.read_bytes()[1:])
    assert run(["decouple", "--task", "1", "-o", "x.safetensors", "--store", "s", "-q"], tmp_path).exit_code == 0
    from safetensors.numpy import load_file

    rebuilt = load_file(tmp_path / "x.safetensors")
    assert equal_models(rebuilt, models["truth"])
    _refused(tmp_path, ["decouple", "--task", "1", "-o", "folder", "--store", "s", "-q"], "files/t0001/config.json")


# ---- verify and the backup manifest ---------------------------------------------------------------


@pytest.mark.parametrize("damage", ["missing", "damaged", "folder"])
def test_verify_says_when_repair_would_have_nothing_to_restore_from(models, tmp_path, damage):
    store = Store.unify(tmp_path / "s", models["base"], [models["ft"]], **OPTS)
    backup = store.path / "condu.backup.json"
    if damage == "damaged":
        backup.write_bytes(backup.read_bytes().replace(b'"generation":0', b'"generation":7'))
    else:
        backup.unlink()
        if damage == "folder":
            backup.mkdir()
    before = disk_state(tmp_path)
    result = run(["verify", "--store", "s"], tmp_path)
    reason = {"missing": "missing", "damaged": "damaged", "folder": "unreadable (Is a directory)"}[damage]
    assert f"store: condu.backup.json: {reason}, so `condu-fuse repair` could not restore" in result.stdout
    assert "task 1 (ft): whole" in result.stdout
    one_line_error(result, "1 problem(s) in s")
    report = json.loads(run(["verify", "--json", "--store", "s"], tmp_path).stdout)
    assert report["ok"] is False and report["shared"] == [] and len(report["store"]) == 1
    assert disk_state(tmp_path) == before
    repaired = run(["repair", "--store", "s"], tmp_path)  # what the line says to do
    assert repaired.exit_code == 0 and "condu.backup.json: rewritten from condu.json" in repaired.stdout
    assert backup.read_bytes() == (store.path / "condu.json").read_bytes()
    assert run(["verify", "--store", "s"], tmp_path).exit_code == 0
    assert "nothing to repair" in run(["repair", "--store", "s"], tmp_path).stdout


def test_repair_never_deletes_a_folder_with_files_in_the_backup_s_place(models, tmp_path):
    store = Store.unify(tmp_path / "s", models["base"], [models["ft"]], **OPTS)
    backup = store.path / "condu.backup.json"
    backup.unlink()
    backup.mkdir()
    (backup / "notes.txt").write_text("mine")
    before = disk_state(tmp_path)
    one_line_error(run(["repair", "--store", "s"], tmp_path), "a folder with files in it; move it out of the store")
    assert disk_state(tmp_path) == before


# ---- a full disk ------------------------------------------------------------------------------------


def _full(fd, data):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_names_the_small_file_it_was_writing(tmp_path, monkeypatch):
    target = tmp_path / "condu.json"
    target.write_bytes(b"old")
    monkeypatch.setattr(files, "_write_fd", _full)
    with pytest.raises(OSError) as caught:
        atomic_write_bytes(target, b"x" * 1234)
    assert caught.value.errno == errno.ENOSPC
    assert str(caught.value) == (f"[Errno {errno.ENOSPC}] {target}: no space left on the device (writing 1234 bytes); "
                                 "free space there or write elsewhere")
    assert os.listdir(tmp_path) == ["condu.json"] and target.read_bytes() == b"old"


def test_a_full_disk_during_add_names_the_file_and_changes_nothing(models, tmp_path, monkeypatch):
    assert run(["unify", "--base", models["base"], "--store", "s", "-q", models["sharded"]], tmp_path).exit_code == 0
    monkeypatch.setattr(files, "_write_fd", _full)  # the side files are the first small files an add writes
    line = _refused(tmp_path, ["add", models["ft"], "--store", "s", "-q"], "no space left on the device")
    size = len((models["ft"] / "config.json").read_bytes())
    assert f"s/files/t0002/config.json: no space left on the device (writing {size} bytes)" in line


def test_a_full_disk_no_writer_named_names_the_store(tmp_path):
    (tmp_path / "s").mkdir()
    with pytest.raises(OSError, match=rf"^\[Errno {errno.ENOSPC}\] {tmp_path / 's'}: no space left on the device;"):
        with change(tmp_path / "s", lambda: None):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["condu.lock"]  # nothing else was made


# ---- the store's own JSON, bounded too ----------------------------------------------------------------


def test_a_deeply_nested_manifest_is_damage_in_one_line(models, tmp_path):
    store = Store.unify(tmp_path / "s", models["base"], [models["ft"]], **OPTS)
    (store.path / "condu.json").write_bytes(b'{"format": "condu-store", "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}")
    before = disk_state(tmp_path)
    line = one_line_error(run(["info", "--store", "s"], tmp_path), "the manifest nests objects and lists 200001 deep")
    assert "condu-fuse repair" in line
    assert disk_state(tmp_path) == before
    assert run(["repair", "--store", "s"], tmp_path).exit_code == 0 and store.verify().ok


def test_a_deeply_nested_config_of_a_fine_tune_is_kept_as_it_is(models, tmp_path):
    """The store copies a task's config.json as given; decouple, which sets its dtype, never recurses on it."""
    nested = b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    (models["ft"] / "config.json").write_bytes(nested)
    Store.unify(tmp_path / "s", models["base"], [models["ft"]], **OPTS)
    result = run(["decouple", "--task", "1", "-o", "folder", "--store", "s", "-q"], tmp_path)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "folder" / "config.json").read_bytes() == nested
