"""The run configuration of `condu-cl run`: one YAML file, validated once, here, by declared models.

docs/config.md lists every key with its type, default and meaning; it is generated from the
models below (`python -m cl_driver.config_doc > docs/config.md`, checked by a test). A small
config of one's own image folders::

    model: openai/clip-vit-base-patch16
    tasks:
      - {name: myshapes, source: {kind: folder, path: myshapes, split: {test: 0.2, val: 0.1}}}
      - {name: mycolors, source: {kind: folder, path: mycolors, split: {test: 0.2, val: 0.1}}}
    training: {iterations: 100, batch_size: 16}
    methods: [zero_shot, individual, {kind: condu, rescaler: model}]

Class names come from the class folders' names when a task gives none, with DEFAULT_TEMPLATES;
`split` cuts one folder of class sub-folders into train/test/val (data.py). A mistake is one
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
METHOD_KINDS = ("zero_shot", "sequential", "task_arithmetic", "magmax", "individual", "condu", "continual_ties",
                "opcm", "zscl")
TIES_MERGES = ("sum", "mean")
REFERENCE_KINDS = ("mini", "folder")
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
    """`training.train_part: lora`: LoRA on the MLP linears (mlp.fc1, mlp.fc2) of both towers."""

    rank: Int = Field(64, ge=1, description="the rank of every adapter")
    init_std: Float = Field(0.01, gt=0, description="both factors start as N(0, init_std^2), drawn once and "
                                                     "shared by all tasks")


class TrainingConfig(_Section):
    """How each task is fine-tuned from theta0 (AdamW, cosine schedule with warmup)."""

    iterations: Int = Field(1000, ge=1, description="optimizer steps per task")
    batch_size: Int = Field(64, ge=1, description="the global batch: split across processes under a launcher")
    lr: Float = Field(1e-5, ge=0, description="peak learning rate")
    weight_decay: Float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_steps: Int = Field(100, ge=0, description="linear warmup before the cosine decay")
    label_smoothing: Float = Field(0.2, ge=0, description="of the cross-entropy over the task's classes")
    train_part: Literal[TRAIN_PARTS] = Field("whole", description="what trains: the whole model, one tower, or "
                                                                  "LoRA adapters (`lora`)")
    lora: LoraSettings = Field(LoraSettings(), description="[LoRA settings](#training-lora), for `train_part: lora`")
    shots: Int | None = Field(None, ge=1, description="N: train on N images per class (a seeded choice), few-shot; "
                                                      "null: every training image")
    train_template: Int = Field(0, ge=0, description="which of the task's templates builds the class texts "
                                                     "while training")
    seed: Int = Field(0, description="seeds training, subsets and few-shot choices")
    num_workers: Int = Field(0, ge=0, description="DataLoader worker processes")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="accelerate's mixed precision")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # a bare `no` in YAML 1.1 reads as false


class EvaluationConfig(_Section):
    """How every method is evaluated after each task."""

    batch_size: Int = Field(128, ge=1, description="images per forward pass")
    top_k: Int = Field(4, ge=1, description="experts routed to, besides theta0 (`condu-cl run --top-k`)")
    aggregate: Literal[AGGREGATES] = Field("mean", description="routed logits: the plain mean (the paper's rule), "
                                                               "weighted by prototype similarity, or gated "
                                                               "(`condu-cl run --aggregate`)")
    cache_size: Int = Field(4, ge=1, description="decoupled experts kept in memory (least recently used goes)")
    max_test: Int | None = Field(None, ge=1, description="cap on test images per task, for every task "
                                                         "(a seeded subset)")
    pixel_cache: bool = Field(False, description="keep large test sets as uint8 pixels on disk (RUN/pixels/), "
                                                 "decoded once")


class SplitSettings(_Section):
    """A folder source's own train/test/val split: each class's images are shuffled with the seed and
    cut by these fractions (the rest trains); every class keeps at least one training image. The
    split is a function of the file names and the seed, and a run records the one it used
    (RUN/splits/TASK.json) so that a resumed run reads the same."""

    test: Float = Field(gt=0, lt=1, description="share of each class's images held out for testing")
    val: Float = Field(0.0, ge=0, lt=1, description="share held out for validation (the `gated` aggregate "
                                                    "calibrates on it)")
    seed: Int = Field(0, description="the shuffle's seed")

    @model_validator(mode="after")
    def _room_to_train(self):
        if self.test + self.val >= 1:
            raise ValueError(f"test + val is {self.test + self.val:g}; leave a share to train (below 1)")
        return self


class FolderSource(_Section):
    """Image folders, one sub-folder per class. Three layouts: `path` with train/ and test/ (and
    val/) inside; `train` and `test` given apart; or `path` of class folders with `split`."""

    kind: Literal["folder"] = Field(description="`folder`")
    path: str | None = Field(None, description="the task's folder: with train/ and test/ sub-folders, or, with "
                                               "`split`, the class folders themselves")
    train: str | None = Field(None, description="the training class folders (with `test`, instead of `path`)")
    test: str | None = Field(None, description="the test class folders (with `train`)")
    split: SplitSettings | None = Field(None, description="cut `path`'s class folders into train/test/val: "
                                                          "[split](#split)")

    @model_validator(mode="after")
    def _complete(self):
        if self.split is not None and not (self.path and not (self.train or self.test)):
            raise ValueError("a folder source with `split` needs `path` (the folder of class folders) and no "
                             "`train` or `test`")
        if not (self.path or (self.train and self.test)):
            raise ValueError("a folder source needs `path` (with train/ and test/, or class folders and `split`) "
                             "or both `train` and `test`")
        return self


class HfDiskSource(_Section):
    """A dataset written by `datasets.save_to_disk` (needs the `datasets` package)."""

    kind: Literal["hf_disk"] = Field(description="`hf_disk`")
    path: str = Field(description="the folder that datasets.save_to_disk wrote")
    image_column: str = Field("image", description="the column of images")
    label_column: str = Field("label", description="the column of integer labels (a ClassLabel names the "
                                                   "classes when the task gives no class_names)")
    train_split: str = Field("train", description="the split to train on")
    test_split: str = Field("test", description="the split to test on")


class BuiltinSource(_Section):
    """A built-in procedural task of the mini benchmark (cl_driver.mini.tasks)."""

    kind: Literal["builtin"] = Field(description="`builtin`")
    task: str = Field(min_length=1, description="its name: shapes, colors, digits, letters, textures, counts, "
                                                "positions, sizes, arrows or faces")


Source = Annotated[Union[FolderSource, HfDiskSource, BuiltinSource], Field(discriminator="kind")]
_OVERRIDES = ("max_train", "max_test", "lr", "iterations")
# Prompt templates of a task that gives none (each with one "{}" for the class name); the first
# builds the class texts while training (training.train_template: 0).
DEFAULT_TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "a close-up photo of a {}.",
                     "a cropped photo of a {}.", "an image of a {}.")


class TaskOverrides(_Section):
    """Per-task settings: in a task's entry, or by task name under `task_overrides`."""

    max_train: Int | None = Field(None, ge=1, description="cap on training images (a seeded subset)")
    max_test: Int | None = Field(None, ge=1, description="cap on test images (a seeded subset; the smaller of "
                                                         "this and evaluation.max_test wins)")
    lr: Float | None = Field(None, ge=0, description="this task's training.lr")
    iterations: Int | None = Field(None, ge=1, description="this task's training.iterations")


class TaskConfig(TaskOverrides):
    """One task: its name, its images and the texts of its classes, plus the
    [per-task settings](#task_overrides)."""

    name: Name = Field(description="unique; letters, digits, `_`, `.`, `-`")
    source: Source = Field(description="where the images are: [folder](#source-folder), "
                                       "[hf_disk](#source-hf_disk) or [builtin](#source-builtin)")
    class_names: tuple[str, ...] | None = Field(None, min_length=1, description=(
        "in label order; null: a builtin task's own, a ClassLabel's names (hf_disk), or the class folders' names "
        "in sorted order, made readable (`012_sea_lion` -> `sea lion`: a leading number and `_` dropped, `_` and "
        "`-` as spaces)"))
    templates: tuple[str, ...] | None = Field(None, min_length=1, description=(
        "prompt templates, each with one `{}` for the class name; null: a builtin task's own, else "
        + ", ".join(f"`{t}`" for t in DEFAULT_TEMPLATES)))

    @field_validator("templates")
    @classmethod
    def _one_slot(cls, templates):
        if templates and any(t.count("{}") != 1 for t in templates):
            raise ValueError("each template needs exactly one '{}' for the class name")
        return templates

    @property
    def source_dict(self) -> dict:
        return self.source.model_dump()


def default_method_name(data: dict) -> str:
    """zero_shot, ..., condu-<rescaler>[-agnostic]."""
    if data.get("kind") != "condu":
        return str(data.get("kind"))
    name = f"condu-{data.get('rescaler', 'model')}"
    return f"{name}-agnostic" if data.get("agnostic") else name


class TiesSettings(_Section):
    """`kind: continual_ties` (FusionBench's continual TIES): after each task, the running merged task
    vector and the new one are TIES-merged as two rows and added, times `scale`, to the running one
    (cl_driver/baselines.py)."""

    keep: Float = Field(0.2, gt=0, le=1, description="share of each row's entries kept by magnitude, over the "
                                                     "whole model (TIES' k = 20%)")
    scale: Float = Field(0.3, description="lambda, the scale of each step's merged vector (FusionBench's OPCM "
                                          "experiments: 0.3)")
    merge: Literal[TIES_MERGES] = Field("sum", description="how the entries that agree with the elected sign "
                                                           "combine: `sum` (FusionBench's default) or `mean` (the "
                                                           "TIES paper's disjoint mean)")


class OpcmSettings(_Section):
    """`kind: opcm` (Tang et al., 2025; FusionBench's OPCM): each new task vector's linear weights are
    projected off the leading singular directions of the running merged weight, and the running
    sum is rescaled to the mean task vector norm (cl_driver/baselines.py)."""

    alpha: Float = Field(0.5, ge=0, le=1, description="the share of a merged weight's singular-value sum whose "
                                                      "leading directions a new task may not touch "
                                                      "(FusionBench's default)")


class ZsclReference(_Section):
    """ZSCL's reference set: images and texts the model is distilled on toward theta0. `mini`: pairs
    drawn from the mini CLIP's pre-training distribution; `folder`: the images under `path` (any
    sub-folders; ZSCL uses ImageNet) with the captions of `captions` (ZSCL: the Conceptual Captions
    validation captions), or else the template filled with the names of the images' top folders."""

    kind: Literal[REFERENCE_KINDS] = Field("mini", description="`mini` (generated) or `folder`")
    path: str | None = Field(None, description="folder: the reference images, in any sub-folders (relative: to "
                                               "data_root)")
    captions: str | None = Field(None, description="folder: a text file of one caption a line, or a tab-separated "
                                                   ".tsv/.csv with a `title` column (ZSCL's gather_cc.py output); "
                                                   "null: class names from the top folders")
    template: str = Field("a photo of a {}.", description="folder without captions: the text of a class name")
    images: Int | None = Field(None, ge=1, description="how many reference images (a seeded subset); null: mini "
                                                       "1024, folder all")
    texts: Int | None = Field(None, ge=1, description="how many reference texts (a seeded subset); null: all")
    seed: Int = Field(0, description="seeds the draw of a mini set and the subsets")

    @model_validator(mode="after")
    def _complete(self):
        if self.kind == "folder" and not self.path:
            raise ValueError("a folder reference set needs `path`, the folder of reference images")
        if self.kind == "mini" and (self.path or self.captions):
            raise ValueError("a mini reference set is generated; `path` and `captions` are for kind: folder")
        if self.template.count("{}") != 1:
            raise ValueError("the template needs exactly one '{}' for the class name")
        return self


class ZsclSettings(_Section):
    """`kind: zscl` (Zheng et al., ICCV 2023), trained as its official MTIL code trains (cl_driver/zscl.py):
    each task from the previous ZSCL model, with distillation toward theta0 on a reference set, an L2
    pull to the task's start and weight ensembling. The defaults are its scripts/ZSCL.sh."""

    reference: ZsclReference = Field(ZsclReference(), description="the [reference set](#methods-zscl-reference)")
    weight: Float = Field(1.0, ge=0, description="weight of the distillation loss (each direction); 0: none")
    text_loss: bool = Field(True, description="also distil text->image (the logits transposed), ZSCL's --text_loss")
    temperature: Float = Field(2.0, gt=0, description="T of the distillation")
    l2: Float = Field(1.0, ge=0, description="weight of sum (theta - theta_start)^2; 0: none")
    ensemble_interval: Int | None = Field(100, ge=1, description="weight ensembling: iterations between members "
                                                                 "(ZSCL's avg_freq); null: none")
    batch_size: Int | None = Field(None, ge=1, description="reference images a step; null: training.batch_size")


class MethodConfig(_Section):
    """A method: its kind alone (`zero_shot`), or a mapping with `kind` and options. All run through
    the same loop and training; `condu-cl run --methods a,b` selects by name."""

    name: Name = Field(description="unique; `condu-cl run --methods` selects by it",
                       json_schema_extra={"x-default": "the kind; ConDU: `condu-<rescaler>[-agnostic]`"})
    kind: Literal[METHOD_KINDS] = Field(description=(
        "zero_shot (theta0), sequential (each task starts from the previous model), task_arithmetic, magmax, "
        "individual (one fine-tune per task with task identity: the upper bound), condu, continual_ties, opcm, "
        "zscl (at most one a run)"))
    alpha: Float = Field(0.3, description="task_arithmetic: the scale of the summed task vectors")
    scale: Float = Field(1.0, description="magmax: the scale of the merged task vector")
    rescaler: Literal[RESCALER_MODES] = Field("model", description="condu: how the unified delta is rescaled "
                                                                   "per task")
    agnostic: bool = Field(False, description="condu: route every task, seen or not (no task identity)")
    top_k: Int | None = Field(None, ge=1, description="condu: this method's evaluation.top_k")
    aggregate: Literal[AGGREGATES] | None = Field(None, description="condu: this method's evaluation.aggregate")
    ties: TiesSettings | None = Field(None, description="continual_ties: [its settings](#methods-ties); null: "
                                                        "their defaults")
    opcm: OpcmSettings | None = Field(None, description="opcm: [its settings](#methods-opcm); null: their defaults")
    zscl: ZsclSettings | None = Field(None, description="zscl: [its settings](#methods-zscl); null: their defaults")

    @model_validator(mode="before")
    @classmethod
    def _named(cls, data: Any) -> Any:
        data = {"kind": data} if isinstance(data, str) else data
        if isinstance(data, dict) and "name" not in data:
            data = {**data, "name": default_method_name(data)}
        return data

    @model_validator(mode="after")
    def _own_settings(self):
        for section in METHOD_SECTIONS.values():
            if getattr(self, section) is not None and METHOD_SECTIONS.get(self.kind) != section:
                raise ValueError(f"`{section}` is for kind {_kind_of(section)}, not {self.kind}; remove it")
        return self


METHOD_SECTIONS = {"continual_ties": "ties", "opcm": "opcm", "zscl": "zscl"}  # kind -> its settings' key


def _kind_of(section: str) -> str:
    return next(kind for kind, key in METHOD_SECTIONS.items() if key == section)


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
    their data lives. Every key but `model`, `methods` and the tasks (`tasks` or `tasks_file`) has
    a default."""

    model: str = Field(description=(
        "theta0: a local CLIP folder (relative: to the config's folder, then to the packaged assets, such as "
        "`mini-clip`) or a hub id `org/name[@revision]`"))
    tasks: list[Any] = Field([], description="[tasks](#tasks) in the order they are learned (after those of "
                                             "`tasks_file`)")
    tasks_file: str | None = Field(None, description=(
        "more task entries in another YAML file (a list, or `{tasks: [...]}`), before `tasks`: relative to the "
        "config, else one shipped in cl_driver/configs/ by that name (`mtil_tasks.yaml`)"))
    task_order: list[Name] | None = Field(None, min_length=1, description=(
        "run only these tasks (of `tasks_file` and `tasks`), in this order"))
    task_overrides: dict[str, TaskOverrides] = Field({}, description=(
        "per task name, [per-task settings](#task_overrides) that replace the task entry's"))
    data_root: str | None = Field(None, description=(
        "where relative source paths start (default: the config's folder); `~` and `$VARS` expand; "
        "`condu-cl run --data-root DIR` overrides it"))
    methods: list[Any] = Field(min_length=1, description=(
        f"[methods](#methods): at least one of {', '.join(METHOD_KINDS)}"))
    training: TrainingConfig = Field(TrainingConfig(), description="[training](#training) settings")
    evaluation: EvaluationConfig = Field(EvaluationConfig(), description="[evaluation](#evaluation) settings")
    device: str = Field("auto", description="auto (CUDA when there is one) | cpu | cuda | cuda:N")
    image_size: Int | None = Field(None, ge=1, description="pixels of builtin tasks' images (default: the "
                                                           "processor's crop size)")
    fusion_kernel: Literal[KERNELS] | None = Field(None, description="the fusion kernels; null: fusion picks by "
                                                                     "device")


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
                                                                        "greater_than_equal", "greater_than",
                                                                        "less_than", "less_than_equal"):
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


def tasks_file_path(where: str, name: str, base_dir: Path) -> Path:
    """`tasks_file` relative to the config's folder, else the shipped one of that name (so a copy of a
    shipped config works alone)."""
    given = Path(_expand(name))
    here, shipped = base_dir / given, packaged_config(str(given))
    if here.is_file():
        return here
    if not given.is_absolute() and shipped.is_file():
        return shipped
    raise ValueError(f"{where}: tasks_file: {name} is neither beside the config ({here}) nor shipped in "
                     f"cl_driver/configs/; give a path relative to the config, or list the tasks under `tasks:`")


def _task_entries(where: str, raw: ConfigFile, base_dir: Path) -> list:
    entries = list(raw.tasks)
    if raw.tasks_file:
        loaded = _read_yaml(tasks_file_path(where, raw.tasks_file, base_dir))
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
    _check_zscl(where, config)
    methods = tuple(_resolve_reference_paths(m, root) for m in config.methods)
    return config.model_copy(update={"tasks": tasks, "methods": methods, "model": _resolve_model(config.model, base_dir)})


def _resolve_reference_paths(method: MethodConfig, data_root: Path) -> MethodConfig:
    """A ZSCL folder reference set's paths start at data_root, as task sources' do."""
    reference = method.zscl.reference if method.zscl else None
    if reference is None or reference.kind != "folder":
        return method
    paths = {k: str((data_root / _expand(getattr(reference, k))).resolve()) for k in ("path", "captions")
             if getattr(reference, k)}
    zscl = method.zscl.model_copy(update={"reference": reference.model_copy(update=paths)})
    return method.model_copy(update={"zscl": zscl})


def _check_zscl(where: str, config: RunConfig) -> None:
    """One ZSCL method a run (its fine-tunes are one chain), on a whole model or one tower."""
    found = [i for i, m in enumerate(config.methods) if m.kind == "zscl"]
    if len(found) > 1:
        raise ValueError(f"{where}: methods[{found[1]}]: a second zscl method; a run trains one ZSCL chain, so keep "
                         "one and run other settings from another config")
    if found and config.training.train_part == "lora":
        raise ValueError(f"{where}: methods[{found[0]}]: zscl fine-tunes the whole model or one tower, not LoRA "
                         "adapters; set training.train_part to whole, image or text, or drop zscl")


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
