"""A run's state: what its folder has finished, the point a resumed run starts from.

state.json holds one `RunState`, written atomically after every task. It carries its version:
a file of an older version is migrated as it is read (MIGRATIONS), a newer one is refused, and
a damaged one is one line that names the file, the field and the fix.

    version    STATE_VERSION
    config     the config's fingerprint: what a resumed run must share with the interrupted one
    completed  how many tasks are finished (trained, fused, evaluated)
    rows       per method, its accuracy rows so far (row i: % on each task after task i)
    fidelity   per store, per step, each stored task's reconstruction fidelity
    seconds    wall time of each fine-tune, store update and evaluation ("train/individual/1", ...)
    routing    per task-agnostic method, per step, % of each seen task's images routed first to its
               own expert (None: a task not seen yet)
    stores     per store, its sizes on disk after the last step
    gates      per gated method, per step, the calibrated thresholds (None: the expert never joins)
    records    per-step records of a loop extended in code (a subclass, a method of its own), by name:
               kept across resumes, left out of results.json unless its owner puts them there
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import RunConfig
from .results import write_json

STATE_VERSION = 2
START_OVER = "start the run again in a new --out folder"  # the fix when a state cannot be resumed


class RunState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[STATE_VERSION] = STATE_VERSION
    config: dict[str, Any]
    completed: int = Field(0, ge=0)
    rows: dict[str, list[list[float]]]
    fidelity: dict[str, list[list[dict[str, Any]]]] = Field(default_factory=dict)
    seconds: dict[str, float] = Field(default_factory=dict)
    routing: dict[str, list[list[float | None]]] = Field(default_factory=dict)
    stores: dict[str, dict[str, Any]] = Field(default_factory=dict)
    gates: dict[str, list[list[float | None]]] = Field(default_factory=dict)
    records: dict[str, list[Any]] = Field(default_factory=dict)


def config_fingerprint(config: RunConfig) -> dict:
    """What a resumed run must share with the interrupted one."""
    return config.model_dump(mode="json", exclude={"device", "path"})


def new_state(config: RunConfig) -> RunState:
    return RunState(config=config_fingerprint(config), rows={m.name: [] for m in config.methods})


# ---------------------------------------------------------------- versions


VERSION_1_FIELDS = ("version", "config", "completed", "rows", "fidelity", "seconds", "routing", "stores", "gates")


def _from_version_1(data: dict) -> dict:
    """Version 1, the untyped record: the same fields, but `routing`, `stores` and `gates` only where
    the code of its day wrote them, and a subclass's own records beside them (now under `records`)."""
    known = {key: value for key, value in data.items() if key in VERSION_1_FIELDS}
    records = {key: value for key, value in data.items() if key not in VERSION_1_FIELDS}
    return {"routing": {}, "stores": {}, "gates": {}, **known, "records": records, "version": 2}


MIGRATIONS = {1: _from_version_1}  # version n -> a record of version n + 1


def migrated(data: dict, path: Path) -> dict:
    """`data` brought to STATE_VERSION; one line when its version is newer or has no migration."""
    version = data.get("version")
    if type(version) is not int:
        raise ValueError(f"{path}: version: missing or not a whole number ({version!r}); the file is not a run "
                         f"state condu-cl wrote: {START_OVER}")
    if version > STATE_VERSION:
        raise ValueError(f"{path}: version: {version} is newer than this condu-cl reads ({STATE_VERSION}); resume "
                         f"with the condu-cl that wrote it, or {START_OVER}")
    if version < STATE_VERSION and version not in MIGRATIONS:
        raise ValueError(f"{path}: version: {version} is older than this condu-cl migrates (from "
                         f"{min(MIGRATIONS)}); {START_OVER}")
    while version < STATE_VERSION:
        data, version = MIGRATIONS[version](data), version + 1
    return data


# ---------------------------------------------------------------- files


def _field(loc: tuple) -> str:
    """('rows', 'condu-model', 2, 0) -> 'rows.condu-model[2][0]'."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<top level>"


def read_state(path: Path) -> RunState:
    """The state in `path`, migrated to the current version; one line if it cannot be."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not JSON ({err}); the run state is damaged: {START_OVER}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a JSON {type(data).__name__}, not the object of a run state; {START_OVER}")
    try:
        return RunState.model_validate(migrated(data, path))
    except ValidationError as err:
        first = err.errors()[0]
        raise ValueError(f"{path}: {_field(first['loc'])}: {first['msg']}; the run state is damaged: "
                         f"{START_OVER}") from None


def load_state(path: Path, config: RunConfig) -> RunState:
    """The saved state of a run of `config` in `path`, or a new one when there is none."""
    if not path.exists():
        return new_state(config)
    state = read_state(path)
    if state.config != config_fingerprint(config):
        raise ValueError(f"{path}: this run folder was made with another config; "
                         "use a new --out folder, or the same config and --methods to resume")
    return state


def save_state(state: RunState, path: Path) -> None:
    write_json(state.model_dump(mode="json"), path)
