"""The run configuration of `condu-cl run`: one YAML file, validated once, here.

Schema (every key but `model`, `tasks` and `methods` has a default)::

    model: PATH_OR_HUB_ID        # theta0: a local CLIP folder or a hub id; a relative path is
                                 # resolved against the config file, then the packaged assets
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
    training:
      iterations: 1000
      batch_size: 64
      lr: 1.0e-5
      weight_decay: 0.0
      warmup_steps: 100
      label_smoothing: 0.2
      train_part: whole          # whole | image | text
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

Method names must be unique; `condu-cl run --methods a,b` selects by name.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

SOURCE_KINDS = ("folder", "hf_disk", "builtin")
TRAIN_PARTS = ("whole", "image", "text")
AGGREGATES = ("mean", "weighted", "gated")  # gated: cl_driver/gating.py
METHOD_KINDS = ("zero_shot", "sequential", "task_arithmetic", "magmax", "individual", "condu")
RESCALERS = ("model", "tensor-mean", "tensor")
FUSION_KERNELS = ("reference", "cpu", "triton")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class TrainingConfig:
    iterations: int = 1000
    batch_size: int = 64
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 100
    label_smoothing: float = 0.2
    train_part: str = "whole"
    train_template: int = 0
    seed: int = 0
    num_workers: int = 0
    mixed_precision: str = "no"


@dataclass(frozen=True)
class EvaluationConfig:
    batch_size: int = 128
    top_k: int = 4
    aggregate: str = "mean"
    cache_size: int = 4
    max_test: int | None = None
    pixel_cache: bool = False


@dataclass(frozen=True)
class TaskConfig:
    name: str
    source: dict
    class_names: tuple[str, ...] | None = None
    templates: tuple[str, ...] | None = None
    max_train: int | None = None
    max_test: int | None = None
    lr: float | None = None
    iterations: int | None = None


@dataclass(frozen=True)
class MethodConfig:
    name: str
    kind: str
    alpha: float = 0.3  # task_arithmetic
    scale: float = 1.0  # magmax
    rescaler: str = "model"  # condu
    agnostic: bool = False  # condu: route every task, seen or not
    top_k: int | None = None  # condu: overrides evaluation.top_k
    aggregate: str | None = None  # condu: overrides evaluation.aggregate


@dataclass(frozen=True)
class RunConfig:
    model: str
    tasks: tuple[TaskConfig, ...]
    methods: tuple[MethodConfig, ...]
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    device: str = "auto"
    image_size: int | None = None
    fusion_kernel: str | None = None
    path: str = "<config>"  # the file it came from, for messages

    def task_training(self, task: TaskConfig) -> TrainingConfig:
        """The training settings of one task, with its overrides applied."""
        overrides = {k: getattr(task, k) for k in ("lr", "iterations") if getattr(task, k) is not None}
        return replace(self.training, **overrides)

    def with_evaluation(self, **overrides) -> "RunConfig":
        """Override evaluation settings (None keeps the config's value)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return replace(self, evaluation=replace(self.evaluation, **given)) if given else self

    def select_methods(self, names: list[str] | None) -> "RunConfig":
        """Keep only the named methods (in the config's order)."""
        if not names:
            return self
        known = [m.name for m in self.methods]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"{self.path}: methods: unknown {unknown}; the config defines {known}")
        return replace(self, methods=tuple(m for m in self.methods if m.name in names))


# ---------------------------------------------------------------- validation helpers


def _fail(where: str, fieldname: str, message: str) -> ValueError:
    return ValueError(f"{where}: {fieldname}: {message}")


def _check_keys(where: str, fieldname: str, data: dict, allowed) -> None:
    extra = sorted(set(data) - set(allowed))
    if extra:
        raise _fail(where, fieldname, f"unknown keys {extra}; allowed: {sorted(allowed)}")


def _number(where, fieldname, value, kind, *, minimum=None, optional=False):
    """Check a number (YAML may give '1e-5' as a string) and convert it to `kind`."""
    if value is None and optional:
        return None
    try:
        if isinstance(value, bool) or value is None:
            raise TypeError
        number = kind(float(value)) if kind is float else kind(value)
        if kind is int and float(value) != number:
            raise TypeError
    except (TypeError, ValueError):
        raise _fail(where, fieldname, f"expected a {kind.__name__}, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise _fail(where, fieldname, f"must be >= {minimum}, got {number}")
    return number


def _flag(where, fieldname, value) -> bool:
    if not isinstance(value, bool):
        raise _fail(where, fieldname, f"expected true or false, got {value!r}")
    return value


def _choice(where, fieldname, value, choices):
    if value not in choices:
        raise _fail(where, fieldname, f"{value!r} is not one of {', '.join(choices)}")
    return value


def _mapping(where, fieldname, value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(where, fieldname, f"expected a mapping, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------- sections


def parse_training(where: str, data: Any) -> TrainingConfig:
    data = _mapping(where, "training", data)
    _check_keys(where, "training", data, TrainingConfig.__dataclass_fields__)
    d = TrainingConfig()
    return TrainingConfig(
        iterations=_number(where, "training.iterations", data.get("iterations", d.iterations), int, minimum=1),
        batch_size=_number(where, "training.batch_size", data.get("batch_size", d.batch_size), int, minimum=1),
        lr=_number(where, "training.lr", data.get("lr", d.lr), float, minimum=0.0),
        weight_decay=_number(where, "training.weight_decay", data.get("weight_decay", d.weight_decay), float, minimum=0.0),
        warmup_steps=_number(where, "training.warmup_steps", data.get("warmup_steps", d.warmup_steps), int, minimum=0),
        label_smoothing=_number(where, "training.label_smoothing", data.get("label_smoothing", d.label_smoothing),
                                float, minimum=0.0),
        train_part=_choice(where, "training.train_part", data.get("train_part", d.train_part), TRAIN_PARTS),
        train_template=_number(where, "training.train_template", data.get("train_template", d.train_template), int,
                               minimum=0),
        seed=_number(where, "training.seed", data.get("seed", d.seed), int),
        num_workers=_number(where, "training.num_workers", data.get("num_workers", d.num_workers), int, minimum=0),
        mixed_precision=_choice(where, "training.mixed_precision", str(data.get("mixed_precision", "no")),
                                ("no", "fp16", "bf16")),
    )


def parse_evaluation(where: str, data: Any) -> EvaluationConfig:
    data = _mapping(where, "evaluation", data)
    _check_keys(where, "evaluation", data, EvaluationConfig.__dataclass_fields__)
    d = EvaluationConfig()
    return EvaluationConfig(
        batch_size=_number(where, "evaluation.batch_size", data.get("batch_size", d.batch_size), int, minimum=1),
        top_k=_number(where, "evaluation.top_k", data.get("top_k", d.top_k), int, minimum=1),
        aggregate=_choice(where, "evaluation.aggregate", data.get("aggregate", d.aggregate), AGGREGATES),
        cache_size=_number(where, "evaluation.cache_size", data.get("cache_size", d.cache_size), int, minimum=1),
        max_test=_number(where, "evaluation.max_test", data.get("max_test"), int, minimum=1, optional=True),
        pixel_cache=_flag(where, "evaluation.pixel_cache", data.get("pixel_cache", False)),
    )


def _parse_source(where: str, fieldname: str, source: Any) -> dict:
    source = _mapping(where, fieldname, source)
    kind = _choice(where, f"{fieldname}.kind", source.get("kind"), SOURCE_KINDS)
    allowed = {
        "folder": {"kind", "path", "train", "test"},
        "hf_disk": {"kind", "path", "image_column", "label_column", "train_split", "test_split"},
        "builtin": {"kind", "task"},
    }[kind]
    _check_keys(where, fieldname, source, allowed)
    if kind == "builtin" and not source.get("task"):
        raise _fail(where, f"{fieldname}.task", "a builtin source needs the task's name, e.g. {kind: builtin, task: NAME}")
    if kind == "hf_disk" and not source.get("path"):
        raise _fail(where, f"{fieldname}.path", "an hf_disk source needs the folder that datasets.save_to_disk wrote")
    if kind == "folder" and not (source.get("path") or (source.get("train") and source.get("test"))):
        raise _fail(where, fieldname, "a folder source needs `path` (with train/ and test/) or both `train` and `test`")
    return dict(source)


def _string_list(where: str, fieldname: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise _fail(where, fieldname, "expected a non-empty list of strings")
    return tuple(value)


def parse_task(where: str, index: int, data: Any) -> TaskConfig:
    prefix = f"tasks[{index}]"
    data = _mapping(where, prefix, data)
    _check_keys(where, prefix, data, TaskConfig.__dataclass_fields__)
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise _fail(where, f"{prefix}.name", f"{name!r} is not a name; use letters, digits, '_', '.', '-'")
    source = _parse_source(where, f"{prefix}.source", data.get("source"))
    class_names = _string_list(where, f"{prefix}.class_names", data.get("class_names"))
    templates = _string_list(where, f"{prefix}.templates", data.get("templates"))
    if source["kind"] != "builtin" and (class_names is None or templates is None):
        raise _fail(where, prefix, f"task {name!r} needs class_names and templates (only builtin tasks bring their own)")
    if templates and any(t.count("{}") != 1 for t in templates):
        raise _fail(where, f"{prefix}.templates", "each template needs exactly one '{}' for the class name")
    return TaskConfig(
        name=name, source=source, class_names=class_names, templates=templates,
        max_train=_number(where, f"{prefix}.max_train", data.get("max_train"), int, minimum=1, optional=True),
        max_test=_number(where, f"{prefix}.max_test", data.get("max_test"), int, minimum=1, optional=True),
        lr=_number(where, f"{prefix}.lr", data.get("lr"), float, minimum=0.0, optional=True),
        iterations=_number(where, f"{prefix}.iterations", data.get("iterations"), int, minimum=1, optional=True),
    )


def _default_method_name(kind: str, data: dict) -> str:
    if kind != "condu":
        return kind
    name = f"condu-{data.get('rescaler', 'model')}"
    return f"{name}-agnostic" if data.get("agnostic") else name


def parse_method(where: str, index: int, data: Any) -> MethodConfig:
    prefix = f"methods[{index}]"
    data = {"kind": data} if isinstance(data, str) else _mapping(where, prefix, data)
    _check_keys(where, prefix, data, MethodConfig.__dataclass_fields__)
    kind = _choice(where, f"{prefix}.kind", data.get("kind"), METHOD_KINDS)
    d = MethodConfig(name="", kind=kind)
    name = data.get("name", _default_method_name(kind, data))
    if not isinstance(name, str) or not _NAME.match(name):
        raise _fail(where, f"{prefix}.name", f"{name!r} is not a name; use letters, digits, '_', '.', '-'")
    return MethodConfig(
        name=name, kind=kind,
        alpha=_number(where, f"{prefix}.alpha", data.get("alpha", d.alpha), float),
        scale=_number(where, f"{prefix}.scale", data.get("scale", d.scale), float),
        rescaler=_choice(where, f"{prefix}.rescaler", data.get("rescaler", d.rescaler), RESCALERS),
        agnostic=_flag(where, f"{prefix}.agnostic", data.get("agnostic", False)),
        top_k=_number(where, f"{prefix}.top_k", data.get("top_k"), int, minimum=1, optional=True),
        aggregate=None if data.get("aggregate") is None else _choice(where, f"{prefix}.aggregate",
                                                                      data["aggregate"], AGGREGATES),
    )


def _unique(where: str, fieldname: str, names: list[str]) -> None:
    seen = {n for n in names if names.count(n) > 1}
    if seen:
        raise _fail(where, fieldname, f"duplicate names {sorted(seen)}; give each entry its own `name`")


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
        if key in resolved and source["kind"] != "builtin":
            resolved[key] = str((data_root / _expand(resolved[key])).resolve())
    return resolved


def _task_entries(where: str, data: dict, base_dir: Path) -> list:
    entries = list(data.get("tasks") or [])
    if data.get("tasks_file"):
        tasks_path = base_dir / data["tasks_file"]
        if not tasks_path.exists():
            raise _fail(where, "tasks_file", f"{tasks_path} does not exist; give a path relative to the config")
        loaded = _read_yaml(tasks_path)
        entries = list(loaded.get("tasks", []) if isinstance(loaded, dict) else loaded or []) + entries
    if not entries:
        raise _fail(where, "tasks", "no tasks; list them under `tasks:` or point `tasks_file:` at a list")
    return entries


def parse_config(data: Any, *, where: str = "<config>", base_dir: str | os.PathLike = ".",
                 data_root: str | os.PathLike | None = None) -> RunConfig:
    """Validate a config mapping (already parsed from YAML) into a RunConfig.

    `data_root` (a command-line override) replaces the config's own `data_root`.
    """
    base_dir = Path(base_dir)
    data = _mapping(where, "<top level>", data)
    _check_keys(where, "<top level>", data, set(RunConfig.__dataclass_fields__) - {"path"} | {"tasks_file", "data_root"})
    if not isinstance(data.get("model"), str):
        raise _fail(where, "model", "give theta0 as a local CLIP folder or a hub id")
    tasks = tuple(parse_task(where, i, t) for i, t in enumerate(_task_entries(where, data, base_dir)))
    root = Path(_expand(data_root)) if data_root else base_dir / _expand(data.get("data_root") or ".")
    tasks = tuple(replace(t, source=_resolve_source_paths(t.source, root)) for t in tasks)
    _unique(where, "tasks", [t.name for t in tasks])
    methods = data.get("methods")
    if not isinstance(methods, list) or not methods:
        raise _fail(where, "methods", f"list at least one method of {', '.join(METHOD_KINDS)}")
    methods = tuple(parse_method(where, i, m) for i, m in enumerate(methods))
    _unique(where, "methods", [m.name for m in methods])
    return RunConfig(
        model=_resolve_model(data["model"], base_dir), tasks=tasks, methods=methods,
        training=parse_training(where, data.get("training")),
        evaluation=parse_evaluation(where, data.get("evaluation")),
        device=str(data.get("device", "auto")),
        image_size=_number(where, "image_size", data.get("image_size"), int, minimum=1, optional=True),
        fusion_kernel=None if data.get("fusion_kernel") is None else _choice(
            where, "fusion_kernel", data["fusion_kernel"], FUSION_KERNELS),
        path=where,
    )


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
