"""State dicts in the store: tasks given in memory, and a FusedDeltas saved as a store and opened again."""

import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fusion
from fusion import Store
from fusion.store import faults
from fusion.testing.checkpoints import snapshot, tiny_base, tiny_finetune, write_checkpoint
from fusion.testing.strategies import checkpoint_sets, rescaler_modes

from .helpers import OPTS, manifest, models, stored_unified, task_entry


def equal_dicts(a: dict, b: dict) -> bool:
    """Same names, and per name the same dtype, shape and bytes."""
    return set(a) == set(b) and all(
        np.asarray(a[n]).dtype == np.asarray(b[n]).dtype and np.asarray(a[n]).shape == np.asarray(b[n]).shape
        and np.asarray(a[n]).tobytes() == np.asarray(b[n]).tobytes() for n in a)


def assert_same_state(got, expected) -> None:
    """Bit for bit: tensors fused and their shapes, unified delta, masks, rescalers, private tensors."""
    assert got.shapes == expected.shapes and got.rescaler == expected.rescaler
    for name in expected.names:
        assert np.asarray(got.unified[name]).tobytes() == np.asarray(expected.unified[name]).tobytes(), name
        assert np.array_equal(got.masks[name], expected.masks[name]), name
        assert got.dtypes.get(name, fusion.dtypes.F32) is expected.dtypes.get(name, fusion.dtypes.F32), name
    assert np.array_equal(got.rescalers, expected.rescalers)
    assert got.private.keys() == expected.private.keys()
    assert all(equal_dicts(got.private[t], expected.private[t]) for t in expected.private)


def assert_tasks_rebuild(store, base: dict, state) -> None:
    """store.load_task(t) is apply_delta(base, state.decouple(t)) for every task, private tensors included."""
    for t, record in enumerate(store.tasks, start=1):
        assert equal_dicts(store.load_task(record.number), fusion.apply_delta(base, state.decouple(t))), f"task {t}"


# ---- the in-memory API decides as the store does ---------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(checkpoint_sets(), rescaler_modes())
def test_in_memory_unify_with_private_tensors_equals_the_stores(checkpoints, mode):
    """unify(base=) keeps private what the store keeps private (heads the base lacks, a tensor in another
    shape), and fuses the rest to the same bits; every task rebuilds to the same model."""
    base, finetunes = checkpoints
    state = fusion.unify([fusion.task_delta(base, ft) for ft in finetunes], base=base, rescaler=mode,
                         kernel="reference")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = [write_checkpoint(ft, tmp / f"ft{i}.safetensors") for i, ft in enumerate(finetunes)]
        store = Store.unify(tmp / "s", write_checkpoint(base, tmp / "base.safetensors"), paths,
                            names=[f"ft{i}" for i in range(len(paths))], rescaler=mode, **OPTS)
        assert [sorted(r.private) for r in store.tasks] == [sorted(state.private[t]) for t in state.private]
        assert_same_state(store.fused(), state)
        assert_tasks_rebuild(store, base, state)


# ---- a FusedDeltas saved as a store, and opened again ----------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(checkpoint_sets(num_tasks=st.integers(1, 3)), rescaler_modes(), st.sampled_from(["float32", "bfloat16"]))
def test_a_state_saved_as_a_store_opens_bit_for_bit_and_rebuilds_every_task(checkpoints, mode, unified_dtype):
    base, finetunes = checkpoints
    deltas = [fusion.task_delta(base, ft) for ft in finetunes]
    state = fusion.unify(deltas[:-1] or deltas, base=base, rescaler=mode, kernel="reference",
                         dtypes=dict.fromkeys([n for n in base if n != "position_ids"], unified_dtype))
    if len(deltas) > 1:
        state = fusion.add(state, deltas[-1], kernel="reference")  # the continual step's private head
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = Store.from_fused(tmp / "s", write_checkpoint(base, tmp / "base.safetensors"), state)
        assert [t.name for t in store.tasks] == [f"task{t}" for t in range(1, state.num_tasks + 1)]
        assert all(t.source == "<memory>" for t in store.tasks)
        opened = store.fused()
        assert_same_state(opened, state)
        assert opened.delta_l1 is None and opened.masked_l1 is None
        assert_tasks_rebuild(store, base, state)
        assert store.verify().ok
        # a state opened from a store saves again, the same
        names = ["a", "b", "c"][: state.num_tasks]
        again = Store.from_fused(tmp / "again", tmp / "base.safetensors", opened, names=names)
        assert_same_state(again.fused(), state)


def test_a_saved_state_takes_part_in_the_continual_step_like_a_unified_store(tmp_path):
    """from_fused + add equals Store.unify + add: the saved state is a store like any other."""
    base_path, paths, base, fts = models(tmp_path, 3)
    state = fusion.unify([fusion.task_delta(base, ft) for ft in fts[:2]], base=base, kernel="reference")
    saved = Store.from_fused(tmp_path / "saved", base_path, state, names=["task1", "task2"], **OPTS)
    unified = Store.unify(tmp_path / "unified", base_path, paths[:2], **OPTS)
    saved.add(paths[2])
    unified.add(paths[2])
    assert_same_state(saved.fused(), unified.fused())
    assert [t.fidelity["cosine"] is None for t in saved.tasks] == [True, True, False]  # no source to measure


def test_opened_state_numbers_tasks_in_order_after_a_remove(tmp_path):
    base_path, paths, base, _ = models(tmp_path, 3)
    store = Store.unify(tmp_path / "s", base_path, paths, **OPTS)
    store.remove(2)
    state = store.fused()
    assert state.num_tasks == 2 and [t.number for t in store.tasks] == [1, 3]
    assert equal_dicts(store.load_task(3), fusion.apply_delta(base, state.decouple(2)))


def test_from_fused_refuses_a_state_that_does_not_fit_the_base_and_writes_nothing(tmp_path):
    base_path, _, base, fts = models(tmp_path, 2)
    deltas = [fusion.task_delta(base, ft) for ft in fts]
    for ft in deltas:
        ft["new.head"] = np.ones(3, np.float32)  # both in one shape: fused without base=, private with it
    cases = [
        (fusion.unify(deltas, kernel="reference"), {},
         r"^fused tensor 'new.head' of the state is not a float tensor of the base; unify the deltas with base="),
        (fusion.unify([{k: v for k, v in d.items() if k != "norm.weight"} for d in deltas], kernel="reference"), {},
         r"^the base's float tensor 'norm.weight' \(8,\) is not fused in the state; unify the deltas with base="),
        (fusion.unify(deltas, base=base, kernel="reference"), {"names": ["a"]},
         r"^got 1 names for the state's 2 tasks; give one name each$"),
        (fusion.unify(deltas, base=base, kernel="reference"), {"names": ["a", "a"]}, r"repeat a name"),
        (fusion.unify(deltas, base=base, kernel="reference"), {"names": ["a", "7"]}, r"is a number"),
        (deltas, {}, r"^state is a list; pass the fusion.FusedDeltas that fusion.unify or fusion.add returned$"),
        (fusion.unify(deltas, base=base, kernel="reference", dtypes={"norm.weight": "float64"}), {},
         r"^fused tensor 'norm.weight': the state keeps its unified delta in float64; a store keeps"),
    ]
    before = snapshot(tmp_path)
    for state, options, message in cases:
        with pytest.raises(ValueError, match=message):
            Store.from_fused(tmp_path / "s", base_path, state, **options)
        assert snapshot(tmp_path) == before and not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match=r"^base: a state dict cannot be a store's base"):
        Store.from_fused(tmp_path / "s", base, fusion.unify(deltas, base=base, kernel="reference"))
    assert not (tmp_path / "s").exists()


def test_from_fused_never_writes_over_a_store_and_a_failed_commit_leaves_nothing(tmp_path):
    base_path, paths, base, fts = models(tmp_path, 2)
    state = fusion.unify([fusion.task_delta(base, ft) for ft in fts], base=base, kernel="reference")
    Store.unify(tmp_path / "s", base_path, paths, **OPTS)
    before = snapshot(tmp_path / "s")
    with pytest.raises(ValueError, match="already holds a ConDU store"):
        Store.from_fused(tmp_path / "s", base_path, state)
    assert snapshot(tmp_path / "s") == before

    def fail():
        raise RuntimeError("injected")

    with faults.inject("backup-written", fail), pytest.raises(RuntimeError, match="injected"):
        Store.from_fused(tmp_path / "new", base_path, state)
    assert not (tmp_path / "new").exists()


# ---- state dicts as checkpoints ---------------------------------------------------------------------------


def test_state_dicts_and_paths_give_the_same_store(tmp_path):
    base_path, paths, _, fts = models(tmp_path, 4)
    from_paths = Store.unify(tmp_path / "paths", base_path, paths[:3], **OPTS)
    mixed = Store.unify(tmp_path / "mixed", base_path, [fts[0], paths[1], fts[2]], **OPTS)
    sources = [("task1", "<memory>"), ("task2", str(Path(paths[1]).resolve())), ("task3", "<memory>")]
    assert [(t.name, t.source) for t in mixed.tasks] == sources
    assert_same_state(mixed.fused(), from_paths.fused())
    assert [t.fidelity for t in mixed.tasks] == [t.fidelity for t in from_paths.tasks]  # measured as it was read
    for a, b in zip(mixed.tasks, from_paths.tasks):  # the same content digest as the file's
        content = task_entry(from_paths.path, b.name)["source"]["content"]
        assert task_entry(mixed.path, a.name)["source"]["content"] == content

    record = mixed.add(fts[3], name="rte")
    from_paths.add(paths[3])
    assert (record.number, record.name, record.source) == (4, "rte", "<memory>")
    assert_same_state(mixed.fused(), from_paths.fused())
    # a path's task is measured again at the step; a state dict cannot be read again
    assert [t.fidelity["generation"] for t in mixed.tasks] == [0, 1, 0, 1]
    assert mixed.verify().ok


def test_state_dicts_are_named_by_number_unless_named(tmp_path):
    base_path, _, _, fts = models(tmp_path, 3)
    store = Store.unify(tmp_path / "s", base_path, fts[:2], names=["sst2", "mnli"], **OPTS)
    assert [t.name for t in store.tasks] == ["sst2", "mnli"]
    assert store.add(fts[2]).name == "task3"


def test_torch_state_dicts_equal_numpy_ones(tmp_path):
    base_path, _, _, fts = models(tmp_path, 2, dtype="bfloat16")
    bf16 = [{n: t.astype(ml_dtypes.bfloat16) if t.dtype.kind == "f" else t for n, t in ft.items()} for ft in fts]
    tensors = [{n: torch.from_numpy(t.view(np.int16).copy()).view(torch.bfloat16) if t.dtype == ml_dtypes.bfloat16
                else torch.from_numpy(t) for n, t in ft.items()} for ft in bf16]
    a = Store.unify(tmp_path / "a", base_path, bf16, **OPTS)
    b = Store.unify(tmp_path / "b", base_path, tensors, **OPTS)
    ua, ub = stored_unified(a.path), stored_unified(b.path)
    assert all(ua[n].tobytes() == ub[n].tobytes() for n in ua)
    assert [t.rescaler for t in a.tasks] == [t.rescaler for t in b.tasks]


def test_a_state_dict_with_the_content_of_a_stored_task_is_refused_unless_named(tmp_path):
    base_path, paths, _, fts = models(tmp_path, 2)
    store = Store.unify(tmp_path / "s", base_path, paths, **OPTS)
    before = snapshot(store.path)
    with pytest.raises(ValueError, match=r"^the state dict: the same content as task 1 \(task1\)"):
        store.add(fts[0])
    assert snapshot(store.path) == before
    assert store.add(fts[0], name="again").number == 3


def test_errors_name_the_state_dict_and_change_nothing(tmp_path):
    base_path, _, base, fts = models(tmp_path, 2)
    partial = {n: t for n, t in fts[1].items() if n != "norm.weight"}
    cases = [
        ([fts[0], partial], r"^state dict 2: tensor 'norm.weight' of the base is missing"),
        ([fts[0], {**fts[1], "x": [1.0, 2.0]}], r"^state dict 2: tensor 'x' is a list; pass numpy arrays or torch"),
        ([{**fts[0], 3: np.ones(2)}], r"^state dict 1: key 3 is not a string; tensor names are strings$"),
        ([{**fts[0], "c": np.ones(2, np.complex64)}], r"^state dict 1: tensor 'c': "),
    ]
    for checkpoints, message in cases:
        with pytest.raises(ValueError, match=message) as caught:
            Store.unify(tmp_path / "s", base_path, checkpoints, **OPTS)
        assert "condu-memory-" not in str(caught.value)
        assert not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match=r"^base: a state dict cannot be a store's base .*pass the path$"):
        Store.unify(tmp_path / "s", base, fts, **OPTS)
    with pytest.raises(ValueError, match=r"^a state dict records no base model; pass base="):
        Store.unify(tmp_path / "s", None, fts, **OPTS)
    assert not (tmp_path / "s").exists()
    store = Store.unify(tmp_path / "s", base_path, fts[:1], **OPTS)
    before = snapshot(store.path)
    with pytest.raises(ValueError, match=r"^the state dict: tensor 'norm.weight' of the base is missing"):
        store.add(partial)
    assert snapshot(store.path) == before
    assert manifest(store.path)["generation"] == 0


def test_a_state_dict_with_a_new_head_keeps_it_private(tmp_path):
    base = tiny_base()
    ft = tiny_finetune(base, seed=0)
    ft["head.weight"] = np.ones((5, 8), np.float32)  # another shape
    ft["extra.bias"] = np.arange(4, dtype=np.float32)
    base_path = write_checkpoint(base, tmp_path / "base.safetensors")
    store = Store.unify(tmp_path / "s", base_path, [ft, tiny_finetune(base, seed=1)], **OPTS)
    assert store.task(1).private == ("head.weight", "extra.bias")
    assert equal_dicts({n: store.load_task(1)[n] for n in ("head.weight", "extra.bias")},
                       {n: ft[n] for n in ("head.weight", "extra.bias")})
