"""The text under the results table: the metrics defined, and what the run's rows show."""

import json
import math

from cl_driver import metrics, results

METHODS = {
    "zero_shot": {"name": "zero_shot", "kind": "zero_shot"},
    "magmax": {"name": "magmax", "kind": "magmax", "scale": 1.0},
    "individual": {"name": "individual", "kind": "individual"},
    "condu-model": {"name": "condu-model", "kind": "condu", "rescaler": "model", "agnostic": False},
    "condu-tensor": {"name": "condu-tensor", "kind": "condu", "rescaler": "tensor", "agnostic": False},
    "condu-model-agnostic": {"name": "condu-model-agnostic", "kind": "condu", "rescaler": "model", "agnostic": True},
}


def row(transfer, average, last):
    return {"transfer": transfer, "average": average, "last": last}


def table(**rows):
    """A results record with the given rows (name=(transfer, average, last)), in that order."""
    return {"summary": {name.replace("_", "-") if name.startswith("condu") else name: row(*values)
                        for name, values in rows.items()},
            "methods": METHODS, "tasks": ["a", "b"], "config_file": "hand-made.yaml"}


def labels_of(record):
    return {name: metrics.method_label(name, record["methods"].get(name)) for name in record["summary"]}


def lines(record):
    return metrics.findings(record, labels_of(record))


FULL = table(zero_shot=(60.04, 50.0, 50.0), magmax=(58.0, 61.06, 66.0), individual=(60.04, 90.0, 95.0),
             condu_model=(58.96, 64.0, 70.0), condu_tensor=(61.2, 62.5, 70.31),
             condu_model_agnostic=(58.96, 51.2, 52.0))


def test_the_definitions_sit_under_the_table():
    text = metrics.summary_table(FULL)
    table_end = text.index("| ConDU task-agnostic, model rescaler |")
    definitions = text.index("Transfer = mean of A on tasks not yet learned")
    assert table_end < definitions
    for words in ("Average = mean of A over all steps and tasks", "Last = mean of A after the last task",
                  "MTIL: Multi-domain Task-Incremental Learning", "A[i, j] the accuracy on task j after learning task i"):
        assert words in text


def test_leaders_exclude_the_upper_bound_and_give_the_margin_over_the_next():
    leaders = lines(FULL)[0]
    # Average: ConDU model 64.0, then ConDU tensor 62.5 (MagMax 61.1 third); individual (90.0) is not ranked
    assert leaders.startswith("Average: ConDU, model rescaler leads with 64.0, 1.5 above ConDU, tensor rescaler (62.5)")
    # Last: the shown values 70.3 and 70.0 -> 0.3, not the unrounded 0.31
    assert "Last: ConDU, tensor rescaler leads with 70.3, 0.3 above ConDU, model rescaler (70.0)" in leaders
    assert "individual experts (the upper bound" in leaders and "90.0" not in leaders


def test_ties_at_the_shown_precision_are_named_together():
    record = table(zero_shot=(50.0, 40.0, 40.0), magmax=(50.0, 55.04, 60.0), condu_model=(50.0, 54.96, 61.0),
                   condu_tensor=(50.0, 52.0, 61.0))
    leaders = lines(record)[0]
    assert "Average: MagMax and ConDU, model rescaler tie at 55.0, 3.0 above ConDU, tensor rescaler (52.0)" in leaders
    assert "Last: ConDU, model rescaler and ConDU, tensor rescaler tie at 61.0, 1.0 above MagMax (60.0)" in leaders
    assert "upper bound" not in leaders  # no individual experts in this run


def test_all_methods_tied():
    record = table(zero_shot=(50.0, 40.0, 40.0), condu_model=(50.0, 40.0, 40.0))
    assert lines(record)[0].startswith("Average: all 2 methods tie at 40.0; Last: all 2 methods tie at 40.0")


def test_transfer_gap_below_and_above_zero_shot():
    transfer = next(line for line in lines(FULL) if line.startswith("Transfer"))
    # rows of one shown value together, in the table's order
    assert transfer.startswith("Transfer against zero-shot's 60.0: ConDU, model rescaler and ConDU task-agnostic, "
                               "model rescaler 59.0 (1.0 below zero-shot); ConDU, tensor rescaler 61.2 (1.2 above "
                               "zero-shot).")


def test_transfer_equal_to_zero_shot_the_same_in_every_row_and_undefined_for_one_task():
    record = table(zero_shot=(60.0, 50.0, 50.0), condu_model=(59.96, 60.0, 60.0))
    assert "Transfer against zero-shot's 60.0: ConDU, model rescaler 60.0 (equal to zero-shot)." in lines(record)[1]
    record = table(zero_shot=(60.0, 50.0, 50.0), condu_model=(58.0, 60.0, 60.0), condu_tensor=(58.04, 61.0, 61.0))
    assert "Transfer against zero-shot's 60.0: every ConDU row 58.0 (2.0 below zero-shot)." in lines(record)[1]
    one_task = table(zero_shot=(math.nan, 50.0, 50.0), condu_model=(math.nan, 60.0, 60.0))
    assert not any(line.startswith("Transfer") for line in lines(one_task))


def test_task_agnostic_row_against_zero_shot_and_its_twin_with_task_identity():
    record = dict(FULL, routing_top1={"condu-model-agnostic": [[90.0, None], [40.0, 70.0]]})
    agnostic = lines(record)[-1]
    assert agnostic.startswith("ConDU task-agnostic, model rescaler (no task identity")
    # Average 51.2: 1.2 above zero-shot (50.0), 12.8 below ConDU model (64.0), not ConDU tensor (62.5)
    assert "Average 51.2 (1.2 above zero-shot, 12.8 below ConDU, model rescaler with task identity)" in agnostic
    assert "Last 52.0 (2.0 above zero-shot, 18.0 below ConDU, model rescaler with task identity)" in agnostic
    assert "own expert first for 55% of that task's test images" in agnostic  # the last step: (40 + 70) / 2


def test_only_the_rows_the_run_has_are_spoken_of():
    record = table(zero_shot=(60.0, 50.0, 50.0), condu_model_agnostic=(58.0, 52.0, 53.0))
    said = lines(record)
    assert said[0].startswith("Average: ConDU task-agnostic, model rescaler leads with 52.0, 2.0 above zero-shot")
    assert said[1].startswith("Transfer against zero-shot's 60.0: ConDU task-agnostic, model rescaler 58.0 (2.0 below")
    assert "with task identity" not in said[2] and "Average 52.0 (2.0 above zero-shot)" in said[2]
    assert "router" not in said[2]  # no routing record, nothing said of it
    assert lines(table(magmax=(50.0, 60.0, 70.0), individual=(50.0, 80.0, 90.0))) == []


def test_results_md_and_report_carry_the_same_text(tmp_path):
    record = dict(FULL, matrices={"condu-model": [[50.0, 40.0], [45.0, 60.0]]},
                  fidelity={}, stores={}, routing_top1={})
    (tmp_path / "results.json").write_text(json.dumps(record))
    printed = results.report(tmp_path)
    page = (tmp_path / "results.md").read_text()
    assert printed in page
    for line in lines(record):
        assert f"- {line}\n" in printed
