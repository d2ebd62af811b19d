"""The run state: a versioned record; version 1 (the untyped record) migrated, newer ones and
damaged files refused in one line that names the file, the field and the fix."""

import json
import shutil

import pytest

from cl_driver.loop import run
from cl_driver.state import STATE_VERSION, RunState, config_fingerprint, new_state, read_state, save_state

from tests.cl_driver.helpers import TASKS

T = len(TASKS)


def version_1(state: dict) -> dict:
    """A state as version 1 wrote it: no `records`, no `gates` unless a method was gated, a
    subclass's own record at the top level."""
    old = {k: v for k, v in state.items() if k not in ("records", "gates")}
    return {**old, "version": 1, "gate_joins": [{"images": 10, "joined": 2}]}


def one_line_error(path, phrase: str) -> str:
    with pytest.raises(ValueError) as caught:
        read_state(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: ") and phrase in message, message
    assert "--out" in message  # the fix
    return message


def test_a_new_state_is_written_and_read_back_field_for_field(tiny_config, tmp_path):
    state = new_state(tiny_config)
    assert state.version == STATE_VERSION and state.completed == 0
    assert state.config == config_fingerprint(tiny_config) and list(state.rows) == [m.name for m in tiny_config.methods]
    state.rows["zero_shot"].append([50.0, 12.5, 100.0])
    state.gates["condu-model"] = [[None, 0.25]]
    state.records["counts"] = [{"n": 1}]
    save_state(state, tmp_path / "state.json")
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved["version"] == STATE_VERSION and list(saved)[:4] == ["version", "config", "completed", "rows"]
    assert read_state(tmp_path / "state.json") == state


def test_a_version_1_state_is_migrated_with_its_own_records(tiny_config, tmp_path):
    state = new_state(tiny_config).model_dump(mode="json")
    (tmp_path / "state.json").write_text(json.dumps(version_1(state)))
    migrated = read_state(tmp_path / "state.json")
    assert isinstance(migrated, RunState) and migrated.version == STATE_VERSION
    assert migrated.gates == {} and migrated.routing == {} and migrated.stores == {}
    assert migrated.records == {"gate_joins": [{"images": 10, "joined": 2}]}
    assert migrated.rows == state["rows"] and migrated.config == state["config"]


def test_a_run_folder_of_version_1_resumes_to_the_same_results(full_run, tiny_config, tmp_path):
    out, results = full_run
    folder = shutil.copytree(out, tmp_path / "run", ignore=shutil.ignore_patterns("results.*", "heatmap-*"))
    state = json.loads((folder / "state.json").read_text())
    # interrupted before its last task's state was saved, as version 1 wrote it
    state["completed"] = T - 1
    for field in ("rows", "fidelity", "routing"):
        state[field] = {name: steps[:T - 1] for name, steps in state[field].items()}
    (folder / "state.json").write_text(json.dumps(version_1(state)))
    resumed = run(tiny_config, folder, progress=False)
    assert resumed["matrices"] == results["matrices"] and resumed["routing_top1"] == results["routing_top1"]
    assert resumed["fidelity"] == results["fidelity"]
    saved = read_state(folder / "state.json")
    assert saved.version == STATE_VERSION and saved.completed == T and saved.records["gate_joins"]


def test_a_newer_state_is_refused_and_left_as_it_is(tiny_config, tmp_path):
    path = tmp_path / "state.json"
    text = json.dumps({**new_state(tiny_config).model_dump(mode="json"), "version": STATE_VERSION + 1})
    path.write_text(text)
    message = one_line_error(path, f"version: {STATE_VERSION + 1} is newer")
    assert "condu-cl that wrote it" in message
    with pytest.raises(ValueError, match="newer"):
        run(tiny_config, tmp_path, progress=False)
    assert path.read_text() == text and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


@pytest.mark.parametrize("damage, phrase", [
    (lambda text: text[:len(text) // 2], "not JSON"),
    (lambda text: "[1, 2]", "a JSON list"),
    (lambda text: text.replace('"version": 2', '"version": "2"'), "version: missing or not a whole number"),
    (lambda text: text.replace('"version": 2', '"version": 0'), "version: 0 is older than"),
    (lambda text: text.replace('"completed": 0', '"completed": -1'), "completed: "),
    (lambda text: text.replace("[50.0, 12.5]", '[50.0, "twelve"]'), "rows.zero_shot[0][1]: "),
    (lambda text: text.replace('"completed": 0', '"completed": 0, "rowz": {}'), "rowz: "),
])
def test_a_damaged_state_is_one_line_naming_the_field(tiny_config, tmp_path, damage, phrase):
    state = new_state(tiny_config)
    state.rows["zero_shot"].append([50.0, 12.5])
    save_state(state, tmp_path / "state.json")
    path = tmp_path / "state.json"
    damaged = damage(json.dumps(state.model_dump(mode="json")))
    assert damaged != json.dumps(state.model_dump(mode="json"))
    path.write_text(damaged)
    one_line_error(path, phrase)
