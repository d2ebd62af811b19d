"""The `gated` aggregate: its calibration (pure functions) and its path through the loop and the CLI."""

import json
import math
import shutil

import pytest
import torch
import yaml
from click.testing import CliRunner

from cl_driver import gating
from cl_driver.cli import main
from cl_driver.config import AGGREGATES, parse_config
from cl_driver.gating import GateCase, calibrate_threshold, gate_selection, leave_one_out, prefix_correct
from cl_driver.inference import accuracy, combine_all_experts, combine_routed, rows_selecting, top_k_experts
from cl_driver.loop import ContinualRun, run

from tests.cl_driver.helpers import TASKS, tiny_config_dict, write_task_folder

T = len(TASKS)


def case(base, labels, values, slots) -> GateCase:
    return GateCase(torch.tensor(base, dtype=torch.float32), torch.tensor(labels), torch.tensor(values),
                    torch.tensor(slots, dtype=torch.float32))


# ---------------------------------------------------------------- calibration, pure


def test_prefix_correct_averages_theta0_with_the_first_m_experts():
    # theta0 says class 0; expert 1 pushes to class 1, expert 2 pushes back to class 0
    c = case([[1.0, 0.0]], [1], [[0.9, 0.5]], [[[0.0, 3.0], [4.0, 0.0]]])
    assert prefix_correct(c).tolist() == [[False, True, False]]


def test_the_gate_admits_an_expert_that_helps_and_keeps_out_one_that_hurts():
    # Two images of one learned task, each routed to one expert: the one at similarity 0.8 turns
    # a wrong answer right, the one at 0.3 turns a right answer wrong. Only tau in [0.3, 0.8) is safe.
    c = case([[1.0, 0.0], [1.0, 0.0]], [1, 0], [[0.8], [0.3]], [[[0.0, 5.0]], [[0.0, 5.0]]])
    tau = calibrate_threshold([c])
    assert tau == pytest.approx(0.3)
    assert (c.values > tau).flatten().tolist() == [True, False]


def test_no_evidence_or_only_harm_means_no_expert_ever_joins():
    assert calibrate_threshold([]) == math.inf
    hurts = case([[1.0, 0.0], [0.0, 1.0]], [0, 1], [[0.9], [0.7]], [[[0.0, 9.0]], [[9.0, 0.0]]])
    assert calibrate_threshold([hurts]) == math.inf


def test_no_learned_task_may_lose_accuracy_even_when_the_total_would_gain():
    # The expert helps task a on two images and costs task b one: the net gain is refused.
    a = case([[1.0, 0.0], [1.0, 0.0]], [1, 1], [[0.6], [0.6]], [[[0.0, 5.0]], [[0.0, 5.0]]])
    b = case([[1.0, 0.0]], [0], [[0.6]], [[[0.0, 5.0]]])
    assert calibrate_threshold([a, b]) == math.inf
    assert calibrate_threshold([a]) < 0.6


def test_ties_go_to_the_larger_threshold():
    # An expert that changes nothing: every tau is as good, and the gate stays shut.
    neutral = case([[2.0, 0.0]], [0], [[0.5]], [[[1.0, 0.0]]])
    assert calibrate_threshold([neutral]) == math.inf


def brute_force_threshold(cases, selections, expert_logits) -> float:
    """The threshold search written with the inference code: gate, combine, count, for every candidate."""
    candidates = gating.candidate_thresholds(cases).tolist()
    best, best_total = None, -1
    for tau in candidates:
        counts = []
        for c, sel, experts in zip(cases, selections, expert_logits):
            gated = gate_selection(sel, c.values, tau)
            kept = {t: logits[(gated[sel == t] >= 0)] for t, logits in experts.items()}
            combined = combine_routed(c.base_logits, gated, c.values, kept, "gated")
            counts.append(int((combined.argmax(1) == c.labels).sum()))
        zero = [int((c.base_logits.argmax(1) == c.labels).sum()) for c in cases]
        if all(n >= z for n, z in zip(counts, zero)) and sum(counts) >= best_total:
            best, best_total = tau, sum(counts)
    return math.inf if best == candidates[-1] else best


@pytest.mark.parametrize("seed", range(6))
def test_threshold_search_equals_gating_and_combining_every_candidate(seed):
    gen = torch.Generator().manual_seed(seed)
    cases, selections, expert_logits = [], [], []
    for s in range(3):  # three learned tasks posing as unseen, each against three other experts
        n, c, k = 12, 4, 2
        weights = torch.rand(n, 4, generator=gen).round(decimals=1)  # rounding makes ties
        selection, values = leave_one_out(weights, s, k)
        every = torch.randn(4, n, c, generator=gen) * 2
        experts = {t: every[t][rows_selecting(selection, t)[0]] for t in range(4) if (selection == t).any()}
        base = torch.randn(n, c, generator=gen)
        labels = torch.randint(0, c, (n,), generator=gen)
        cases.append(GateCase(base, labels, values, gating.slot_logits(selection, experts, c)))
        selections.append(selection)
        expert_logits.append(experts)
    assert calibrate_threshold(cases) == brute_force_threshold(cases, selections, expert_logits)


def test_leave_one_out_never_routes_a_task_to_its_own_expert():
    weights = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.7, 0.1]])
    selection, values = leave_one_out(weights, 2, 2)
    assert selection.tolist() == [[0, 3], [1, 0]]
    assert torch.equal(values, torch.tensor([[0.9, 0.3], [0.8, 0.2]]))
    assert leave_one_out(weights, 0, 9)[0].shape == (2, 3)


def test_a_shut_gate_gives_exactly_theta0s_logits():
    base = torch.randn(5, 3)
    selection, values = top_k_experts(torch.rand(5, 4), 2)
    gated = gate_selection(selection, values, math.inf)
    assert (gated == -1).all()
    assert torch.equal(combine_routed(base, gated, values, {}, "gated"), base)
    half = gate_selection(selection, values, float(values.median()))
    assert torch.equal(half == -1, values <= values.median())
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
    import cl_driver.loop as loop

    reads, step = [], {"i": None}
    real_load, real_cases = loop.load_split, ContinualRun.gate_cases
    real_test, real_base = ContinualRun.test_set, ContinualRun.base_eval

    def spy_load(spec, split, **kw):
        reads.append((step["i"], spec.name, split))
        return real_load(spec, split, **kw)

    def spy_cases(self, store, method, i):
        step["i"] = i
        try:
            return real_cases(self, store, method, i)
        finally:
            step["i"] = None

    def no_test_data_while_calibrating(real):
        def spy(self, j):
            assert step["i"] is None, f"calibration at step {step['i']} read the test set of task {j}"
            return real(self, j)
        return spy

    monkeypatch.setattr(loop, "load_split", spy_load)
    monkeypatch.setattr(ContinualRun, "gate_cases", spy_cases)
    monkeypatch.setattr(ContinualRun, "test_set", no_test_data_while_calibrating(real_test))
    monkeypatch.setattr(ContinualRun, "base_eval", no_test_data_while_calibrating(real_base))
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
    assert len(gates) == T and gates[0] is None  # one task learned: nothing to calibrate on, zero-shot
    matrix, zero = results["matrices"]["condu-model"], results["matrices"]["zero_shot"]
    assert matrix[0][1:] == zero[0][1:]
    # Task-agnostic at the last step, recomputed from the final store with the reference combiner.
    view = ContinualRun(gated_config(data_with_val, tiny_model), out, progress=False)
    store, method = view.open_store("model"), view.config.methods[2]
    recorded = results["gates"][method.name][-1]
    tau = math.inf if recorded is None else recorded
    assert view.gate_threshold(store, method, T - 1) == tau
    experts = [view.load_expert(store, t) for t in range(T)]
    for j in range(T):
        base_logits, feats0, labels = view.base_eval(j)
        dataset, _ = view.test_set(j)
        every = []
        for t, state in enumerate(experts):
            view.runner.activate(("check", t), lambda state=state: state)
            every.append(view.runner.logits(dataset, view.specs[j].class_names, view.specs[j].templates)[0])
        selection, values = view.routes(store, method, T - 1, [j])[j]
        combined = combine_all_experts(base_logits, torch.stack(every), gate_selection(selection, values, tau),
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
