"""The run configuration of `condu-cl run`: one YAML file, validated once, here, by declared models.

Schema (every key but `model`, `tasks` and `methods` has a default)::

    model: PATH_OR_HUB_ID        # theta0: a local CLIP folder, or a hub id org/name[@revision]; a
                                 # relative path is resolved against the config file, then the packaged assets
    device: auto                 # auto | cpu | cuda | cuda:N
    image_size: null             # pixels for builtin tasks (default: the processor's crop size)
    fusion_kernel: null          # reference | cpu | triton; null: fusion picks by device
    data_root: null              # relative source paths start here (default: the config's folder);
                                 # ~ and $VARS expand; `condu-cl run --data-root DIR` overrides it
    tasks_file: mtil_tasks.yaml  # optional: task specs in another YAML file (a list, or {tasks: [...]})
    tasks:                       # the task order; each entry:
      - name: shapes                     # unique, [A-Za-z0-9_.-]
        class_names: [circle, square]    # optional for builtin tasks (taken from the task)
        templates: ["a photo of a {}."]  # each with one "{}"; optional for builtin tasks
        source: {kind: builtin, task: shapes}
        # or  source: {kind: folder, path: DIR}   DIR/train/<class>/*, DIR/test/<class>/*
        # or  source: {kind: folder, train: DIR, test: DIR}
        # or  source: {kind: hf_disk, path: DIR, image_column: image, label_column: label,
        #              train_split: train, test_split: test}   (datasets.save_to_disk output)
        # folder classes are matched to class_names by sub-folder name, or taken in sorted order
        max_train: null                  # optional caps on images per split (a seeded subset)
        max_test: null
        lr: null                         # optional per-task overrides of `training`
        iterations: null
    task_order: [b, a]           # optional: run these tasks (of tasks_file and tasks), in this order
    task_overrides:              # optional: per task name, the same overrides as in a task entry
      a: {lr: 5.0e-5}
    training:
      iterations: 1000
      batch_size: 64             # the global batch: split across processes under a launcher
      lr: 1.0e-5
      weight_decay: 0.0
      warmup_steps: 100
      label_smoothing: 0.2
      train_part: whole          # whole | image | text | lora
      lora: {rank: 64, init_std: 0.01}   # train_part lora: the MLP linears of both towers
      shots: null                # N: train on N images per class (a seeded choice), few-shot
      train_template: 0          # which template builds the class texts while training
      seed: 0
      num_workers: 0
      mixed_precision: "no"      # no | fp16 | bf16 (accelerate)
    evaluation:
      batch_size: 128
      top_k: 4                   # experts routed to, besides theta0
      aggregate: mean            # mean (the official rule) | weighted (by prototype similarity) | gated
      cache_size: 4              # decoupled experts kept in memory (LRU)
      max_test: null             # cap on test images per task, for every task
      pixel_cache: false         # keep large test sets as uint8 pixels on disk (run/pixels/), decoded once
    methods:                     # a name, or a mapping with `kind` and options
      - zero_shot
      - sequential               # each task starts from the previous model
      - {kind: task_arithmetic, alpha: 0.3}
      - {kind: magmax, scale: 1.0}
      - individual               # one fine-tune per task, with task identity (upper bound)
      - {kind: condu, rescaler: model}            # name defaults to condu-model
      - {kind: condu, rescaler: tensor, agnostic: true, top_k: 4, aggregate: mean}

Method names must be unique; `condu-cl run --methods a,b` selects by name. A mistake is one
`ValueError` line: `FILE: FIELD: what is wrong; the fix`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, ValidationError,
                      field_validator, model_validator)

from fusion import KERNELS, RESCALER_MODES

SOURCE_KINDS = ("folder", "hf_disk", "builtin")
TRAIN_PARTS = ("whole", "image", "text", "lora")
AGGREGATES = ("mean", "weighted", "gated")  # gated: cl_driver/gating.py
METHOD_KINDS = ("zero_shot", "sequential", "task_arithmetic", "magmax", "individual", "condu")
NAME_RULE = "use letters, digits, '_', '.', '-'"


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):  # YAML's yes/no would otherwise count as 1/0
        raise ValueError(f"expected a number, got {value}")
    return value


Int = Annotated[int, BeforeValidator(_no_bool)]
Float = Annotated[float, BeforeValidator(_no_bool)]
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]+$")]


class _Section(BaseModel):
    """A mapping with known keys only; frozen, so a config is a value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            extra = sorted(set(data) - set(cls.model_fields))
            if extra:
                raise ValueError(f"unknown keys {extra}; allowed: {sorted(cls.model_fields)}")
        return data

    def replace(self, **changes):
        """A copy with `changes`, validated like the original."""
        return type(self).model_validate({**self.model_dump(), **changes})


class LoraSettings(_Section):
    rank: Int = Field(64, ge=1)
    init_std: Float = Field(0.01, gt=0)  # both factors start as N(0, init_std^2), shared by all tasks


class TrainingConfig(_Section):
    iterations: Int = Field(1000, ge=1)
    batch_size: Int = Field(64, ge=1)
    lr: Float = Field(1e-5, ge=0)
    weight_decay: Float = Field(0.0, ge=0)
    warmup_steps: Int = Field(100, ge=0)
    label_smoothing: Float = Field(0.2, ge=0)
    train_part: Literal[TRAIN_PARTS] = "whole"
    lora: LoraSettings = LoraSettings()
    shots: Int | None = Field(None, ge=1)
    train_template: Int = Field(0, ge=0)
    seed: Int = 0
    num_workers: Int = Field(0, ge=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # a bare `no` in YAML 1.1 reads as false


class EvaluationConfig(_Section):
    batch_size: Int = Field(128, ge=1)
    top_k: Int = Field(4, ge=1)
    aggregate: Literal[AGGREGATES] = "mean"
    cache_size: Int = Field(4, ge=1)
    max_test: Int | None = Field(None, ge=1)
    pixel_cache: bool = False


class FolderSource(_Section):
    kind: Literal["folder"]
    path: str | None = None
    train: str | None = None
    test: str | None = None

    @model_validator(mode="after")
    def _complete(self):
        if not (self.path or (self.train and self.test)):
            raise ValueError("a folder source needs `path` (with train/ and test/) or both `train` and `test`")
        return self


class HfDiskSource(_Section):
    kind: Literal["hf_disk"]
    path: str = Field(description="the folder that datasets.save_to_disk wrote")
    image_column: str = "image"
    label_column: str = "label"
    train_split: str = "train"
    test_split: str = "test"


class BuiltinSource(_Section):
    kind: Literal["builtin"]
    task: str = Field(min_length=1)


Source = Annotated[Union[FolderSource, HfDiskSource, BuiltinSource], Field(discriminator="kind")]
_OVERRIDES = ("max_train", "max_test", "lr", "iterations")


class TaskOverrides(_Section):
    max_train: Int | None = Field(None, ge=1)
    max_test: Int | None = Field(None, ge=1)
    lr: Float | None = Field(None, ge=0)
    iterations: Int | None = Field(None, ge=1)


class TaskConfig(TaskOverrides):
    name: Name
    source: Source
    class_names: tuple[str, ...] | None = Field(None, min_length=1)
    templates: tuple[str, ...] | None = Field(None, min_length=1)

    @field_validator("templates")
    @classmethod
    def _one_slot(cls, templates):
        if templates and any(t.count("{}") != 1 for t in templates):
            raise ValueError("each template needs exactly one '{}' for the class name")
        return templates

    @model_validator(mode="after")
    def _texts_given(self):
        if self.source.kind != "builtin" and (self.class_names is None or self.templates is None):
            raise ValueError(f"task {self.name!r} needs class_names and templates (only builtin tasks bring their own)")
        return self

    @property
    def source_dict(self) -> dict:
        return self.source.model_dump()


def default_method_name(data: dict) -> str:
    """zero_shot, ..., condu-<rescaler>[-agnostic]."""
    if data.get("kind") != "condu":
        return str(data.get("kind"))
    name = f"condu-{data.get('rescaler', 'model')}"
    return f"{name}-agnostic" if data.get("agnostic") else name


class MethodConfig(_Section):
    name: Name
    kind: Literal[METHOD_KINDS]
    alpha: Float = 0.3  # task_arithmetic
    scale: Float = 1.0  # magmax
    rescaler: Literal[RESCALER_MODES] = "model"  # condu
    agnostic: bool = False  # condu: route every task, seen or not
    top_k: Int | None = Field(None, ge=1)  # condu: overrides evaluation.top_k
    aggregate: Literal[AGGREGATES] | None = None  # condu: overrides evaluation.aggregate

    @model_validator(mode="before")
    @classmethod
    def _named(cls, data: Any) -> Any:
        data = {"kind": data} if isinstance(data, str) else data
        if isinstance(data, dict) and "name" not in data:
            data = {**data, "name": default_method_name(data)}
        return data


class RunConfig(_Section):
    model: str = Field(description="theta0 as a local CLIP folder or a hub id")
    tasks: tuple[TaskConfig, ...] = Field(min_length=1)
    methods: tuple[MethodConfig, ...] = Field(min_length=1)
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    device: str = "auto"
    image_size: Int | None = Field(None, ge=1)
    fusion_kernel: Literal[KERNELS] | None = None
    path: str = "<config>"  # the file it came from, for messages

    @field_validator("tasks", "methods")
    @classmethod
    def _unique_names(cls, entries):
        names = [e.name for e in entries]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"duplicate names {repeated}; give each entry its own `name`")
        return entries

    def task_training(self, task: TaskConfig) -> TrainingConfig:
        """The training settings of one task, with its overrides applied."""
        overrides = {k: getattr(task, k) for k in ("lr", "iterations") if getattr(task, k) is not None}
        return self.training.replace(**overrides) if overrides else self.training

    def with_evaluation(self, **overrides) -> "RunConfig":
        """Override evaluation settings (None keeps the config's value)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return self.model_copy(update={"evaluation": self.evaluation.replace(**given)}) if given else self

    def select_methods(self, names: list[str] | None) -> "RunConfig":
        """Keep only the named methods (in the config's order)."""
        if not names:
            return self
        known = [m.name for m in self.methods]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"{self.path}: methods: unknown {unknown}; the config defines {known}")
        return self.model_copy(update={"methods": tuple(m for m in self.methods if m.name in names)})


class ConfigFile(_Section):
    """The YAML file as written: RunConfig's keys plus how its tasks are gathered and where
    their data lives."""

    model: str = Field(description="theta0 as a local CLIP folder or a hub id")
    tasks: list[Any] = []
    tasks_file: str | None = None
    task_order: list[Name] | None = Field(None, min_length=1)
    task_overrides: dict[str, TaskOverrides] = {}
    data_root: str | None = None
    methods: list[Any] = Field(min_length=1, description=f"list at least one method of {', '.join(METHOD_KINDS)}")
    training: dict | None = None
    evaluation: dict | None = None
    device: str = "auto"
    image_size: Any = None
    fusion_kernel: Any = None


# ---------------------------------------------------------------- errors


def _field_path(loc: tuple) -> str:
    """('tasks', 0, 'source', 'builtin', 'task') -> 'tasks[0].source.task' (union tags dropped)."""
    text = ""
    for i, part in enumerate(loc):
        if i and loc[i - 1] == "source" and part in SOURCE_KINDS:
            continue
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<top level>"


def _message(error: dict) -> str:
    kind, message = error["type"], error["msg"].removeprefix("Value error, ")
    if kind == "missing":
        return "missing; " + _hint(error["loc"])
    if kind in ("string_pattern_mismatch",):
        return f"{error['input']!r} is not a name; {NAME_RULE}"
    if kind == "union_tag_invalid":
        return f"{error['ctx']['tag']!r} is not one of {', '.join(SOURCE_KINDS)}"
    if kind == "union_tag_not_found":
        return f"needs `kind`, one of {', '.join(SOURCE_KINDS)}"
    if kind.endswith("_type") or kind.endswith("_parsing") or kind in ("literal_error", "int_from_float",
                                                                        "greater_than_equal", "greater_than"):
        return f"{message}, got {error['input']!r}"
    return message


def _hint(loc: tuple) -> str:
    hints = {
        "model": "give theta0 as a local CLIP folder or a hub id (org/name)",
        "methods": f"list at least one method of {', '.join(METHOD_KINDS)}",
        "task": "a builtin source needs the task's name, e.g. {kind: builtin, task: NAME}",
        "path": "an hf_disk source needs the folder that datasets.save_to_disk wrote",
        "name": "give the entry a `name`",
        "source": "give the task a source: {kind: builtin|folder|hf_disk, ...}",
    }
    return hints.get(str(loc[-1]) if loc else "", "add it")


def one_line(where: str, err: ValidationError, prefix: tuple = ()) -> ValueError:
    """The first problem of a pydantic error as `FILE: FIELD: message`."""
    first = err.errors()[0]
    return ValueError(f"{where}: {_field_path(prefix + tuple(first['loc']))}: {_message(first)}")


def validated(model, data: Any, where: str, prefix: tuple = ()):
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise one_line(where, err, prefix) from None


# ---------------------------------------------------------------- files


def _read_yaml(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err.__class__.__name__}); fix the syntax") from None


def _resolve_model(model: str, base_dir: Path) -> str:
    """A relative local path is taken from the config's folder, then from the packaged assets."""
    for root in (base_dir, Path(__file__).parent / "assets", Path(__file__).parent):
        candidate = root / model
        if not os.path.isabs(model) and candidate.exists():
            return str(candidate.resolve())
    return model  # an absolute path or a hub id


def _expand(path: str | os.PathLike) -> str:
    return os.path.expanduser(os.path.expandvars(str(path)))


def _resolve_source_paths(source: dict, data_root: Path) -> dict:
    resolved = dict(source)
    for key in ("path", "train", "test"):
        if resolved.get(key) and source["kind"] != "builtin":
            resolved[key] = str((data_root / _expand(resolved[key])).resolve())
    return resolved


def _task_entries(where: str, raw: ConfigFile, base_dir: Path) -> list:
    entries = list(raw.tasks)
    if raw.tasks_file:
        tasks_path = base_dir / raw.tasks_file
        if not tasks_path.exists():
            raise ValueError(f"{where}: tasks_file: {tasks_path} does not exist; give a path relative to the config")
        loaded = _read_yaml(tasks_path)
        entries = list(loaded.get("tasks", []) if isinstance(loaded, dict) else loaded or []) + entries
    if not entries:
        raise ValueError(f"{where}: tasks: no tasks; list them under `tasks:` or point `tasks_file:` at a list")
    return entries


def _ordered(where: str, entries: list, order: list[str] | None) -> list:
    """The task entries named by `task_order`, in its order (all of them, as listed, without it)."""
    if order is None:
        return entries
    by_name = {e.get("name"): e for e in entries if isinstance(e, dict)}
    for i, name in enumerate(order):
        if name not in by_name:
            raise ValueError(f"{where}: task_order[{i}]: no task {name!r}; choose from {', '.join(map(str, by_name))}")
    return [by_name[name] for name in order]


def _with_overrides(where: str, entries: list, overrides: dict[str, TaskOverrides]) -> list:
    names = [e.get("name") for e in entries if isinstance(e, dict)]
    for name, given in overrides.items():
        if name not in names:
            raise ValueError(f"{where}: task_overrides.{name}: no such task; choose from {', '.join(map(str, names))}")
    return [{**e, **overrides[e["name"]].model_dump(exclude_none=True)}
            if isinstance(e, dict) and e.get("name") in overrides else e for e in entries]


def parse_config(data: Any, *, where: str = "<config>", base_dir: str | os.PathLike = ".",
                 data_root: str | os.PathLike | None = None) -> RunConfig:
    """Validate a config mapping (already parsed from YAML) into a RunConfig.

    `data_root` (a command-line override) replaces the config's own `data_root`.
    """
    base_dir = Path(base_dir)
    if not isinstance(data, dict):
        raise ValueError(f"{where}: <top level>: expected a mapping of settings, got {type(data).__name__}")
    raw = validated(ConfigFile, data, where)
    entries = _with_overrides(where, _ordered(where, _task_entries(where, raw, base_dir), raw.task_order),
                              raw.task_overrides)
    settings = {k: v for k, v in raw.model_dump(include=set(RunConfig.model_fields)).items() if v is not None}
    config = validated(RunConfig, {**settings, "tasks": entries, "path": where}, where)
    root = Path(_expand(data_root)) if data_root else base_dir / _expand(raw.data_root or ".")
    tasks = tuple(t.model_copy(update={"source": type(t.source).model_validate(
        _resolve_source_paths(t.source_dict, root))}) for t in config.tasks)
    return config.model_copy(update={"tasks": tasks, "model": _resolve_model(config.model, base_dir)})


def load_config(path: str | os.PathLike, *, data_root: str | os.PathLike | None = None) -> RunConfig:
    """Read and validate a run config YAML file; relative paths in it are relative to the file.

    A name without a folder that is not a file here (`mtil`, `mini_mtil_quick.yaml`) is looked
    up among the configs shipped in cl_driver/configs/.
    """
    path = Path(path)
    if not path.exists() and path.parent == Path("."):
        shipped = packaged_config(path.name if path.suffix else f"{path.name}.yaml")
        path = shipped if shipped.exists() else path
    if not path.exists():
        raise ValueError(f"{path}: no such config file; give the path to a run YAML or a shipped name (mtil)")
    return parse_config(_read_yaml(path), where=str(path), base_dir=path.parent, data_root=data_root)


def packaged_config(name: str) -> Path:
    """The path of a config shipped in cl_driver/configs/."""
    return Path(__file__).parent / "configs" / name
