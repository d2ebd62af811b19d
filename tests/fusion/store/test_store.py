"""The store's behaviour: equal to the in-memory API and the vectors, numbers for life, every layout."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

import fusion
from fusion import Store
from fusion.dtypes import BF16, to_float32
from fusion.store.generation import chunk_for
from fusion.testing.checkpoints import tiny_base, tiny_finetune, write_checkpoint
from fusion.testing.vectors import requires_vectors, vectors_dir

from .helpers import OPTS, assert_matches_state, manifest, models, stored_unified, task_entry

MODES = ["model", "tensor-mean", "tensor"]


@requires_vectors()
@pytest.mark.parametrize("mode", MODES)
def test_conformance_vectors_through_the_store(tmp_path, mode):
    vectors = vectors_dir()
    base = load_file(vectors / "base.safetensors")
    store = Store.unify(tmp_path / "s", vectors / "base.safetensors",
                        [vectors / f"task{i}.safetensors" for i in (1, 2, 3)], rescaler=mode, **OPTS)
    for step, tasks in (("oneshot123", 3), ("add4", 4)):
        if step == "add4":
            store.add(vectors / "task4.safetensors")
        for i in range(1, tasks + 1):
            rebuilt = store.load_task(i)
            assert np.array_equal(rebuilt["position_ids"], base["position_ids"])
            for name, expected in load_file(vectors / "expected" / f"{mode}_{step}_task{i}.safetensors").items():
                np.testing.assert_allclose(rebuilt[name] - base[name], expected, rtol=1e-6, atol=1e-6)
    assert store.verify().ok


@pytest.mark.parametrize("mode", MODES)
def test_store_equals_in_memory_unify_add_remove(tmp_path, mode):
    base_path, paths, base, fts = models(tmp_path, 4)
    deltas = [fusion.task_delta(base, ft) for ft in fts]
    store = Store.unify(tmp_path / "s", base_path, paths[:3], rescaler=mode, **OPTS)
    state = fusion.unify(deltas[:3], rescaler=mode, kernel="reference")
    assert_matches_state(store, state)
    store.add(paths[3])
    state = fusion.add(state, deltas[3], kernel="reference")
    assert_matches_state(store, state)
    store.remove(2)
    state = fusion.remove(state, 2, kernel="reference")
    assert_matches_state(store, state)
    assert [(t.number, t.name) for t in store.tasks] == [(1, "task1"), (3, "task3"), (4, "task4")]
    assert store.verify().ok


def test_decoupled_weights_are_theta0_plus_lambda_mask_unified(tmp_path):
    """Rebuild a task independently from the stored files with numpy and compare with decouple."""
    base_path, paths, base, _ = models(tmp_path, 3)
    store = Store.unify(tmp_path / "s", base_path, paths, **OPTS)
    decoupled = load_file(store.decouple(2, tmp_path / "t2.safetensors"))
    entry = task_entry(store.path, "task2")
    unified, masks = stored_unified(store.path), load_file(store.path / entry["triggers"])
    lam = np.float32(entry["rescaler"])
    for name, theta0 in base.items():
        if theta0.dtype.kind != "f":
            assert np.array_equal(decoupled[name], theta0)
            continue
        mask = np.unpackbits(masks[name], count=theta0.size, bitorder="little").astype(bool).reshape(theta0.shape)
        expected = theta0 + np.where(mask, unified[name] * lam, np.float32(0))
        assert np.array_equal(decoupled[name], expected), name


@pytest.mark.parametrize("kernel", ["reference", "cpu"])
def test_a_single_task_decouples_to_its_finetune(tmp_path, kernel):
    base_path, paths, _, fts = models(tmp_path, 1)
    store = Store.unify(tmp_path / "s", base_path, paths, kernel=kernel)
    assert store.task(1).rescaler == 1.0
    rebuilt = store.load_task(1)
    assert all(np.array_equal(rebuilt[n], t) for n, t in fts[0].items())


@pytest.mark.parametrize("layout", ["folder", "sharded"])
def test_model_folders_give_the_same_store_as_files(tmp_path, layout):
    base = tiny_base()
    fts = [tiny_finetune(base, seed=i) for i in range(2)]
    a = Store.unify(tmp_path / "a", write_checkpoint(base, tmp_path / "base.safetensors"),
                    [write_checkpoint(f, tmp_path / f"f{i}.safetensors") for i, f in enumerate(fts)], **OPTS)
    b = Store.unify(tmp_path / "b", write_checkpoint(base, tmp_path / "base_dir", layout=layout),
                    [write_checkpoint(f, tmp_path / f"d{i}", layout=layout) for i, f in enumerate(fts)], **OPTS)
    ua, ub = stored_unified(a.path), stored_unified(b.path)
    assert set(ua) == set(ub) and all(np.array_equal(ua[n], ub[n]) for n in ua)
    assert [t.rescaler for t in a.tasks] == [t.rescaler for t in b.tasks]


def test_bf16_checkpoints_compute_in_float32_and_store_in_bf16(tmp_path):
    base_path, paths, _, fts = models(tmp_path, 2, dtype="bfloat16")
    store = Store.unify(tmp_path / "s", base_path, paths, **OPTS)
    assert {t["unified_dtype"] for t in manifest(store.path)["tensors"]} == {"BF16"}
    rebuilt = store.load_task(1)
    assert rebuilt["embed.weight"].dtype.name == "bfloat16"
    with fusion.io.open_checkpoint(paths[0]) as ckpt:
        original = to_float32(ckpt.read_flat("norm.weight"), BF16)
    assert np.abs(rebuilt["norm.weight"].astype(np.float32) - original).max() < 0.5


def test_the_dtype_option_stores_a_bf16_unified_delta(tmp_path):
    base_path, paths, _, _ = models(tmp_path, 2)
    store = Store.unify(tmp_path / "s", base_path, paths, dtype="bfloat16", **OPTS)
    assert {t["unified_dtype"] for t in manifest(store.path)["tensors"]} == {"BF16"}
    assert store.load_task(2)["embed.weight"].dtype == np.float32  # decoupled in the base's dtype


def test_private_tensors_and_integer_buffers(tmp_path):
    base = tiny_base()
    ft = tiny_finetune(base, seed=0)
    ft["head.weight"] = np.ones((5, 8), np.float32)  # another shape: a new head
    ft["extra.bias"] = np.arange(4, dtype=np.float32)  # not in the base
    ft["position_ids"] = np.zeros(6, np.int64)  # integer buffers come from the base
    paths = [write_checkpoint(ft, tmp_path / "ft.safetensors"),
             write_checkpoint(tiny_finetune(base, seed=1), tmp_path / "b.safetensors")]
    store = Store.unify(tmp_path / "s", write_checkpoint(base, tmp_path / "base.safetensors"), paths, **OPTS)
    assert store.task(1).private == ("head.weight", "extra.bias")
    rebuilt = store.load_task(1)
    assert np.array_equal(rebuilt["head.weight"], ft["head.weight"])
    assert np.array_equal(rebuilt["extra.bias"], ft["extra.bias"])
    assert np.array_equal(rebuilt["position_ids"], base["position_ids"])
    assert "extra.bias" not in store.load_task(2)


def test_a_missing_tensor_is_an_error_naming_it_unless_missing_is_zero(tmp_path):
    base_path, paths, base, fts = models(tmp_path, 2)
    partial = {n: t for n, t in fts[1].items() if n != "norm.weight"}
    partial_path = write_checkpoint(partial, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match=r"tensor 'norm.weight' of the base is missing.*--missing zero"):
        Store.unify(tmp_path / "s", base_path, [paths[0], partial_path])
    store = Store.unify(tmp_path / "s", base_path, [paths[0]], **OPTS)
    with pytest.raises(ValueError, match="norm.weight"):
        store.add(partial_path)
    record = store.add(partial_path, missing="zero")
    assert record.zero_filled == ("norm.weight",)
    assert np.array_equal(store.load_task(record.number)["norm.weight"], base["norm.weight"])


def test_tasks_keep_their_numbers_for_life(tmp_path):
    base_path, paths, _, _ = models(tmp_path, 4)
    store = Store.unify(tmp_path / "s", base_path, paths[:3], **OPTS)
    store.remove(2)
    record = store.add(paths[3])
    assert [(t.number, t.name) for t in store.tasks] == [(1, "task1"), (3, "task3"), (4, "task4")]
    assert record.number == 4 and store.task("4").name == "task4" and store.task(3).name == "task3"
    with pytest.raises(ValueError, match=r"no task 2.*1 \(task1\), 3 \(task3\), 4 \(task4\)"):
        store.task(2)


def test_task_names_are_never_numbers_and_are_safe_tokens(tmp_path):
    base_path, paths, _, _ = models(tmp_path, 2)
    for bad in ["1", "../x", "a b", ".hidden", ""]:
        with pytest.raises(ValueError):
            Store.unify(tmp_path / "s", base_path, paths[:1], names=[bad], **OPTS)
        assert not (tmp_path / "s").exists()
    numeric_file = write_checkpoint(tiny_finetune(tiny_base(), seed=5), tmp_path / "42.safetensors")
    store = Store.unify(tmp_path / "s", base_path, [numeric_file], **OPTS)
    assert store.task(1).name == "task-42"  # a default name from a numeric file name gets a prefix


def test_the_unified_delta_is_sharded(tmp_path):
    base_path, paths, _, _ = models(tmp_path, 2)
    store = Store.unify(tmp_path / "s", base_path, paths, max_shard_size=300, **OPTS)
    files = manifest(store.path)["unified"]["files"]
    assert len(files) > 1 and all("-of-" in f for f in files)
    assert store.verify().ok and store.load_task(1)


def test_fidelity_is_measured_again_while_the_source_is_unchanged(tmp_path):
    base_path, paths, _, _ = models(tmp_path, 3)
    store = Store.unify(tmp_path / "s", base_path, paths[:2], **OPTS)
    assert [t.fidelity["generation"] for t in store.tasks] == [0, 0]
    write_checkpoint(tiny_finetune(tiny_base(), seed=9), paths[1])  # task2's source changes in place
    store.add(paths[2])
    assert [t.fidelity["generation"] for t in store.tasks] == [1, 0, 1]


def test_l1_is_preserved_with_the_model_rescaler(tmp_path):
    base_path, paths, base, fts = models(tmp_path, 3)
    store = Store.unify(tmp_path / "s", base_path, paths, **OPTS)
    for i, ft in enumerate(fts):
        delta_l1 = sum(np.abs(ft[n].astype(np.float64) - base[n]).sum() for n in base if base[n].dtype.kind == "f")
        rebuilt = store.load_task(i + 1)
        rebuilt_l1 = sum(np.abs(rebuilt[n].astype(np.float64) - base[n]).sum() for n in base if base[n].dtype.kind == "f")
        assert rebuilt_l1 == pytest.approx(delta_l1, rel=1e-5)


def test_attachments_are_kept_and_survive_changes(tmp_path):
    base_path, paths, _, _ = models(tmp_path, 3)
    store = Store.unify(tmp_path / "s", base_path, paths[:2], **OPTS)
    protos = np.arange(12, dtype=np.float32).reshape(3, 4)
    store.attach("task2", "prototypes", {"p": protos})
    store.add(paths[2])
    store.remove(1)
    assert np.array_equal(store.attachment(2, "prototypes")["p"], protos)
    assert store.attachment(3, "prototypes") is None and store.task(2).attachments == ("prototypes",)
    assert store.verify().ok


def test_a_folder_decouple_loads_with_the_tasks_own_config_and_a_card(tmp_path):
    base = tiny_base()
    base_path = write_checkpoint(base, tmp_path / "base", layout="folder")
    ft_path = write_checkpoint(tiny_finetune(base, seed=0), tmp_path / "ft", layout="folder")
    (ft_path / "config.json").write_text(json.dumps({"model_type": "tiny", "num_labels": 7, "dtype": "float32"}))
    store = Store.unify(tmp_path / "s", base_path, [ft_path], **OPTS)
    out = store.decouple("ft", tmp_path / "out", dtype="bfloat16")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "tokenizer_config.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["num_labels"] == 7 and config["dtype"] == "bfloat16"
    card = (out / "README.md").read_text()
    assert "task | 1 `ft`" in card and "generation 0" in card and "rescaler | model" in card


def test_info_reports_sizes_and_savings(tmp_path):
    base_path, paths, _, _ = models(tmp_path, 2)
    report = Store.unify(tmp_path / "s", base_path, paths, **OPTS).info()
    assert report["sizes"]["total"] == sum(report["sizes"][k] for k in ("unified", "triggers", "private", "files", "attachments"))
    assert report["separate_checkpoints_bytes"] == 2 * base_path.stat().st_size
    assert [t["number"] for t in report["tasks"]] == [1, 2] and report["version"] == 2


def test_the_default_chunk_shares_one_budget_between_the_tasks():
    assert chunk_for(1) == 4 * fusion.engine.DEFAULT_CHUNK
    assert chunk_for(16) * 16 <= 4 * fusion.engine.DEFAULT_CHUNK and chunk_for(16) % 8 == 0
    assert chunk_for(10_000) == 1 << 16


def test_scalar_tensors_keep_their_shape_everywhere(tmp_path):
    base = {**tiny_base(), "logit_scale": np.array(2.5, np.float32)}
    ft = {**tiny_finetune(base, seed=0), "logit_scale": np.array(3.0, np.float32)}
    store = Store.unify(tmp_path / "s", write_checkpoint(base, tmp_path / "base.safetensors"),
                        [write_checkpoint(ft, tmp_path / "ft.safetensors")], **OPTS)
    store.attach(1, "scalars", {"t": np.array(7.0, np.float32)})
    assert store.load_task(1)["logit_scale"].shape == () == store.load_task(1, device="cpu")["logit_scale"].shape
    assert load_file(store.decouple(1, tmp_path / "d.safetensors"))["logit_scale"].shape == ()
    assert store.attachment(1, "scalars")["t"].shape == ()
