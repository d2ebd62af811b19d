"""A store that is its users' only copy: damage is refused in one line, never returned as a model,
and it costs only what it must: a task's own damaged file loses that task alone."""

import json
import shutil

import hypothesis.strategies as st
import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings

from fusion import Store
from fusion.testing.checkpoints import snapshot, tiny_base, tiny_finetune, write_checkpoint

from .helpers import (OPTS, equal_models, flip_a_bit_and_decouple_every_task, flip_byte, manifest, models,
                      one_line_error, run, task_entry)


@pytest.fixture
def store(tmp_path):
    """Three tasks; their correct models, decoupled before any damage."""
    base_path, paths, _, _ = models(tmp_path, 3)
    store = Store.unify(tmp_path / "s", base_path, paths[:2], **OPTS)
    store.add(paths[2])
    store.attach(3, "prototypes", {"p": np.ones((2, 3), np.float32)})
    store.truth = {t.number: store.load_task(t.number) for t in store.tasks}
    return store


def _decouple(store, task, tmp_path, name="out.safetensors"):
    out = tmp_path / name
    result = run(["decouple", "--store", store.path, "--task", task, "-o", out, "-q"], tmp_path)
    return result, out


def _store_file(store, kind, number=None):
    if kind == "unified":
        return store.path / manifest(store.path)["unified"]["files"][0]
    entry = next(t for t in manifest(store.path)["tasks"] if t["number"] == number)
    return store.path / (entry[kind] if kind != "attachments" else entry["attachments"]["prototypes"])


# ---- data files -----------------------------------------------------------------------------


def test_a_damaged_unified_file_refuses_every_task_and_every_change(store, tmp_path):
    flip_byte(_store_file(store, "unified"), -5)
    before = snapshot(store.path)
    for task in ("1", "task3"):
        result, out = _decouple(store, task, tmp_path)
        one_line_error(result, "(the unified delta: every task)")
        assert not out.exists()
    one_line_error(run(["add", "--store", store.path, tmp_path / "task1.safetensors", "--name", "again", "-q"], tmp_path),
                   "do not match their checksum")
    one_line_error(run(["remove", "--store", store.path, "--task", "2", "-q"], tmp_path), "do not match their checksum")
    assert snapshot(store.path) == before  # nothing baked the damage into a new generation
    result = run(["verify", "--store", store.path], tmp_path)
    assert result.exit_code == 1 and "every task: unified-g000001.safetensors" in result.output


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_a_damaged_trigger_loses_only_its_task_and_remove_drops_it(store, tmp_path, damage):
    trigger = _store_file(store, "triggers", 2)
    flip_byte(trigger, -1) if damage == "flip" else trigger.unlink()
    result, _ = _decouple(store, "2", tmp_path)
    one_line_error(result, "(task 2 task2)")
    for number in (1, 3):
        assert equal_models(store.load_task(number), store.truth[number])
    result = run(["verify", "--store", store.path], tmp_path)
    assert "task 1 (task1): whole" in result.output and "task 2 (task2): DAMAGED" in result.output
    one_line_error(run(["add", "--store", store.path, tmp_path / "task1.safetensors", "--name", "x", "-q"], tmp_path),
                   "task 2 task2")

    assert run(["remove", "--store", store.path, "--task", "2", "-q"], tmp_path).exit_code == 0
    assert store.verify().ok and [t.number for t in store.tasks] == [1, 3]
    assert np.array_equal(store.attachment(3, "prototypes")["p"], np.ones((2, 3), np.float32))


def test_removing_a_damaged_task_gives_the_same_store_as_removing_it_whole(tmp_path):
    base_path, paths, _, _ = models(tmp_path, 3)
    whole = Store.unify(tmp_path / "whole", base_path, paths, **OPTS)
    damaged = Store.open(shutil.copytree(whole.path, tmp_path / "damaged"))
    flip_byte(_store_file(damaged, "triggers", 2), 100)
    whole.remove(2)
    damaged.remove(2)
    for number in (1, 3):
        assert equal_models(whole.load_task(number), damaged.load_task(number))


def test_a_damaged_private_file_or_attachment_loses_only_its_task(tmp_path):
    base = tiny_base()
    ft = {**tiny_finetune(base, seed=0), "extra": np.arange(4, dtype=np.float32)}
    paths = [write_checkpoint(ft, tmp_path / "a.safetensors"),
             write_checkpoint(tiny_finetune(base, seed=1), tmp_path / "b.safetensors")]
    store = Store.unify(tmp_path / "s", write_checkpoint(base, tmp_path / "base.safetensors"), paths, **OPTS)
    store.attach("b", "prototypes", {"p": np.zeros(3, np.float32)})
    flip_byte(store.path / task_entry(store.path, "a")["private"], -2)
    flip_byte(store.path / task_entry(store.path, "b")["attachments"]["prototypes"], -2)
    with pytest.raises(ValueError, match=r"private/t0001.safetensors \(task 1 a\)"):
        store.load_task("a")
    with pytest.raises(ValueError, match=r"attachments/t0002/prototypes-g000001.safetensors \(task 2 b\)"):
        store.attachment("b", "prototypes")
    assert store.load_task("b")  # its model does not depend on its attachment


# ---- the manifest ---------------------------------------------------------------------------


def _edit_manifest(store, edit, *, forge: bool):
    """Edit condu.json; with forge=True also recompute its checksum, as a deliberate forger would."""
    content = manifest(store.path)
    edit(content)
    if forge:
        body = {k: v for k, v in content.items() if k != "checksum"}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        content["checksum"] = xxhash.xxh3_128_hexdigest(canonical)
    (store.path / "condu.json").write_text(json.dumps(content))


def _swap_triggers(m):
    m["tasks"][0]["triggers"], m["tasks"][1]["triggers"] = m["tasks"][1]["triggers"], m["tasks"][0]["triggers"]


EDITS = {
    "rescaler-digit": (lambda m: m["tasks"][0].update(rescaler=m["tasks"][0]["rescaler"] + 1e-9), "checksum"),
    "swapped-triggers": (_swap_triggers, "not a triggers file of this task"),
    "escaping-path": (lambda m: m["tasks"][0].update(triggers="../../x"), "not a triggers file of this task"),
    "numeric-name": (lambda m: m["tasks"][0].update(name="2"), "not a valid task name"),
    "unknown-field": (lambda m: m.update(extra=1), "unknown field"),
    "wrong-type": (lambda m: m["tasks"][0].update(number="one"), "Expected `int`"),
    "dropped-file-entry": (lambda m: m["files"].pop(m["tasks"][0]["triggers"]), "not in the file table"),
    "factor-space-of-models": (lambda m: m.update(space="factors"), "needs the base adapter's config"),
    "factor-space-holding-models": (lambda m: (m.update(space="factors"), m["base"].update(adapter_config={"r": 8})),
                                    "a factor-space store holds adapters only"),
    "dense-with-adapter-config": (lambda m: m["base"].update(adapter_config={"r": 8}), "a dense store's base is a model"),
    "unknown-kind": (lambda m: m["tasks"][0].update(kind="lora"), "Invalid enum value 'lora'"),
}


# Edited by hand, every case fails the checksum. Forged (the checksum recomputed), the structural
# ones still fail the schema or the rules; a forged rescaler is a valid manifest, which only the
# checksum could have caught, so it is not among them.
CASES = [(case, False) for case in EDITS] + [(case, True) for case in EDITS if case != "rescaler-digit"]


@pytest.mark.parametrize("case, forge", CASES, ids=[f"{'forged' if f else 'edited'}-{c}" for c, f in CASES])
def test_an_edited_manifest_is_one_line_for_every_command(store, tmp_path, case, forge):
    edit, phrase = EDITS[case]
    _edit_manifest(store, edit, forge=forge)
    before = snapshot(store.path)
    for args in (["info"], ["decouple", "--task", "1", "-o", tmp_path / "o.safetensors"], ["remove", "--task", "1"],
                 ["add", tmp_path / "task1.safetensors", "--name", "z"], ["verify"]):
        line = one_line_error(run([*args, "--store", store.path], tmp_path), "condu.json")
        assert ("checksum" if not forge else phrase) in line
    assert snapshot(store.path) == before


def test_a_damaged_manifest_is_restored_from_its_backup(store, tmp_path):
    flip_byte(store.path / "condu.json", 40)
    one_line_error(run(["info", "--store", store.path], tmp_path), "condu-fuse repair")
    result = run(["repair", "--store", store.path], tmp_path)
    assert result.exit_code == 0 and "restored" in result.output
    assert all(equal_models(store.load_task(n), m) for n, m in store.truth.items())


def test_a_lost_manifest_is_never_overwritten_by_a_new_unify(store, tmp_path):
    (store.path / "condu.json").unlink()
    before = snapshot(store.path)
    with pytest.raises(ValueError, match="condu.json is missing"):
        Store.unify(store.path, tmp_path / "base.safetensors", [tmp_path / "task1.safetensors"])
    assert snapshot(store.path) == before
    Store.repair(store.path)
    assert equal_models(store.load_task(1), store.truth[1])


# ---- the base -------------------------------------------------------------------------------


def test_a_base_edited_in_place_is_refused_and_nothing_changes(store, tmp_path):
    base = tmp_path / "base.safetensors"
    flip_byte(base, -3)  # one value, same layout: a header fingerprint cannot see it
    before = snapshot(store.path)
    result, out = _decouple(store, "1", tmp_path)
    one_line_error(result, f"base {base}")
    assert not out.exists()
    one_line_error(run(["add", "--store", store.path, tmp_path / "task1.safetensors", "--name", "x", "-q"], tmp_path),
                   "base")
    assert snapshot(store.path) == before


def test_a_base_swapped_for_a_finetune_of_the_same_layout_is_refused(store, tmp_path):
    shutil.copyfile(tmp_path / "task1.safetensors", tmp_path / "base.safetensors")
    with pytest.raises(ValueError, match="do not match their checksum"):
        store.load_task(2)


def test_set_base_accepts_a_moved_base_only_if_its_content_matches(store, tmp_path):
    moved = tmp_path / "elsewhere" / "b.safetensors"
    moved.parent.mkdir()
    shutil.move(tmp_path / "base.safetensors", moved)
    one_line_error(run(["decouple", "--store", store.path, "--task", "1", "-o", tmp_path / "x.safetensors"], tmp_path),
                   "set-base")
    one_line_error(run(["set-base", tmp_path / "task2.safetensors", "--store", store.path], tmp_path),
                   "differs from the base")
    assert run(["set-base", moved, "--store", store.path], tmp_path).exit_code == 0
    assert equal_models(store.load_task(1), store.truth[1]) and store.verify().ok


# ---- random damage anywhere ------------------------------------------------------------------


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(data=st.data())
def test_no_flipped_bit_in_any_store_file_yields_a_wrong_model(store, tmp_path, data):
    flip_a_bit_and_decouple_every_task(store, tmp_path, data)
