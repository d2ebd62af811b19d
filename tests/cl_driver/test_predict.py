"""The predictor (`ConduCLIP`, `condu-cl predict`) against the evaluation of the same run: a tiny
own-data run of two class-folder tasks, cut by the config's split, evaluated with task identity
and task-agnostically with each aggregate. Also: the loop records each task's split in the run."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cl_driver import ConduCLIP
from cl_driver.cli import main
from cl_driver.config import parse_config
from cl_driver.data import resolve_task
from cl_driver.inference import accuracy
from cl_driver.loop import ContinualRun, run
from cl_driver.models import load_clip
from cl_driver.predict import Label, Scores, format_predictions, ranked

from tests.cl_driver.helpers import draw

TASKS = {"colors": ("red", "green", "blue"), "stripes": ("horizontal", "vertical")}  # helpers.draw's classes
PER_CLASS = 8  # split {test: 0.25, val: 0.25}: 2 test, 2 val, 4 train images a class
METHODS = [{"kind": "condu", "rescaler": "model"},
           {"kind": "condu", "rescaler": "model", "agnostic": True},
           {"kind": "condu", "rescaler": "model", "agnostic": True, "aggregate": "weighted", "name": "condu-weighted"},
           {"kind": "condu", "rescaler": "model", "agnostic": True, "aggregate": "gated", "name": "condu-gated"}]
ROUTED = ["condu-model-agnostic", "condu-weighted", "condu-gated"]


def write_class_folders(root: Path, per_class: int = PER_CLASS, start: int = 0) -> Path:
    """root/<task>/<class>/NN.png: one folder of class folders a task, no split on disk."""
    for task, classes in TASKS.items():
        rng = random.Random(f"{task}-{start}")
        for label, name in enumerate(classes):
            (root / task / name).mkdir(parents=True, exist_ok=True)
            for k in range(start, start + per_class):
                draw(task, label, rng).save(root / task / name / f"{k:02d}.png")
    return root


def own_config(data: Path, model: Path, methods=None):
    """Class names from the folders, DEFAULT_TEMPLATES: what a user's own data gets."""
    return parse_config({
        "model": str(model), "device": "cpu", "fusion_kernel": "reference",
        "tasks": [{"name": t, "source": {"kind": "folder", "path": str(data / t), "split": {"test": 0.25, "val": 0.25}}}
                  for t in TASKS],
        "training": {"iterations": 3, "batch_size": 8, "lr": 3e-3, "warmup_steps": 1, "seed": 0},
        "evaluation": {"batch_size": 4, "top_k": 1, "cache_size": 2},  # K = 1 of 2: the route decides
        "methods": methods or METHODS}, where="own.yaml")


@pytest.fixture(scope="module")
def own_run(tiny_model, tmp_path_factory):
    """(run folder, its results, its config) of the whole loop on the own-data tasks."""
    data = write_class_folders(tmp_path_factory.mktemp("own-data"))
    config = own_config(data, tiny_model)
    out = tmp_path_factory.mktemp("own-run") / "run"
    return out, run(config, out, progress=False), config


@pytest.fixture(scope="module")
def view(own_run, tiny_model):
    """The loop over the finished run: its evaluation, test sets and specs, no training."""
    out, _, config = own_run
    return ContinualRun(config, out, progress=False, clip=load_clip(tiny_model))


@pytest.fixture(scope="module")
def model(own_run) -> ConduCLIP:
    return ConduCLIP.from_run(own_run[0])


def task_test_images(spec) -> tuple[list[Path], torch.Tensor]:
    """A task's test images as files, in the evaluation's order, and their labels."""
    entries = spec.files["test"]
    return [Path(spec.source["path"]) / f for _, f in entries], torch.tensor([label for label, _ in entries])


def method(config, name: str):
    return next(m for m in config.methods if m.name == name)


# -- prediction equals evaluation ------------------------------------------------------------------------


def test_a_learned_task_is_predicted_with_its_own_expert_as_evaluated(own_run, view, model):
    _, results, _ = own_run
    store, last = view.evaluation.open_store("model"), len(TASKS) - 1
    for j, spec in enumerate(view.specs):
        paths, labels = task_test_images(spec)
        evaluated = view.evaluation.task_logits(("condu", "model", last, j),
                                                lambda j=j: view.evaluation.load_expert(store, j), j)
        scores = model.scores(paths, task=spec.name)
        assert scores.routes is None and [lab.name for lab in scores.labels] == list(spec.class_names)
        assert torch.allclose(scores.logits, evaluated, atol=1e-4)
        top1 = [r[0]["label"] for r in model.predict(paths, task=spec.name, top=1)]
        assert top1 == [spec.class_names[c] for c in evaluated.argmax(1).tolist()]
        assert accuracy(scores.logits, labels) == pytest.approx(results["matrices"]["condu-model"][-1][j], abs=1e-9)


@pytest.mark.parametrize("name", ROUTED)
def test_task_agnostic_prediction_equals_the_evaluations_routed_row(own_run, view, model, name):
    """Every learned class at once; on one task's classes, the evaluation's logits of that task."""
    _, results, config = own_run
    chosen = method(config, name)
    combined, _ = view.evaluation.routed(chosen, len(TASKS) - 1, range(len(TASKS)))
    for j, spec in enumerate(view.specs):
        paths, labels = task_test_images(spec)
        evaluated, route = combined[j]
        scores = model.scores(paths, aggregate=chosen.aggregate)
        assert scores.labels == [Label(s.name, c) for s in view.specs for c in s.class_names]  # folders' sorted names
        own = [k for k, label in enumerate(scores.labels) if label.task == spec.name]
        assert torch.allclose(scores.logits[:, own], evaluated, atol=1e-4)
        assert torch.equal(scores.logits[:, own].argmax(1), evaluated.argmax(1))
        assert torch.equal(scores.routes.selection, route.selection)
        assert accuracy(scores.logits[:, own], labels) == pytest.approx(results["matrices"][name][-1][j], abs=1e-9)


@pytest.mark.parametrize("name", ROUTED)
def test_candidate_labels_are_routed_as_an_unseen_task_is(own_run, view, model, name):
    """A task's class names as labels of one's own (its templates are the defaults): its routed logits."""
    _, _, config = own_run
    chosen = method(config, name)
    combined, _ = view.evaluation.routed(chosen, len(TASKS) - 1, range(len(TASKS)))
    for j, spec in enumerate(view.specs):
        paths, _ = task_test_images(spec)
        scores = model.scores(paths, list(spec.class_names), aggregate=chosen.aggregate)
        assert scores.labels == [Label(None, c) for c in spec.class_names]
        assert torch.allclose(scores.logits, combined[j][0], atol=1e-4)
        assert torch.equal(scores.logits.argmax(1), combined[j][0].argmax(1))


def test_gates_are_the_recorded_ones_or_calibrated_alike(own_run, view, model, tmp_path):
    out, _, config = own_run
    store = view.evaluation.open_store("model")
    evaluated = view.evaluation.gate_thresholds(store, method(config, "condu-gated"), len(TASKS) - 1)
    assert torch.equal(model.gates(), evaluated)
    # a run whose methods were not gated: the same gates, calibrated on the held-out images
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    state = json.loads((copy / "state.json").read_text())
    state["gates"] = {}
    (copy / "state.json").write_text(json.dumps(state))
    assert torch.equal(ConduCLIP.from_run(copy).gates(), evaluated)


def test_the_defaults_are_the_runs_first_condu_method(model):
    assert (model.method.name, model.aggregate, model.top_k) == ("condu-model", "mean", 1)
    assert model.tasks == list(TASKS)


# -- results ----------------------------------------------------------------------------------------------


def test_results_are_shaped_like_the_zero_shot_pipeline(own_run, view, model):
    paths, _ = task_test_images(view.specs[0])
    one = model.predict(paths[0])
    assert isinstance(one, list) and len(one) == 5 and set(one[0]) == {"label", "score", "task"}
    assert [r["score"] for r in one] == sorted((r["score"] for r in one), reverse=True)
    everything = model.predict(paths[0], top=None)
    assert len(everything) == 5 and sum(r["score"] for r in everything) == pytest.approx(1.0, abs=1e-5)
    from PIL import Image

    with Image.open(paths[0]) as image:
        assert model.predict([image, str(paths[1])], top=2) == model.predict([paths[0], paths[1]], top=2)
    labelled = model.predict(paths[:2], ["red", "blue"], top=None)
    assert [set(r) for r in labelled[0]] == [{"label", "score"}] * 2


def test_ranking_and_the_printed_blocks():
    scores = Scores(torch.tensor([[0.0, 2.0, 1.0]]), [Label("a", "x"), Label("b", "long name"), Label(None, "z")],
                    None)
    (result,) = ranked(scores, 2)
    assert [r["label"] for r in result] == ["long name", "z"] and result[0]["task"] == "b" and "task" not in result[1]
    assert result[0]["score"] == pytest.approx(torch.tensor([0.0, 2.0, 1.0]).softmax(0)[1].item())
    text = format_predictions(["img.png"], [result])
    assert text.splitlines() == ["img.png", f"  long name  b  {result[0]['score']:.3f}",
                                 f"  z             {result[1]['score']:.3f}"]


@pytest.mark.parametrize("kwargs, message", [
    ({"task": "nope"}, "no learned task 'nope'; this run learned: colors, stripes"),
    ({"task": "colors", "candidate_labels": ["a"]}, "not both"),
    ({"candidate_labels": ["a", "a"]}, r"\['a'\] given more than once"),
    ({"candidate_labels": []}, "one or more non-empty class names"),
    ({"aggregate": "max"}, "aggregate must be one of mean, weighted, gated"),
    ({"top_k": 0}, "top_k"),
    ({"top": 0}, "top: at least 1"),
])
def test_bad_arguments_are_one_line(own_run, view, model, kwargs, message):
    paths, _ = task_test_images(view.specs[0])
    with pytest.raises(ValueError, match=message):
        model.predict(paths[0], **kwargs)


def test_a_run_folder_that_cannot_predict_says_why(own_run, tmp_path):
    with pytest.raises(ValueError, match="no such run"):
        ConduCLIP.from_run(tmp_path / "nothing")
    out = own_run[0]
    with pytest.raises(ValueError, match="no ConDU store with rescaler 'tensor'; this run has: model"):
        ConduCLIP.from_run(out, rescaler="tensor")
    zero = tmp_path / "zero"
    zero.mkdir()
    state = json.loads((out / "state.json").read_text())
    (zero / "state.json").write_text(json.dumps({**state, "completed": 0}))
    with pytest.raises(ValueError, match="no task is finished yet"):
        ConduCLIP.from_run(zero)


# -- the command ------------------------------------------------------------------------------------------


def test_predict_command_prints_a_block_per_image_or_json(own_run, view):
    out = str(own_run[0])
    paths, _ = task_test_images(view.specs[0])
    images = [str(p) for p in paths[:2]]
    by_task = CliRunner().invoke(main, ["predict", out, *images, "--task", "colors", "--top", "2"])
    assert by_task.exit_code == 0, by_task.output
    lines = by_task.output.splitlines()
    assert [lines[0], lines[3]] == images and len(lines) == 6
    assert {line.split()[0] for line in lines[1:3]} <= set(TASKS["colors"])
    routed = CliRunner().invoke(main, ["predict", out, images[0], "--json", "--top", "5", "--aggregate", "weighted"])
    (entry,) = json.loads(routed.output)
    assert entry["image"] == images[0] and len(entry["predictions"]) == 5
    assert {p["task"] for p in entry["predictions"]} <= set(TASKS)
    labelled = CliRunner().invoke(main, ["predict", out, images[0], "--labels", "red,blue", "--json"])
    assert [p["label"] for p in json.loads(labelled.output)[0]["predictions"]] in (["red", "blue"], ["blue", "red"])


@pytest.mark.parametrize("args, message", [
    (["RUN", "IMG", "--task", "nope"], "error: no learned task 'nope'; this run learned: colors, stripes"),
    (["RUN", "missing.png"], "error: missing.png: no such image file"),
    (["RUN", "BAD"], "cannot be read as an image"),
    (["nowhere", "IMG"], "error: nowhere: no such run"),
    (["RUN", "IMG", "--task", "colors", "--labels", "a"], "not both"),
])
def test_predict_command_errors_are_one_line(own_run, view, tmp_path, args, message):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    image = str(task_test_images(view.specs[0])[0][0])
    args = [{"RUN": str(own_run[0]), "IMG": image, "BAD": str(bad)}.get(a, a) for a in args]
    result = CliRunner().invoke(main, ["predict", *args])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert message in result.output


# -- the run's split record --------------------------------------------------------------------------------


def test_the_run_records_each_tasks_split_and_a_resumed_run_reads_it(tiny_model, tmp_path):
    data = write_class_folders(tmp_path / "data")
    config, out = own_config(data, tiny_model, methods=["zero_shot"]), tmp_path / "run"
    assert run(config, out, progress=False, stop_after=1) is None
    records = {t: json.loads((out / "splits" / f"{t}.json").read_text())["files"] for t in TASKS}
    write_class_folders(data, per_class=4, start=PER_CLASS)  # images added before the run resumes
    assert run(config, out, progress=False) is not None
    resumed = ContinualRun(config, out, progress=False)
    for j, task in enumerate(config.tasks):
        files = {split: [list(entry) for entry in entries] for split, entries in resumed.specs[j].files.items()}
        assert files == records[task.name]
        assert len(resumed.data.test_set(j)[1]) == len(records[task.name]["test"])
        assert resolve_task(task).files != resumed.specs[j].files  # cut anew, the added images would move it
