"""The `gated` aggregate: its calibration (pure functions) and its path through the loop and the CLI."""

import json
import math
import shutil

import pytest
import torch
import yaml
from click.testing import CliRunner

from cl_driver.cli import main
from cl_driver.config import AGGREGATES, parse_config
from cl_driver.gating import expert_thresholds, gate_selection, passes, recorded
from cl_driver.evaluation import Evaluation
from cl_driver.inference import accuracy, combine_all_experts, combine_routed, route, top_k_experts
from cl_driver.loop import ContinualRun, run
from cl_driver.stores import learned_prototypes
from cl_driver.taskdata import TaskData

from tests.cl_driver.helpers import TASKS, tiny_config_dict, write_task_folder

T = len(TASKS)


# ---------------------------------------------------------------- calibration, pure


def test_each_experts_bar_is_its_best_fit_to_another_learned_tasks_images():
    held_out = {0: torch.tensor([[0.9, 0.2, 0.1], [0.8, 0.5, 0.3]]),  # task 0's images: (N, T) weights
                1: torch.tensor([[0.6, 0.7, 0.2]]),
                2: torch.tensor([[0.1, 0.4, 0.95]])}
    # expert 0: best on tasks 1, 2 is 0.6; expert 1: 0.5 (task 0); expert 2: 0.3 (task 0)
    assert expert_thresholds(held_out, 3).tolist() == pytest.approx([0.6, 0.5, 0.3])


def test_with_one_task_learned_the_gate_is_shut():
    assert expert_thresholds({0: torch.tensor([[0.9], [0.1]])}, 1).tolist() == [math.inf]
    assert recorded(torch.tensor([math.inf, 0.25])) == [None, 0.25]


@pytest.mark.parametrize("seed", range(5))
def test_on_learned_tasks_held_out_images_only_their_own_expert_can_pass(seed):
    # So a learned task posing as unseen gets exactly theta0's prediction: zero-shot by design.
    gen = torch.Generator().manual_seed(seed)
    held_out = {s: torch.rand(7, 4, generator=gen) * 2 - 1 for s in range(4)}
    thresholds = expert_thresholds(held_out, 4)
    for s, weights in held_out.items():
        selection, values = top_k_experts(weights, 4)
        assert (selection[passes(selection, values, thresholds)] == s).all()
        unseen = weights.clone()
        unseen[:, s] = -math.inf  # task s posing as unseen: its own expert does not exist yet
        selection, values = top_k_experts(unseen, 3)
        base = torch.randn(7, 3, generator=gen)
        assert torch.equal(combine_routed(base, gate_selection(selection, values, thresholds), values, {}, "gated"),
                           base)


def test_a_shut_gate_gives_exactly_theta0s_logits():
    base = torch.randn(5, 3)
    selection, values = top_k_experts(torch.rand(5, 4), 2)
    gated = gate_selection(selection, values, torch.full((4,), math.inf))
    assert (gated == -1).all()
    assert torch.equal(combine_routed(base, gated, values, {}, "gated"), base)
    bar = torch.tensor([0.5, 0.0, 2.0, 0.5])
    assert torch.equal(gate_selection(selection, values, bar) == -1, values <= bar[selection])
    assert "gated" in AGGREGATES


# ---------------------------------------------------------------- through the loop and the CLI


@pytest.fixture(scope="module")
def data_with_val(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-data-val")
    for task in TASKS:
        write_task_folder(root, task, n_val=4)
    return root


def gated_config(data, model, **evaluation):
    methods = ["zero_shot", {"kind": "condu", "rescaler": "model"}, {"kind": "condu", "rescaler": "model", "agnostic": True}]
    raw = tiny_config_dict(data, model, methods=methods)
    raw["evaluation"].update(aggregate="gated", **evaluation)
    return parse_config(raw, where="tiny.yaml")


@pytest.fixture(scope="module")
def gated_run(tiny_model, data_with_val, tmp_path_factory):
    out = tmp_path_factory.mktemp("run-gated")
    return out, run(gated_config(data_with_val, tiny_model), out, progress=False)


def test_calibration_reads_only_held_out_images_of_learned_tasks(tiny_model, data_with_val, tmp_path, monkeypatch):
    import cl_driver.taskdata as taskdata

    reads, step = [], {"i": None}
    real_load, real_gates = taskdata.load_split, Evaluation.gate_thresholds
    real_test, real_base = TaskData.test_set, TaskData.base_eval

    def spy_load(spec, split, **kw):
        reads.append((step["i"], spec.name, split))
        return real_load(spec, split, **kw)

    def spy_gates(self, store, method, i):
        step["i"] = i
        try:
            return real_gates(self, store, method, i)
        finally:
            step["i"] = None

    def no_test_data_while_calibrating(real):
        def spy(self, j):
            assert step["i"] is None, f"calibration at step {step['i']} read the test set of task {j}"
            return real(self, j)
        return spy

    monkeypatch.setattr(taskdata, "load_split", spy_load)
    monkeypatch.setattr(Evaluation, "gate_thresholds", spy_gates)
    monkeypatch.setattr(TaskData, "test_set", no_test_data_while_calibrating(real_test))
    monkeypatch.setattr(TaskData, "base_eval", no_test_data_while_calibrating(real_base))
    run(gated_config(data_with_val, tiny_model), tmp_path / "run", progress=False)
    calibration = [(i, name, split) for i, name, split in reads if i is not None]
    names = list(TASKS)
    assert all(split == "val" for _, _, split in calibration)  # never a test or training split
    assert all(names.index(name) <= i for i, name, _ in calibration)  # never a task not yet learned
    assert {name for _, name, _ in calibration} == set(names)  # each, once learned


def test_unseen_tasks_held_out_images_are_never_needed(tiny_model, data_with_val, gated_run, tmp_path):
    # Delete the last task's val/ folder: the steps before that task is learned run unchanged.
    data = tmp_path / "data"
    shutil.copytree(data_with_val, data)
    last = list(TASKS)[-1]
    shutil.rmtree(data / last / "val")
    out = tmp_path / "run"
    assert run(gated_config(data, tiny_model), out, progress=False, stop_after=T - 1) is None
    state = json.loads((out / "state.json").read_text())
    _, full = gated_run
    assert state["gates"]["condu-model"] == full["gates"]["condu-model"][:T - 1]
    assert state["rows"]["condu-model"] == full["matrices"]["condu-model"][:T - 1]
    with pytest.raises(ValueError, match=f"task '{last}'.*held-out `val` images"):
        run(gated_config(data, tiny_model), out, progress=False)


def test_gated_rows_are_theta0_plus_the_experts_above_the_recorded_threshold(gated_run, tiny_model, data_with_val):
    out, results = gated_run
    gates = results["gates"]["condu-model"]
    assert [len(g) for g in gates] == list(range(1, T + 1)) and gates[0] == [None]  # one task: shut, zero-shot
    matrix, zero = results["matrices"]["condu-model"], results["matrices"]["zero_shot"]
    assert matrix[0][1:] == zero[0][1:]
    # Task-agnostic at the last step, recomputed from the final store with the reference combiner.
    view = ContinualRun(gated_config(data_with_val, tiny_model), out, progress=False)
    store, method = view.evaluation.open_store("model"), view.config.methods[2]
    thresholds = view.evaluation.gate_thresholds(store, method, T - 1)
    assert recorded(thresholds) == results["gates"][method.name][-1]
    experts = [view.evaluation.load_expert(store, t) for t in range(T)]
    for j in range(T):
        base_logits, feats0, labels = view.data.base_eval(j)
        dataset, _ = view.data.test_set(j)
        every = []
        for t, state in enumerate(experts):
            view.runner.activate(("check", t), lambda state=state: state)
            every.append(view.runner.logits(dataset, view.specs[j].class_names, view.specs[j].templates)[0])
        selection, values = route(feats0, learned_prototypes(store, T - 1), view.config.evaluation.top_k)
        combined = combine_all_experts(base_logits, torch.stack(every), gate_selection(selection, values, thresholds),
                                       values, "gated")
        assert accuracy(combined, labels) == pytest.approx(results["matrices"][method.name][-1][j], abs=1e-9)


def test_cli_offers_every_aggregate_and_runs_the_gated_one(tiny_model, data_with_val, gated_run, tmp_path):
    config = tmp_path / "tiny.yaml"
    raw = tiny_config_dict(data_with_val, tiny_model, methods=["zero_shot", {"kind": "condu", "rescaler": "model"}])
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(config), "--aggregate", "gated", "--out", str(out), "--no-progress",
                                       "--threads", "1"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    for name in ("zero_shot", "condu-model"):  # the same as the loop's run of that config, method for method
        assert saved["matrices"][name] == gated_run[1]["matrices"][name]
    assert saved["gates"]["condu-model"] == gated_run[1]["gates"]["condu-model"]
    help_text = CliRunner().invoke(main, ["run", "--help"]).output
    assert all(name in help_text for name in AGGREGATES)


def test_gated_without_held_out_images_is_one_clear_error(tiny_model, tiny_data, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tiny_data, tiny_model, methods=["zero_shot", "condu"])))
    result = CliRunner().invoke(main, ["run", str(config), "--aggregate", "gated", "--out", str(tmp_path / "o"),
                                       "--no-progress"])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "task 'colors'" in errors[0] and "val/" in errors[0] and "--aggregate mean" in errors[0]
