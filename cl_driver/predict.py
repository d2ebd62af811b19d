"""The continual model as a product: classify new images with a run folder.

    from cl_driver import ConduCLIP
    model = ConduCLIP.from_run("runs/mine")                        # CPU by default; device="cuda"
    model.predict("new.png", task="myshapes")                      # one learned task's classes
    model.predict(["a.png", "b.png"])                              # every learned class, routed
    model.predict("c.png", candidate_labels=["cat", "dog"])        # labels of your own, routed

Each call follows the rule the run's evaluation follows (evaluation.py), through the same code:

- `task=NAME`, a learned task (task identity): that task's expert, decoupled from the store, with the
  task's class names and templates.
- no task and no labels (task-agnostic): one label set of every learned task's classes, each class
  with its own task's templates; theta0 plus the top-K experts by prototype similarity, combined by
  `inference.routed_logits` with the run's aggregate (`mean`, `weighted` or `gated`, the gates those
  the run calibrated at its last step). On one task's classes the logits are the evaluation's
  task-agnostic logits of that task; two tasks' classes of the same name are told apart by the
  `task` key each result carries.
- `candidate_labels=[...]` (an unseen task): those labels with config.DEFAULT_TEMPLATES, routed as
  the evaluation routes a task not learned yet.

Experts: each is rebuilt from the run's store (`fusion.Store.load_task`) the first time an image
chooses it, then kept in memory, the least recently used leaving first, up to the run's
`evaluation.cache_size` (inference.ExpertCache); in a batch, an expert runs only on the images that
chose it. Text classifiers are kept per model and label set, so a label set is encoded once.

Results are shaped like transformers' `zero-shot-image-classification` pipeline: per image, a list
of {"label", "score"} dicts, best first, the scores a softmax over the label set of CLIP's scaled
cosine logits (of the routed combination where routed).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence, Union

import torch

from fusion import Store

from .config import AGGREGATES, DEFAULT_TEMPLATES, MethodConfig, RunConfig, TaskConfig, validated
from .data import Split, TaskSpec, pixel_tensor, resolve_task
from .evaluation import calibrated_gates, expert_weights, routing_settings
from .finetunes import finetunes_for
from .inference import ExpertCache, ModelRunner, Route, routed_logits
from .models import clip_logits, image_size, load_clip, state_dict_cpu, text_classifier
from .prototypes import dataset_features
from .runfolder import RunFolder
from .state import RunState, read_state
from .stores import learned_prototypes
from .taskdata import TaskData

ImageInput = Union["PIL.Image.Image", str, os.PathLike]  # noqa: F821


class Label(NamedTuple):
    task: str | None  # the learned task the class belongs to; None for labels a caller gave
    name: str


@dataclass(frozen=True)
class LabelSet:
    """Classes to score, in groups that share prompt templates: (task or None, names, templates)."""
    groups: tuple[tuple[str | None, tuple[str, ...], tuple[str, ...]], ...]

    @property
    def labels(self) -> list[Label]:
        return [Label(task, name) for task, names, _ in self.groups for name in names]


class Scores(NamedTuple):
    logits: torch.Tensor  # (N, C) over `labels`
    labels: list[Label]
    routes: Route | None  # the routed rule's choice of experts per image; None with a task's own expert


# ---------------------------------------------------------------- the run folder


def condu_method(config: RunConfig, rescaler: str | None, where: Path) -> MethodConfig:
    """The run's first ConDU method (of the store with `rescaler`, when given): its store, K and aggregate."""
    methods = [m for m in config.methods if m.kind == "condu"]
    if not methods:
        raise ValueError(f"{where}: this run has no ConDU method, so no store to predict with; run a config with "
                         "a `condu` method")
    chosen = [m for m in methods if rescaler in (None, m.rescaler)]
    if not chosen:
        have = ", ".join(sorted({m.rescaler for m in methods}))
        raise ValueError(f"{where}: no ConDU store with rescaler {rescaler!r}; this run has: {have}")
    return chosen[0]


def learned_spec(task: TaskConfig, root: Path) -> TaskSpec:
    """A learned task's class names and templates as the run resolved them: its recorded split when
    the run wrote one (read, never written: predicting leaves the run folder as it is)."""
    record = root / "splits" / f"{task.name}.json"
    return resolve_task(task, record_dir=record.parent if record.is_file() else None)


def recorded_gates(state: RunState, learned: int) -> torch.Tensor | None:
    """The (T,) gates a gated method calibrated at step T = `learned` (None: +inf), or None when no
    method was gated. Every gated method has the same: they depend on the prototypes and the
    learned tasks' held-out images only."""
    for steps in state.gates.values():
        if len(steps) >= learned:
            return torch.tensor([math.inf if g is None else g for g in steps[learned - 1]])
    return None


# ---------------------------------------------------------------- images and results


def open_image(image: ImageInput):
    """A PIL RGB image from a PIL image or a path; one line naming the file when it does not open."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if not isinstance(image, (str, os.PathLike)):
        raise ValueError(f"images: a PIL image or a path, got {type(image).__name__}")
    path = Path(image)
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"{path}: no such image file") from None
    except (OSError, Image.DecompressionBombError) as err:
        reason = getattr(err, "strerror", None) or str(err).split("\n")[0] or type(err).__name__
        raise ValueError(f"{path}: cannot be read as an image ({reason}); give a PNG, JPEG or other image "
                         "file") from None


def ranked(scores: Scores, top: int | None) -> list[list[dict]]:
    """Per image, the `top` best labels as {"label", "score"} (and "task" for a learned task's class)."""
    probabilities = scores.logits.softmax(dim=1)  # (N, C)
    count = probabilities.shape[1] if top is None else min(top, probabilities.shape[1])
    values, indices = probabilities.topk(count, dim=1)
    out = []
    for row_values, row_indices in zip(values.tolist(), indices.tolist()):
        out.append([{"label": scores.labels[c].name, "score": p,
                     **({"task": scores.labels[c].task} if scores.labels[c].task is not None else {})}
                    for p, c in zip(row_values, row_indices)])
    return out


def format_predictions(names: Sequence[str], results: Sequence[Sequence[dict]]) -> str:
    """One block per image: its name, then a line per label (label, its task if any, score), the
    columns aligned across every block."""
    entries = [e for result in results for e in result]
    label_width = max((len(e["label"]) for e in entries), default=0)
    task_width = max((len(e.get("task", "")) for e in entries), default=0)
    lines = []
    for name, result in zip(names, results):
        lines.append(str(name))
        for e in result:
            task = f"  {e.get('task', ''):<{task_width}}" if task_width else ""
            lines.append(f"  {e['label']:<{label_width}}{task}  {e['score']:.3f}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the predictor


class ConduCLIP:
    """A run folder's continual model: theta0, the store's experts and prototypes, the run's routing.

    Make one with `ConduCLIP.from_run(run_dir)`."""

    def __init__(self, *, root: Path, config: RunConfig, state: RunState, method: MethodConfig,
                 specs: Sequence[TaskSpec], clip, runner: ModelRunner, finetunes, store: Store):
        self.root, self.config, self.state, self.method = root, config, state, method
        self.specs, self.clip, self.runner, self.finetunes, self.store = list(specs), clip, runner, finetunes, store
        self.prototypes = learned_prototypes(store, len(self.specs) - 1)  # T x (C_t, D)
        self.aggregate, self.top_k = routing_settings(config, method)
        self.classifiers = ExpertCache(size=4 * (len(self.specs) + 1))  # (C, D) text classifiers, per model and labels
        self._gates: torch.Tensor | None = None

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, device: str = "cpu", rescaler: str | None = None) -> "ConduCLIP":
        """The continual model of a run folder (`condu-cl run --out`), after its finished tasks.

        `rescaler` picks one of the run's ConDU stores (default: its first ConDU method's, whose K and
        aggregate are the defaults of `predict`). theta0 is the run's `model`, loaded on `device`."""
        root = Path(run_dir)
        state_path = root / "state.json"
        if not state_path.is_file():
            raise ValueError(f"{root}: no such run (no state.json in it); give a folder `condu-cl run --out` wrote")
        state = read_state(state_path)
        config = validated(RunConfig, {**state.config, "device": device, "path": str(state_path)}, str(state_path))
        method = condu_method(config, rescaler, root)
        learned = state.completed
        if learned == 0:
            raise ValueError(f"{root}: no task is finished yet; resume the run with `condu-cl run` and predict after "
                             "its first task")
        specs = [learned_spec(t, root) for t in config.tasks[:learned]]
        store_path = RunFolder(root, tuple(t.name for t in config.tasks)).store(method.rescaler)
        if not Store.exists(store_path):
            raise ValueError(f"{store_path}: no ConDU store; the run folder is incomplete: run `condu-cl run` again "
                             "with the same config and --out")
        store = Store.open(store_path, kernel=config.fusion_kernel)
        stored = [t.name for t in store.tasks][:learned]
        if stored != [s.name for s in specs]:
            raise ValueError(f"{store_path}: holds the tasks {stored}, but the run finished {[s.name for s in specs]}; "
                             "the run folder was changed: predict with the folder the run wrote")
        clip = load_clip(config.model, device=device)
        finetunes = finetunes_for(root, state_dict_cpu(clip.model), config.training)
        evaluation = config.evaluation
        runner = ModelRunner(clip, finetunes.weights(finetunes.base_state()), cache_size=evaluation.cache_size,
                             batch_size=evaluation.batch_size)
        return cls(root=root, config=config, state=state, method=method, specs=specs, clip=clip, runner=runner,
                   finetunes=finetunes, store=store)

    @property
    def tasks(self) -> list[str]:
        """The learned tasks, in the order they were learned."""
        return [s.name for s in self.specs]

    def __repr__(self) -> str:
        return (f"ConduCLIP({str(self.root)!r}, tasks={self.tasks}, store={self.method.rescaler!r}, "
                f"aggregate={self.aggregate!r}, top_k={self.top_k})")

    # -- the three rules --------------------------------------------------------------------

    def predict(self, images: ImageInput | Iterable[ImageInput], candidate_labels: Sequence[str] | None = None, *,
                task: str | None = None, top_k: int | None = None, aggregate: str | None = None,
                top: int | None = 5) -> list[dict] | list[list[dict]]:
        """Classify images (PIL images or paths): per image its `top` best labels (None: all) as
        [{"label", "score"}, ...], best first; one image gives one such list, several a list of them.

        `task`: a learned task's own expert and classes. Otherwise routed (theta0 plus the `top_k`
        experts by prototype similarity, combined by `aggregate`; default: the run's) over
        `candidate_labels`, or without them over every learned task's classes, each result then
        naming its "task"."""
        if top is not None and top < 1:
            raise ValueError(f"top: at least 1 label per image, got {top}")
        single = isinstance(images, (str, os.PathLike)) or hasattr(images, "convert")  # a path or a PIL image
        scores = self.scores([images] if single else list(images), candidate_labels, task=task, top_k=top_k,
                             aggregate=aggregate)
        results = ranked(scores, top)
        return results[0] if single else results

    @torch.no_grad()
    def scores(self, images: Sequence[ImageInput], candidate_labels: Sequence[str] | None = None, *,
               task: str | None = None, top_k: int | None = None, aggregate: str | None = None) -> Scores:
        """The (N, C) logits `predict` ranks, their labels and the routes: the images taken a batch
        (evaluation.batch_size) at a time."""
        labels, expert = self.label_set(candidate_labels, task)
        top_k, aggregate = self._routing(top_k, aggregate)
        size = self.config.evaluation.batch_size
        parts = [self._batch([open_image(im) for im in images[start:start + size]], labels, expert, top_k, aggregate)
                 for start in range(0, len(images), size)]
        if not parts:
            return Scores(torch.zeros(0, len(labels.labels)), labels.labels, None)
        routes = None if expert is not None else Route(torch.cat([p.routes.selection for p in parts]),
                                                       torch.cat([p.routes.values for p in parts]))
        return Scores(torch.cat([p.logits for p in parts]), labels.labels, routes)

    def label_set(self, candidate_labels: Sequence[str] | None, task: str | None) -> tuple[LabelSet, int | None]:
        """The classes to score, and the learned task whose own expert scores them (None: routed)."""
        if task is not None:
            if candidate_labels is not None:
                raise ValueError("give candidate_labels (routed over the learned experts) or task (that task's own "
                                 "expert and classes), not both")
            if task not in self.tasks:
                raise ValueError(f"no learned task {task!r}; this run learned: {', '.join(self.tasks)}")
            spec = self.specs[self.tasks.index(task)]
            return LabelSet(((spec.name, spec.class_names, spec.templates),)), self.tasks.index(task)
        if candidate_labels is None:
            return LabelSet(tuple((s.name, s.class_names, s.templates) for s in self.specs)), None
        names = tuple(candidate_labels) if not isinstance(candidate_labels, str) else (candidate_labels,)
        if not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise ValueError(f"candidate_labels: give one or more non-empty class names, got {list(names)}")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"candidate_labels: {repeated} given more than once; give each label once")
        return LabelSet(((None, names, DEFAULT_TEMPLATES),)), None

    def _routing(self, top_k: int | None, aggregate: str | None) -> tuple[int, str]:
        if aggregate is not None and aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k: experts routed to must be a whole number >= 1, got {top_k!r}")
        return top_k or self.top_k, aggregate or self.aggregate

    # -- one batch --------------------------------------------------------------------------

    def _batch(self, images: list, labels: LabelSet, expert: int | None, top_k: int, aggregate: str) -> Scores:
        pixels = pixel_tensor(Split([0] * len(images), images.__getitem__), self.clip.processor)  # (n, 3, H, W)
        if expert is not None:  # task identity: its own expert alone
            return Scores(self._logits(*self._expert(expert), pixels, labels)[0], labels.labels, None)
        base_logits, feats0 = self._logits("theta0", None, pixels, labels)

        def experts(t: int, rows: dict) -> dict:  # inference.ExpertLogits: expert t on the rows that chose it
            return {key: self._logits(*self._expert(t), pixels, labels, r)[0] for key, r in rows.items()}

        thresholds = self.gates() if aggregate == "gated" else None
        combined = routed_logits({0: feats0}, {0: base_logits}, self.prototypes, experts, top_k=top_k,
                                 aggregate=aggregate, thresholds=thresholds)
        logits, route = combined[0]
        return Scores(logits, labels.labels, route)

    def _expert(self, t: int):
        """Task t's (0-based) cache key and the builder of its weights from the store."""
        return ("condu", self.method.rescaler, t), (lambda: expert_weights(self.store, t, self.finetunes, self.clip))

    def _logits(self, key, build, pixels: torch.Tensor, labels: LabelSet,
                rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The model `key`'s (n, C) logits and (n, D) features on `pixels` (or its `rows`), as
        inference.ModelRunner.logits computes them."""
        self.runner.activate(key, build)
        chosen = pixels if rows is None else pixels[rows]
        feats, _ = dataset_features(self.clip, torch.utils.data.TensorDataset(chosen, torch.zeros(len(chosen))),
                                    batch_size=self.runner.batch_size)
        classifier = self.classifiers.get((key, labels), lambda: torch.cat(
            [text_classifier(self.clip, names, templates) for _, names, templates in labels.groups]))  # (C, D)
        return clip_logits(self.clip.model, feats.to(self.clip.device), classifier).cpu(), feats

    def gates(self) -> torch.Tensor:
        """The gated aggregate's (T,) thresholds: those the run recorded at its last finished step, or,
        where no method of the run was gated, calibrated now on the learned tasks' held-out images."""
        if self._gates is None:
            self._gates = recorded_gates(self.state, len(self.specs))
        if self._gates is None:
            side = self.config.image_size or image_size(self.clip.processor)
            folder = RunFolder(self.root, tuple(self.tasks))
            data = TaskData(self.config, self.specs, self.clip, side, folder, self.runner)
            self._gates = calibrated_gates(self.prototypes, data.held_out_features)
        return self._gates
