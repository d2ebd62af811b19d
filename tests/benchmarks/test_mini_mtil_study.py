"""benchmarks.mini_mtil_study: its plan, its one-pass evaluation of every aggregation (equal to the
loop run once per rule), and its report built from the run folders."""

import json
import shutil

import pytest
import torch

import benchmarks.mini_mtil_study as study
from cl_driver.config import parse_config
from cl_driver.loop import run

from tests.cl_driver.helpers import TASKS, build_tiny_clip, tiny_config_dict, write_task_folder


def test_plan_covers_every_width_and_strength_once():
    specs = study.plan()
    ids = [s.id for s in specs] + [c.id for c in study.CLI_RUNS]
    assert len(ids) == len(set(ids))
    grid = [s for s in specs if s.slice == "grid"]
    assert {(s.width, s.lr) for s in grid} == {(w, lr) for w in study.WIDTHS for lr in study.STRENGTHS}
    by_lr = sorted(study.STRENGTHS.items())  # a lower lr never trains for fewer iterations
    assert all(a[1] >= b[1] for a, b in zip(by_lr, by_lr[1:]))


def test_each_run_is_the_full_config_with_its_own_settings():
    base = study.read_yaml(study.BASE_CONFIG)
    for spec in study.plan():
        config = parse_config(study.run_config(spec), base_dir=study.BASE_CONFIG.parent)
        assert config.model.endswith(study.WIDTHS[spec.width])
        assert (config.training.lr, config.training.iterations, config.training.seed) == (spec.lr, spec.iterations,
                                                                                          spec.seed)
        assert config.training.warmup_steps == spec.iterations // 10
        assert config.evaluation.top_k == 4 and config.evaluation.aggregate == "mean"
        assert config.evaluation.max_test == base["evaluation"]["max_test"]
        names = [t.name for t in config.tasks]
        if spec.order == "I":
            assert names == [t["name"] for t in base["tasks"]]
        else:  # the held-out order: the same tasks, another order
            assert sorted(names) == sorted(t["name"] for t in base["tasks"]) and names != [t["name"] for t in base["tasks"]]


def test_slot_weights_of_each_rule():
    selection, values = torch.tensor([[2, 0, 3, 1]]), torch.tensor([[0.9, 0.4, -0.2, 0.1]])
    bars = torch.tensor([0.5, 0.0, 0.3, -1.0])  # per expert: 2 passes (0.9 > 0.3), 0 does not (0.4 <= 0.5), ...
    assert study.slot_weights(selection, values, "mean", 2, bars).tolist() == [[1, 1, 0, 0]]
    assert torch.allclose(study.slot_weights(selection, values, "weighted", 4, bars), torch.tensor([[0.9, 0.4, 0.0, 0.1]]))
    assert study.slot_weights(selection, values, "gated", 4, bars).tolist() == [[1, 0, 1, 1]]


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """The tiny tasks with held-out images, a tiny CLIP, and the study's loop on them."""
    root = tmp_path_factory.mktemp("study")
    model = build_tiny_clip(root / "clip")
    for task in TASKS:
        write_task_folder(root / "data", task, n_val=4)
    raw = tiny_config_dict(root / "data", model, methods=study.METHODS)
    raw["evaluation"]["top_k"] = 4
    out = root / "run"
    study.StudyRun(parse_config(raw, where="tiny.yaml"), out, progress=False).run()
    return root, model, json.loads((out / "results.json").read_text())


def test_one_pass_equals_the_loop_run_once_per_rule(tiny_study):
    root, model, results = tiny_study
    rules = [("mean", 1), ("mean", 2), ("mean", 4), ("weighted", 1), ("weighted", 4), ("gated", 4)]
    methods = [{"kind": "condu", "rescaler": "model", "top_k": k, "aggregate": a, "name": f"{a}{k}"} for a, k in rules]
    plain = run(parse_config(tiny_config_dict(root / "data", model, methods=methods), where="tiny.yaml"),
                root / "plain", progress=False)
    for aggregate, k in rules:
        assert results["matrices"][study.variant_name(aggregate, k)] == plain["matrices"][f"{aggregate}{k}"], (aggregate, k)
    assert results["matrices"][study.CONDU] == plain["matrices"]["mean4"]
    assert results["gates"][study.CONDU] == plain["gates"]["gated4"]
    joins = results["gate_joins"]  # one count a step, of the unseen images only
    assert [j["images"] for j in joins] == [sum(5 * len(TASKS[t]) for t in list(TASKS)[i + 1:]) for i in range(len(TASKS))]


def test_report_is_built_from_the_finished_runs_only(tiny_study, tmp_path, monkeypatch):
    root, _, _ = tiny_study
    monkeypatch.setattr(study, "RUNS_DIR", tmp_path / "runs")
    fake = {"folder": "-", "config": "-", "steps": 1, "minutes": 1.0, "cpu_minutes": 1.0, "final_loss": 1.0,
            "mean_zero_shot": 50.0, "bytes": 1, "command": "-"}
    monkeypatch.setattr(study, "model_records", lambda: {"S": {**fake, "parameters": 1000},
                                                          "M": {**fake, "parameters": 4000}})
    for run_id in ("S-lr1e-04", "M-lr1e-04"):
        shutil.copytree(root / "run", tmp_path / "runs" / run_id)
    jobs = [run_id for run_id, _ in study.pending_jobs(study.plan(), study.CLI_RUNS)]
    assert "M-lr1e-04" not in jobs and "S-lr1e-04" not in jobs and jobs[0].startswith("L-")  # largest first
    record = study.collect({"M-lr1e-04": {"cpu_s": 60.0, "wall_s": 90.0}})
    assert set(record["runs"]) == {"S-lr1e-04", "M-lr1e-04"}
    condu = [r for r in record["rows"] if r["run"] == "M-lr1e-04" and r["method"] == "ConDU"]
    assert sorted((r["aggregation"], r["K"]) for r in condu) == sorted(study.AGGREGATIONS)
    assert all(r["lr"] == 1e-4 and r["iterations"] == 200 and r["width"] == "M" for r in condu)
    assert len([f for f in record["fidelity"] if f["run"] == "M-lr1e-04"]) == len(TASKS)
    assert any(c["claim"].startswith("A larger model") for c in record["claims"])
    study.write_report(record, tmp_path / "results", tmp_path / "no-notes.md")
    text = (tmp_path / "results" / f"{study.NAME}.md").read_text()
    assert "M-lr3e-05" in record["not_run"] and "cli-gated-order2" in record["not_run"]
    assert "M-lr1e-04" not in record["not_run"]
    assert f"Planned but not run ({len(record['not_run'])} of {len(record['not_run']) + 2})" in text
    for r in condu:  # every row's numbers are in the markdown, as the json has them
        assert f"| {r['run']} | ConDU | {r['aggregation']} | {r['K']} |" in text
        assert f"| {study.fmt(r['transfer'])} | {study.fmt(r['average'])} | {study.fmt(r['last'])} |" in text
    assert json.loads((tmp_path / "results" / f"{study.NAME}.json").read_text())["rows"] == record["rows"]
    for plot in ("transfer-vs-last", "fidelity", "gap-vs-k"):
        assert (tmp_path / "results" / f"{study.NAME}-{plot}.png").stat().st_size > 0
