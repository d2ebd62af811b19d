"""The whole continual loop on a tiny random CLIP with three tiny tasks, every method."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from cl_driver.config import parse_config
from cl_driver.finetunes import weights_file
from cl_driver.inference import accuracy, combine_all_experts, top_k_experts
from cl_driver.loop import ContinualRun, run
from cl_driver.models import clip_logits, load_clip, load_weights, text_classifier
from cl_driver.prototypes import compute_prototypes, dataset_features, routing_weights
from cl_driver.stores import PROTOTYPES
from fusion import Store

from tests.cl_driver.helpers import TASKS, tiny_config_dict

T = len(TASKS)


@pytest.fixture(scope="module")
def clip(tiny_model):
    return load_clip(tiny_model)


@pytest.fixture(scope="module")
def loop_view(tiny_config, full_run, clip):
    """A ContinualRun over the finished run folder: its test sets and paths, no training."""
    out, _ = full_run
    return ContinualRun(tiny_config, out, progress=False, clip=clip)


def accuracy_of(clip, state, view, j):
    """Accuracy of a full state dict on task j, computed here without the loop's evaluator."""
    load_weights(clip.model, state)
    dataset, labels = view.data.test_set(j)
    spec = view.specs[j]
    feats, _ = dataset_features(clip, dataset)
    return accuracy(clip_logits(clip.model, feats, text_classifier(clip, spec.class_names, spec.templates)), labels)


def test_every_method_gives_a_full_matrix_and_the_outputs(full_run, tiny_config):
    out, results = full_run
    names = [m.name for m in tiny_config.methods]
    assert list(results["matrices"]) == names
    for name in names:
        matrix = torch.tensor(results["matrices"][name])
        assert matrix.shape == (T, T) and ((0 <= matrix) & (matrix <= 100)).all()
        assert (out / f"heatmap-{name}.png").stat().st_size > 1000
        assert set(results["summary"][name]) == {"transfer", "average", "last"}
    saved = json.loads((out / "results.json").read_text())
    assert saved["matrices"] == results["matrices"]
    markdown = (out / "results.md").read_text()
    assert "| ConDU, model rescaler |" in markdown and "| sequential fine-tuning |" in markdown
    assert "| ConDU task-agnostic, model rescaler, weighted aggregation (condu-weighted) |" in markdown
    assert "Accuracy in % on each task" in markdown and "config: tiny.yaml" in markdown
    # routing is reported for the task-agnostic methods only, for the tasks seen so far
    routing = results["routing_top1"]["condu-model-agnostic"]
    assert set(results["routing_top1"]) == {"condu-model-agnostic", "condu-weighted"}
    assert [[v is None for v in row] for row in routing] == [[j > i for j in range(T)] for i in range(T)]
    store = results["stores"]["model"]
    assert store["tasks"] == T and 0 < store["total"] < store["separate_checkpoints_bytes"]
    assert results["cost"]["train_from_theta0_s"] > 0 and set(results["cost"]["store_s"]) == {"model", "tensor"}


def test_fidelity_is_reported_after_each_task_own_step_and_after_the_last(full_run):
    fidelity = full_run[1]["fidelity"]["model"]
    assert [f["task"] for f in fidelity] == list(TASKS)
    first = fidelity[0]
    assert first["own_step"]["cosine"] == pytest.approx(1.0) and first["own_step"]["rel_l2"] == pytest.approx(0.0)
    for f in fidelity:
        assert -1.0 <= f["last_step"]["cosine"] <= 1.0 + 1e-9 and f["last_step"]["rel_l2"] >= 0
    assert fidelity[-1]["own_step"] == fidelity[-1]["last_step"]


def test_baselines_share_the_zero_shot_row_where_nothing_was_learned(full_run):
    m = full_run[1]["matrices"]
    zero = m["zero_shot"][0]
    assert all(row == zero for row in m["zero_shot"])
    for i in range(T):  # individual experts: unseen tasks are zero-shot
        assert m["individual"][i][i + 1:] == zero[i + 1:]
    assert m["individual"][0][0] == m["sequential"][0][0]  # both fine-tuned task 1 from theta0


def test_fine_tunes_start_from_theta0_and_sequential_ones_from_the_previous_model(full_run, loop_view):
    checkpoint = loop_view.folder.checkpoint
    first = [load_file(str(weights_file(checkpoint(kind, 0)))) for kind in ("individual", "sequential")]
    assert all(torch.equal(first[0][k], first[1][k]) for k in first[0])  # same start, same seed
    second = [load_file(str(weights_file(checkpoint(kind, 1)))) for kind in ("individual", "sequential")]
    assert any(not torch.equal(second[0][k], second[1][k]) for k in second[0])


def test_each_seen_task_expert_is_the_store_decoupled_model(full_run, loop_view, clip, tmp_path):
    out, results = full_run
    for rescaler, method in (("model", "condu-model"), ("tensor", "condu-tensor")):
        store = Store.open(out / "stores" / rescaler)
        assert [t.name for t in store.tasks] == list(TASKS)
        for j in range(T):
            decoupled = load_file(str(store.decouple(j + 1, tmp_path / f"{rescaler}-{j}.safetensors")))
            used = loop_view.evaluation.load_expert(store, j)
            assert all(torch.equal(used[k], decoupled[k]) for k in decoupled)
            assert accuracy_of(clip, decoupled, loop_view, j) == results["matrices"][method][-1][j]


def test_prototypes_are_computed_with_theta0(full_run, loop_view, clip):
    out, _ = full_run
    store = Store.open(out / "stores" / "model")
    theta0 = load_file(str(out / "base.safetensors"))
    for j, spec in enumerate(loop_view.specs):
        stored = torch.from_numpy(store.attachment(j + 1, PROTOTYPES)[PROTOTYPES])
        train = loop_view.data.train_set(j)
        load_weights(clip.model, theta0)
        feats, labels = dataset_features(clip, train)
        expected = compute_prototypes(clip, feats, labels, spec.class_names, spec.templates)
        assert stored.shape == (len(spec.class_names), expected.shape[1])
        assert torch.allclose(stored, expected, atol=1e-6)
        load_weights(clip.model, load_file(str(weights_file(loop_view.folder.checkpoint("individual", j)))))
        feats, labels = dataset_features(clip, train)
        tuned = compute_prototypes(clip, feats, labels, spec.class_names, spec.templates)
        assert not torch.allclose(stored, tuned, atol=1e-4)


@pytest.mark.parametrize("method, aggregate", [("condu-model-agnostic", "mean"), ("condu-weighted", "weighted")])
def test_routed_inference_equals_computing_every_expert_then_selecting(full_run, loop_view, clip, method, aggregate):
    out, results = full_run
    store = Store.open(out / "stores" / "model")
    theta0 = load_file(str(out / "base.safetensors"))
    experts = [store.load_task(t + 1, device="cpu") for t in range(T)]
    protos = [torch.from_numpy(store.attachment(t + 1, PROTOTYPES)[PROTOTYPES]) for t in range(T)]
    for j, spec in enumerate(loop_view.specs):
        dataset, labels = loop_view.data.test_set(j)

        def logits_of(state):
            load_weights(clip.model, state)
            feats, _ = dataset_features(clip, dataset)
            return clip_logits(clip.model, feats, text_classifier(clip, spec.class_names, spec.templates)), feats

        base_logits, feats0 = logits_of(theta0)
        selection, values = top_k_experts(routing_weights(feats0, protos), 2)
        every = torch.stack([logits_of(state)[0] for state in experts])  # (T, N, C): all experts, all samples
        combined = combine_all_experts(base_logits, every, selection, values, aggregate)
        assert accuracy(combined, labels) == pytest.approx(results["matrices"][method][-1][j], abs=1e-9)


def test_resume_after_an_interruption_gives_the_same_matrix(tiny_model, tiny_data, full_run, tmp_path):
    methods = ["sequential", {"kind": "condu", "rescaler": "model"},
               {"kind": "condu", "rescaler": "model", "agnostic": True}]
    config = parse_config(tiny_config_dict(tiny_data, tiny_model, methods=methods), where="tiny.yaml")
    out = tmp_path / "run"
    assert run(config, out, progress=False, stop_after=2) is None
    state = json.loads((out / "state.json").read_text())
    assert state["completed"] == 2 and not (out / "results.json").exists()
    # a crash inside step 2, after its store update and before its state was saved
    state["completed"] = 1
    state["rows"] = {name: rows[:1] for name, rows in state["rows"].items()}
    state["fidelity"] = {name: steps[:1] for name, steps in state["fidelity"].items()}
    (out / "state.json").write_text(json.dumps(state))
    results = run(config, out, progress=False)
    for name in ("sequential", "condu-model", "condu-model-agnostic"):
        assert results["matrices"][name] == full_run[1]["matrices"][name]
    assert [t.name for t in Store.open(out / "stores" / "model").tasks] == list(TASKS)
    assert results["fidelity"] == {"model": full_run[1]["fidelity"]["model"]}


def test_a_run_folder_refuses_another_config(tiny_model, tiny_data, full_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(full_run[0], out, ignore=shutil.ignore_patterns("stores", "checkpoints"))
    other = parse_config(tiny_config_dict(tiny_data, tiny_model, methods=["zero_shot"]), where="tiny.yaml")
    with pytest.raises(ValueError, match="another config"):
        run(other, out, progress=False)


def test_pixel_cache_leaves_the_matrix_unchanged(tiny_model, tiny_data, full_run, tmp_path, monkeypatch):
    import cl_driver.data as data

    monkeypatch.setattr(data, "MATERIALIZE_BYTES", 0)  # every test set goes through the cache
    raw = tiny_config_dict(tiny_data, tiny_model, methods=["zero_shot"])
    raw["evaluation"]["pixel_cache"] = True
    results = run(parse_config(raw, where="tiny.yaml"), tmp_path / "run", progress=False)
    assert results["matrices"]["zero_shot"] == full_run[1]["matrices"]["zero_shot"]
    assert len(list((tmp_path / "run" / "pixels").glob("*-test-*.npy"))) == T


def test_shots_train_each_task_on_n_images_a_class(tiny_model, tiny_data, full_run, clip, tmp_path):
    raw = tiny_config_dict(tiny_data, tiny_model, methods=["individual", {"kind": "condu", "rescaler": "model"}])
    raw["training"]["shots"] = 2
    config = parse_config(raw, where="tiny.yaml")
    out = tmp_path / "run"
    results = run(config, out, progress=False)
    view = ContinualRun(config, out, progress=False, clip=clip)
    store = Store.open(out / "stores" / "model")
    theta0 = load_file(str(out / "base.safetensors"))
    for j, spec in enumerate(view.specs):
        train = view.data.train_set(j)
        assert torch.bincount(train.tensors[1]).tolist() == [2] * len(spec.class_names)
        load_weights(clip.model, theta0)
        feats, labels = dataset_features(clip, train)  # the prototypes come from those few images too
        expected = compute_prototypes(clip, feats, labels, spec.class_names, spec.templates)
        assert torch.allclose(torch.from_numpy(store.attachment(j + 1, PROTOTYPES)[PROTOTYPES]), expected, atol=1e-6)
    few, full = (load_file(str(root / "checkpoints" / "individual" / "01-colors" / "model.safetensors"))
                 for root in (out, full_run[0]))
    assert any(not torch.equal(few[k], full[k]) for k in few)
    assert len(results["matrices"]["condu-model"]) == T

