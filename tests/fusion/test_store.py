"""The on-disk store: round trips, equality with the in-memory API, inputs, errors, generations."""

import fcntl
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import hypothesis.strategies as st
from hypothesis import given

import fusion
from fusion import Store, StoreLockedError
from fusion.testing.vectors import requires_vectors, vectors_dir
from fusion.fidelity import chunk_sums, chunk_sums_fast, finish
from fusion.rebuild import rebuild_flat, rebuild_flat_fast, subtract_
from fusion.reference import pack_bits
from fusion.testing.strategies import deltas as delta_rows
from fusion.testing.checkpoints import snapshot, tiny_base, tiny_finetune, write_checkpoint

VECTORS = vectors_dir()
MODES = ["model", "tensor-mean", "tensor"]
OPTS = dict(kernel="reference", chunk=16)  # small chunks: tensors span several chunks


def _setup(tmp_path, num_tasks=3, *, dtype=torch.float32, ft_dtypes=None, layout="file"):
    """A base and fine-tunes on disk; returns (base path, checkpoint paths, base dict, fine-tune dicts)."""
    base = tiny_base(dtype=dtype)
    base_path = write_checkpoint(base, tmp_path / ("base.safetensors" if layout == "file" else "base"), layout=layout)
    fts, paths = [], []
    for i in range(num_tasks):
        ft = tiny_finetune(base, seed=i, dtype=(ft_dtypes or [None] * num_tasks)[i])
        fts.append(ft)
        paths.append(write_checkpoint(ft, tmp_path / f"task{i + 1}.safetensors"))
    return base_path, paths, base, fts


def _stored_masks(store, task_index):
    """uint8 packed masks of a task, read straight from its trigger file."""
    rel = json.loads((store.path / "condu.json").read_text())["tasks"][task_index]["triggers"]
    return load_file(store.path / rel)


def _stored_unified(store):
    manifest = json.loads((store.path / "condu.json").read_text())
    out = {}
    for rel in manifest["unified"]["files"]:
        out.update(load_file(store.path / rel))
    return out


def _assert_matches_state(store, state, names):
    unified = _stored_unified(store)
    for k, name in enumerate(names):
        assert torch.equal(unified[name].float().flatten(), state.unified[name]), name
        for i in range(state.num_tasks):
            assert torch.equal(_stored_masks(store, i)[name], state.masks[name][i]), (i, name)
            assert store.tasks[i].rescaler_of(name) == pytest.approx(float(state.rescalers[i, k]), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Conformance and equality with the in-memory API
# ---------------------------------------------------------------------------------------------


@requires_vectors()
@pytest.mark.parametrize("mode", MODES)
def test_conformance_vectors_through_the_store(tmp_path, mode):
    base = load_file(VECTORS / "base.safetensors")
    store = Store.unify(tmp_path / "s", VECTORS / "base.safetensors", [VECTORS / f"task{i}.safetensors" for i in (1, 2, 3)],
                        rescaler=mode, **OPTS)
    for step, tasks in (("oneshot123", 3), ("add4", 4)):
        if step == "add4":
            store.add(VECTORS / "task4.safetensors")
        for i in range(1, tasks + 1):
            rebuilt = store.load_task(i)
            assert torch.equal(rebuilt["position_ids"], base["position_ids"])
            for name, expected in load_file(VECTORS / "expected" / f"{mode}_{step}_task{i}.safetensors").items():
                torch.testing.assert_close(rebuilt[name] - base[name], expected, rtol=1e-6, atol=1e-6)
    assert store.verify() == []


@pytest.mark.parametrize("mode", MODES)
def test_store_equals_in_memory_unify_add_remove(tmp_path, mode):
    base_path, paths, base, fts = _setup(tmp_path, 4)
    deltas = [fusion.task_delta(base, ft) for ft in fts]
    names = list(deltas[0])
    store = Store.unify(tmp_path / "s", base_path, paths[:3], rescaler=mode, **OPTS)
    state = fusion.unify(deltas[:3], mode=mode, kernel="reference")
    _assert_matches_state(store, state, names)
    store.add(paths[3])
    state = fusion.add(state, deltas[3], kernel="reference")
    _assert_matches_state(store, state, names)
    store.remove(2)
    state = fusion.remove(state, 1, kernel="reference")
    _assert_matches_state(store, state, names)
    assert [t.name for t in store.tasks] == ["task1", "task3", "task4"]
    assert store.verify() == []


def test_decoupled_weights_equal_theta0_plus_lambda_mask_unified(tmp_path):
    """Rebuild a task independently from the stored files with numpy and compare with decouple."""
    base_path, paths, base, _ = _setup(tmp_path, 3)
    store = Store.unify(tmp_path / "s", base_path, paths, **OPTS)
    out = store.decouple(2, tmp_path / "t2.safetensors")
    decoupled = load_file(out)
    manifest = json.loads((store.path / "condu.json").read_text())
    task = manifest["tasks"][1]
    unified = {}
    for rel in manifest["unified"]["files"]:
        unified.update(load_file(store.path / rel))
    masks = load_file(store.path / task["triggers"])
    lam = np.float32(task["rescaler"])
    for name, theta0 in base.items():
        if not theta0.is_floating_point():
            assert torch.equal(decoupled[name], theta0)
            continue
        u = unified[name].numpy().reshape(-1)
        m = np.unpackbits(masks[name].numpy(), bitorder="little")[: u.size].astype(bool)
        expected = theta0.numpy().reshape(-1) + np.where(m, u * lam, np.float32(0))
        assert np.array_equal(decoupled[name].numpy().reshape(-1), expected.astype(np.float32)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_single_task_unify_decouples_to_the_finetune(tmp_path, dtype):
    base_path, paths, _, fts = _setup(tmp_path, 1, dtype=dtype)
    store = Store.unify(tmp_path / "s", base_path, paths, **OPTS)
    rebuilt = store.load_task(1)
    assert store.tasks[0].rescaler == 1.0
    for name, t in fts[0].items():
        assert rebuilt[name].dtype == t.dtype and torch.equal(rebuilt[name], t), name
    assert store.tasks[0].fidelity["cosine"] == pytest.approx(1.0)
    assert store.tasks[0].fidelity["rel_l2"] == pytest.approx(0.0, abs=1e-7)
    assert store.tasks[0].mask_density == pytest.approx(
        sum(int((t.float() != tiny_base(dtype=dtype)[n].float()).sum()) for n, t in fts[0].items() if t.is_floating_point())
        / sum(t.numel() for t in fts[0].values() if t.is_floating_point()))


def test_mixed_dtypes_compute_in_float32_and_store_in_the_base_dtype(tmp_path):
    base_path, paths, base, fts = _setup(tmp_path, 3, dtype=torch.float16,
                                          ft_dtypes=[torch.float32, torch.bfloat16, torch.float16])
    store = Store.unify(tmp_path / "s", base_path, paths, **OPTS)
    deltas = [fusion.task_delta(base, ft) for ft in fts]
    state = fusion.unify(deltas, kernel="reference", dtypes={n: torch.float16 for n in deltas[0]})
    _assert_matches_state(store, state, list(deltas[0]))
    assert all(t.dtype == torch.float16 for t in _stored_unified(store).values())
    assert store.load_task(2)["embed.weight"].dtype == torch.float16
    assert store.load_task(2, dtype="float32")["embed.weight"].dtype == torch.float32


def test_dtype_option_stores_a_bf16_unified_delta(tmp_path):
    base_path, paths, base, fts = _setup(tmp_path, 2)
    store = Store.unify(tmp_path / "s", base_path, paths, dtype="bf16", **OPTS)
    deltas = [fusion.task_delta(base, ft) for ft in fts]
    state = fusion.unify(deltas, kernel="reference", dtypes={n: torch.bfloat16 for n in deltas[0]})
    _assert_matches_state(store, state, list(deltas[0]))
    assert _stored_unified(store)["embed.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("layout", ["folder", "sharded"])
def test_model_folders_give_the_same_store_as_files(tmp_path, layout):
    base = tiny_base()
    fts = [tiny_finetune(base, seed=i) for i in range(2)]
    files = [write_checkpoint(t, tmp_path / f"f{i}.safetensors") for i, t in enumerate([base, *fts])]
    folders = [write_checkpoint(t, tmp_path / f"d{i}", layout=layout) for i, t in enumerate([base, *fts])]
    a = Store.unify(tmp_path / "a", files[0], files[1:], **OPTS)
    b = Store.unify(tmp_path / "b", folders[0], folders[1:], **OPTS)
    assert [t.name for t in b.tasks] == ["d1", "d2"]
    for i in (1, 2):
        assert all(torch.equal(a.load_task(i)[n], t) for n, t in b.load_task(i).items())


# ---------------------------------------------------------------------------------------------
# Private, integer and missing tensors
# ---------------------------------------------------------------------------------------------


def test_private_tensors_and_int_buffers(tmp_path):
    base_path, paths, base, fts = _setup(tmp_path, 2)
    ft = dict(fts[1])
    ft["head.weight"] = torch.full((5, 8), 0.5)  # another shape: a new classification head
    ft["classifier.bias"] = torch.ones(5)  # absent from the base
    ft["position_ids"] = torch.arange(6) + 100  # int buffers come from the base
    write_checkpoint(ft, paths[1])
    store = Store.unify(tmp_path / "s", base_path, paths, **OPTS)
    record = store.task("task2")
    assert set(record.private) == {"head.weight", "classifier.bias"}
    assert set(store.info()["tasks"][1]["private"]) == {"head.weight", "classifier.bias"}
    rebuilt = store.load_task(2)
    assert torch.equal(rebuilt["head.weight"], ft["head.weight"])
    assert torch.equal(rebuilt["classifier.bias"], ft["classifier.bias"])
    assert torch.equal(rebuilt["position_ids"], base["position_ids"])
    assert store.load_task(1)["head.weight"].shape == (3, 8)
    # the reshaped tensor enters the fusion as an unchanged tensor for task 2
    assert not _stored_masks(store, 1)["head.weight"].any()


def test_missing_tensor_is_an_error_naming_it_unless_zero(tmp_path):
    base_path, paths, base, fts = _setup(tmp_path, 2)
    ft = {n: t for n, t in fts[1].items() if n != "norm.weight"}
    write_checkpoint(ft, paths[1])
    with pytest.raises(ValueError, match=r"task2.safetensors: tensor 'norm.weight' of the base is missing.*--missing zero"):
        Store.unify(tmp_path / "s", base_path, paths, **OPTS)
    assert not (tmp_path / "s").exists()
    store = Store.unify(tmp_path / "s", base_path, paths, missing="zero", **OPTS)
    assert store.task(2).zero_filled == ("norm.weight",)
    assert torch.equal(store.load_task(2)["norm.weight"], base["norm.weight"])


# ---------------------------------------------------------------------------------------------
# Errors change nothing on disk
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def two_task_store(tmp_path):
    base_path, paths, base, fts = _setup(tmp_path, 2)
    return Store.unify(tmp_path / "s", base_path, paths, **OPTS), base


def _bad_checkpoints(tmp_path, base):
    nan = tiny_finetune(base, seed=7)
    nan["layer.0.weight"][2, 3] = float("nan")
    inf = tiny_finetune(base, seed=8)
    inf["norm.weight"][-1] = float("inf")
    missing = {n: t for n, t in tiny_finetune(base, seed=9).items() if n != "embed.weight"}
    pickle = tmp_path / "bad.bin"
    pickle.write_bytes(b"\x80\x04K\x01.")
    return {
        "nan": (write_checkpoint(nan, tmp_path / "nan.safetensors"), r"nan.safetensors: tensor 'layer.0.weight' has NaN"),
        "inf": (write_checkpoint(inf, tmp_path / "inf.safetensors"), r"inf.safetensors: tensor 'norm.weight' has NaN or Inf"),
        "missing": (write_checkpoint(missing, tmp_path / "miss.safetensors"), r"'embed.weight' of the base is missing"),
        "pickle": (pickle, r"bad.bin: pickle checkpoints are not read.*convert"),
        "absent": (tmp_path / "nope", r"no such checkpoint"),
    }


@pytest.mark.parametrize("case", ["nan", "inf", "missing", "pickle", "absent"])
def test_bad_add_changes_nothing(tmp_path, two_task_store, case):
    store, base = two_task_store
    path, message = _bad_checkpoints(tmp_path, base)[case]
    before = snapshot(store.path)
    with pytest.raises(ValueError, match=message):
        store.add(path)
    assert snapshot(store.path) == before
    assert store.verify() == [] and len(store.tasks) == 2


@pytest.mark.parametrize("kernel", ["reference", "cpu"])
@pytest.mark.parametrize("case", ["nan", "inf"])
def test_non_finite_deltas_are_caught_with_every_kernel(tmp_path, two_task_store, case, kernel):
    store, base = two_task_store
    path, message = _bad_checkpoints(tmp_path, base)[case]
    before = snapshot(store.path)
    with pytest.raises(ValueError, match=message):
        Store.open(store.path, kernel=kernel, chunk=64).add(path)
    assert snapshot(store.path) == before


@pytest.mark.parametrize("case", ["nan", "pickle"])
def test_bad_unify_creates_no_store(tmp_path, case):
    base_path, paths, base, _ = _setup(tmp_path, 1)
    path, message = _bad_checkpoints(tmp_path, base)[case]
    with pytest.raises(ValueError, match=message):
        Store.unify(tmp_path / "s", base_path, [paths[0], path], **OPTS)
    assert not (tmp_path / "s").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=message):
        Store.unify(tmp_path / "empty", base_path, [paths[0], path], **OPTS)
    assert snapshot(tmp_path / "empty") == {}
    # a folder with a user's files in it, even under names the store uses for its subfolders
    (tmp_path / "busy" / "private").mkdir(parents=True)
    (tmp_path / "busy" / "private" / "mine.safetensors").write_bytes(b"user data")
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    before = snapshot(tmp_path / "busy")
    with pytest.raises(ValueError, match=message):
        Store.unify(tmp_path / "busy", base_path, [paths[0], path], **OPTS)
    assert snapshot(tmp_path / "busy") == before


def test_other_errors_change_nothing(tmp_path, two_task_store):
    store, base = two_task_store
    before = snapshot(store.path)
    with pytest.raises(ValueError, match="already holds a ConDU store; use add"):
        Store.unify(store.path, tmp_path / "base.safetensors", [tmp_path / "task1.safetensors"])
    with pytest.raises(ValueError, match="a task named 'task1' exists already"):
        store.add(tmp_path / "task1.safetensors", name="task1")
    with pytest.raises(ValueError, match=r"no task 7; choose one of 1 \(task1\), 2 \(task2\)"):
        store.remove(7)
    with pytest.raises(ValueError, match="exists and is not an empty folder"):
        store.decouple(1, store.path)
    assert snapshot(store.path) == before


def test_a_second_writer_is_stopped_by_the_lock(two_task_store, tmp_path):
    store, _ = two_task_store
    before = snapshot(store.path)
    with open(store.path / "condu.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(StoreLockedError, match="another process is writing this store"):
            store.add(tmp_path / "task1.safetensors", name="again")
    assert snapshot(store.path) == before
    store.add(tmp_path / "task1.safetensors", name="again")  # free again
    assert len(store.tasks) == 3


def test_changed_base_is_refused(two_task_store, tmp_path):
    store, base = two_task_store
    changed = dict(base)
    changed["extra"] = torch.zeros(3)
    write_checkpoint(changed, tmp_path / "base.safetensors")
    with pytest.raises(ValueError, match="base checkpoint changed"):
        store.load_task(1)
    assert any("base checkpoint changed" in p for p in store.verify())


# ---------------------------------------------------------------------------------------------
# Generations, files, verify
# ---------------------------------------------------------------------------------------------


def test_generations_replace_files_and_leftovers_are_cleaned(two_task_store, tmp_path):
    store, _ = two_task_store
    first = set(snapshot(store.path))
    (store.path / "triggers" / "t0009-g000099.safetensors.tmp-123").write_bytes(b"half")
    (store.path / "unified-g000099.safetensors.tmp-123").write_bytes(b"half")
    (store.path / "notes.txt").write_text("a user's file")
    assert store.verify() == []  # leftovers are not read
    store.add(tmp_path / "task1.safetensors", name="again")
    files = set(snapshot(store.path))
    assert "notes.txt" in files and not any(".tmp-" in f for f in files)
    assert not (first - {"condu.json", "condu.lock", "notes.txt"}) & files  # generation 1 files are gone
    assert store.generation == 2


def test_verify_reports_corrupt_and_missing_files(two_task_store):
    store, _ = two_task_store
    manifest = json.loads((store.path / "condu.json").read_text())
    trig = store.path / manifest["tasks"][0]["triggers"]
    data = bytearray(trig.read_bytes())
    data[-1] ^= 0xFF
    trig.write_bytes(bytes(data))
    (store.path / manifest["unified"]["files"][0]).unlink()
    problems = store.verify()
    assert any("sha256 differs" in p and "triggers/" in p for p in problems)
    assert any("unified-" in p and "missing" in p for p in problems)


def test_unified_delta_is_sharded_with_an_index(tmp_path):
    base_path, paths, base, _ = _setup(tmp_path, 2)
    store = Store.unify(tmp_path / "s", base_path, paths, max_shard_size=300, **OPTS)
    manifest = json.loads((store.path / "condu.json").read_text())
    assert len(manifest["unified"]["files"]) > 1
    assert set(manifest["unified"]["weight_map"]) == {n for n, t in base.items() if t.is_floating_point()}
    assert store.verify() == []
    ref = Store.unify(tmp_path / "r", base_path, paths, **OPTS)
    assert all(torch.equal(ref.load_task(2)[n], t) for n, t in store.load_task(2).items())


def test_fidelity_is_remeasured_while_the_source_is_unchanged(tmp_path):
    base_path, paths, _, _ = _setup(tmp_path, 3)
    store = Store.unify(tmp_path / "s", base_path, paths[:1], **OPTS)
    assert store.task(1).fidelity["generation"] == 1
    paths[0].rename(tmp_path / "moved.safetensors")  # task 1's source is gone: keep its last value
    store.add(paths[1])
    assert store.task(1).fidelity == {"cosine": pytest.approx(1.0), "rel_l2": pytest.approx(0.0, abs=1e-7), "generation": 1}
    assert store.task(2).fidelity["generation"] == 2
    store.add(paths[2])
    assert store.task(2).fidelity["generation"] == 3 and store.task(2).fidelity["cosine"] < 1.0
    # the stored cosine matches one computed from the rebuilt and the original delta
    base = tiny_base()
    ft = load_file(paths[1])
    rebuilt = store.load_task(2)
    hat = torch.cat([(rebuilt[n].double() - base[n].double()).flatten() for n in base if base[n].is_floating_point()])
    orig = torch.cat([(ft[n].double() - base[n].double()).flatten() for n in base if base[n].is_floating_point()])
    cosine = float(hat @ orig / (hat.norm() * orig.norm()))
    rel_l2 = float((hat - orig).norm() / orig.norm())
    assert store.task(2).fidelity["cosine"] == pytest.approx(cosine, rel=1e-5)
    assert store.task(2).fidelity["rel_l2"] == pytest.approx(rel_l2, rel=1e-5)


def test_l1_is_preserved_with_the_model_rescaler(tmp_path):
    base_path, paths, base, fts = _setup(tmp_path, 3)
    store = Store.unify(tmp_path / "s", base_path, paths, **OPTS)
    for i, ft in enumerate(fts):
        rebuilt = store.load_task(i + 1)
        l1 = sum(float((rebuilt[n].double() - base[n].double()).abs().sum()) for n in base if base[n].is_floating_point())
        assert l1 == pytest.approx(store.task(i + 1).l1, rel=1e-5)


def test_prototypes_are_saved_and_survive_changes(two_task_store, tmp_path):
    store, _ = two_task_store
    assert store.load_prototypes(1) is None
    protos = {"prototypes": torch.randn(4, 3), "labels": torch.arange(4)}
    store.save_prototypes("task1", protos)
    store.add(tmp_path / "task1.safetensors", name="again")
    loaded = store.load_prototypes(1)
    assert all(torch.equal(loaded[n], t) for n, t in protos.items())
    assert store.info()["tasks"][0]["prototypes"] is True
    store.remove(1)
    assert not list((store.path / "prototypes").iterdir())
    assert store.verify() == []


def test_decouple_to_a_model_folder(tmp_path):
    base = tiny_base()
    base_path = write_checkpoint(base, tmp_path / "base", layout="folder")
    ft_path = write_checkpoint(tiny_finetune(base, seed=1), tmp_path / "ft.safetensors")
    store = Store.unify(tmp_path / "s", base_path, [ft_path], **OPTS)
    single = store.decouple(1, tmp_path / "out")
    assert sorted(p.name for p in single.iterdir()) == ["config.json", "model.safetensors", "tokenizer_config.json"]
    expected = store.load_task(1)
    sharded = store.decouple(1, tmp_path / "sharded", max_shard_size=200)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    for folder in (single, sharded):
        loaded = fusion.io.load(folder)
        assert set(loaded) == set(expected) and all(torch.equal(loaded[n], t) for n, t in expected.items())
    with pytest.raises(ValueError, match="not an empty folder"):
        store.decouple(1, tmp_path / "out")


def test_tasks_by_index_and_name(two_task_store):
    store, _ = two_task_store
    assert store.task(2).name == "task2" and store.task("task1").index == 1 and store.task("2").name == "task2"
    with pytest.raises(ValueError, match="choose one of"):
        store.task("task9")
    with pytest.raises(ValueError, match="no ConDU store here"):
        Store.open(store.path / "triggers")


def test_info_reports_sizes_and_savings(two_task_store):
    store, _ = two_task_store
    info = store.info()
    json.dumps(info)
    assert info["sizes"]["total"] == sum(p.stat().st_size for p in store.path.rglob("*.safetensors"))
    assert info["separate_checkpoints_bytes"] == 2 * (store.path.parent / "base.safetensors").stat().st_size
    assert [t["index"] for t in info["tasks"]] == [1, 2]


@given(rows=delta_rows(num_tasks=3, length=st.integers(1, 70)))
def test_fast_fidelity_sums_equal_the_reference(rows):
    unified, original, mask_source = rows[0], rows[1], rows[2]
    packed = pack_bits((mask_source != 0)[None])[0]
    torch.testing.assert_close(chunk_sums_fast(unified, packed, original), chunk_sums(unified, packed, original),
                               rtol=1e-10, atol=1e-15)


@given(rows=delta_rows(num_tasks=3, length=st.integers(1, 70)), lam=st.floats(0.25, 4.0))
def test_fidelity_sums_give_the_direct_cosine_and_error(rows, lam):
    unified, original, mask_source = rows[0].double(), rows[1].double(), rows[2]
    mask = mask_source != 0
    lam32 = float(torch.tensor(lam, dtype=torch.float32))
    rebuilt = torch.where(mask, unified * lam32, 0.0)
    cosine, rel_l2 = finish(chunk_sums(unified, pack_bits(mask[None])[0], original)[None], torch.tensor([lam]))
    if original.norm() > 0:
        assert rel_l2 == pytest.approx(float((rebuilt - original).norm() / original.norm()), rel=1e-9, abs=1e-12)
    if original.norm() > 0 and rebuilt.norm() > 0:
        assert cosine == pytest.approx(float(rebuilt @ original / (rebuilt.norm() * original.norm())), rel=1e-9, abs=1e-12)


@given(rows=delta_rows(num_tasks=3, length=st.integers(1, 70)), lam=st.floats(0.0, 4.0),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_fast_rebuild_equals_the_reference_bit_for_bit(rows, lam, dtype):
    base, unified = rows[0].to(dtype), rows[1].to(dtype)
    base[::3] = -0.0  # theta0 + 0 turns -0.0 into +0.0 in the reference: the fast path must too
    packed = pack_bits((rows[2] != 0)[None])[0]
    fast, reference = rebuild_flat_fast(base, unified, packed, lam), rebuild_flat(base, unified, packed, lam)
    assert fast.dtype == reference.dtype == torch.float32
    assert torch.equal(fast.view(torch.int32), reference.view(torch.int32))
    in_place = unified.float().clone()  # the store reads u into the output buffer first
    rebuild_flat_fast(base, in_place, packed, lam, out=in_place)
    assert torch.equal(in_place.view(torch.int32), reference.view(torch.int32))


@given(rows=delta_rows(num_tasks=2, length=st.integers(0, 70)))
def test_fast_subtract_equals_torch(rows):
    theta, base = rows[0] * 3 + 1, rows[1]
    expected = theta - base
    assert torch.equal(subtract_(theta.clone(), base).view(torch.int32), expected.view(torch.int32))


def test_default_chunk_shares_one_budget_between_the_tasks():
    from fusion.store import PASS_ELEMENTS, _chunk_for

    for t in (1, 2, 3, 8, 16, 33):
        chunk = _chunk_for(t)
        assert chunk % 8 == 0 and chunk * t <= PASS_ELEMENTS
    assert _chunk_for(10_000) == 1 << 16  # never tiny
