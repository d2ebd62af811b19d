"""Rows of the accuracy matrix: a model's accuracy on every task, and ConDU's inference.

ConDU at step i (REFERENCE.md, Inference): a seen task, with task identity, is evaluated with
its own expert, decoupled from the store; an unseen task (or every task, task-agnostic) with
theta0 plus the top-K experts its images are routed to (inference.routed_logits). Each expert is
built and loaded once a step, for its own task and for every routed image that chose it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Mapping, Sequence

import torch

from fusion import Store

from . import gating
from .config import MethodConfig, RunConfig
from .data import TaskSpec
from .finetunes import FullWeights, weights_file
from .inference import ExpertLogits, ModelRunner, Route, accuracy, routed_logits
from .models import Clip
from .prototypes import routing_weights
from .runfolder import RunFolder
from .stores import learned_prototypes
from .taskdata import TaskData

StateDict = dict[str, torch.Tensor]


@dataclass
class Row:
    """A method's row at one step (% on each task), and what it measured on the way."""
    accuracy: list[float]
    routing: list[float | None] | None = None  # task-agnostic: % of each seen task's images routed to its own expert
    gates: list[float | None] | None = None  # gated aggregate: the step's thresholds, as recorded


# ---------------------------------------------------------------- what a predictor shares


def routing_settings(config: RunConfig, method: MethodConfig) -> tuple[str, int]:
    """(aggregate, K) of a ConDU method: its own, else the run's evaluation settings."""
    return method.aggregate or config.evaluation.aggregate, method.top_k or config.evaluation.top_k


def expert_weights(store: Store, t: int, finetunes: FullWeights, clip: Clip) -> StateDict:
    """Task t's (0-based) CLIP weights, from the state the store decouples: rebuilt straight onto
    the model's device for whole-model fine-tunes, on the host for adapters (merged there)."""
    device = clip.device if finetunes.rebuilds_on_model_device else "cpu"
    return finetunes.weights(store.load_task(t + 1, device=device))


def calibrated_gates(prototypes: Sequence[torch.Tensor], held_out_features: Callable[[int], torch.Tensor]
                     ) -> torch.Tensor:
    """The gated aggregate's (T,) taus for T learned tasks' prototypes, from theta0's features of each
    learned task's held-out images (`held_out_features(s)`, (N_s, D))."""
    weights = {s: routing_weights(held_out_features(s), prototypes) for s in range(len(prototypes))}
    return gating.expert_thresholds(weights, len(prototypes))


class Evaluation:
    def __init__(self, config: RunConfig, specs: Sequence[TaskSpec], clip: Clip, runner: ModelRunner,
                 data: TaskData, finetunes: FullWeights, folder: RunFolder, base_state: StateDict):
        self.config, self.specs, self.clip, self.runner = config, specs, clip, runner
        self.data, self.finetunes, self.folder = data, finetunes, folder
        self.base_state = base_state  # the base of every delta, in fusion's space

    # -- one model on every task --------------------------------------------------------------

    def task_logits(self, key: Hashable, build: Callable[[], StateDict], j: int) -> torch.Tensor:
        """(N, C) logits on task j's test images of one model, given by a cache key and a builder of
        its weights, with task j's own text classifier."""
        self.runner.activate(key, build)
        logits, _ = self.runner.logits(self.data.test_set(j)[0], self.specs[j].class_names, self.specs[j].templates,
                                       desc=f"eval {key[0]} on {self.specs[j].name}")
        return logits

    def accuracy(self, key: Hashable, build: Callable[[], StateDict], j: int) -> float:
        """Accuracy on task j of one model, given by a cache key and a builder of its weights."""
        return accuracy(self.task_logits(key, build, j), self.data.test_set(j)[1])

    def model_row(self, key: Hashable, build: Callable[[], StateDict]) -> list[float]:
        return [self.accuracy(key, build, j) for j in range(len(self.specs))]

    def zero_shot_row(self) -> list[float]:
        return [accuracy(self.data.base_eval(j)[0], self.data.base_eval(j)[2]) for j in range(len(self.specs))]

    def individual_row(self, i: int) -> list[float]:
        """Each seen task with its own fine-tune from theta0; tasks not seen yet zero-shot."""
        zero = self.zero_shot_row()
        expert = lambda j: self.checkpoint_weights(self.folder.checkpoint("individual", j))  # noqa: E731
        return [self.accuracy(("individual", j), lambda j=j: expert(j), j) if j <= i else zero[j]
                for j in range(len(self.specs))]

    def checkpoint_weights(self, checkpoint: Path) -> StateDict:
        """The CLIP weights of a fine-tuned checkpoint."""
        return self.finetunes.weights(self.finetunes.fused_state(checkpoint))

    def merged_weights(self, merge: Callable[[StateDict, list[Path]], StateDict], checkpoints: list[Path]) -> StateDict:
        """A merging baseline's model: `merge` applied in fusion's space, then made CLIP weights."""
        return self.finetunes.weights(merge(self.base_state, [weights_file(c) for c in checkpoints]))

    # -- ConDU ------------------------------------------------------------------------------

    def open_store(self, rescaler: str) -> Store:
        return Store.open(self.folder.store(rescaler), kernel=self.config.fusion_kernel)

    def load_expert(self, store: Store, t: int) -> StateDict:
        return expert_weights(store, t, self.finetunes, self.clip)

    def gate_thresholds(self, store: Store, method: MethodConfig, i: int) -> torch.Tensor:
        """The gated aggregate's (i + 1,) taus at step i, from held-out images of tasks 0..i only."""
        return calibrated_gates(learned_prototypes(store, i), self.data.held_out_features)

    def experts(self, store: Store, method: MethodConfig, i: int, own: dict[int, float] | None) -> ExpertLogits:
        """The routed rule's experts at step i: expert t's logits on chosen rows of task j's test images,
        the expert built and loaded once. With `own`, its accuracy on its own task is taken in the same
        visit (task identity)."""
        def logits(t: int, rows: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
            key, build = ("condu", method.rescaler, i, t), (lambda: self.load_expert(store, t))
            if own is not None:
                own[t] = self.accuracy(key, build, t)
            self.runner.activate(key, build)
            return {j: self.runner.logits(self.data.test_set(j)[0], self.specs[j].class_names,
                                          self.specs[j].templates, rows=r)[0] for j, r in rows.items()}
        return logits

    def routed(self, method: MethodConfig, i: int, tasks: Sequence[int], own: dict[int, float] | None = None
               ) -> tuple[dict[int, tuple[torch.Tensor, Route]], torch.Tensor | None]:
        """The routed rule at step i on the test images of `tasks`: per task, its (N, C) combined logits
        and route; and the gated aggregate's thresholds (None for the others). With `own`, each seen
        task's accuracy with its own expert is taken in the same visit (experts)."""
        store = self.open_store(method.rescaler)
        aggregate, top_k = routing_settings(self.config, method)
        thresholds = self.gate_thresholds(store, method, i) if aggregate == "gated" else None
        combined = routed_logits({j: self.data.base_eval(j)[1] for j in tasks},
                                 {j: self.data.base_eval(j)[0] for j in tasks}, learned_prototypes(store, i),
                                 self.experts(store, method, i, own), top_k=top_k, aggregate=aggregate,
                                 thresholds=thresholds, visit=range(i + 1) if own is not None else ())
        return combined, thresholds

    def condu_row(self, method: MethodConfig, i: int) -> Row:
        """Seen tasks with identity: their decoupled expert; the rest: theta0 + top-K routed experts."""
        own = None if method.agnostic else {}
        combined, thresholds = self.routed(method, i, [j for j in range(len(self.specs)) if method.agnostic or j > i],
                                           own)
        acc = {**(own or {}), **{j: accuracy(logits, self.data.base_eval(j)[2]) for j, (logits, _) in combined.items()}}
        return Row([acc[j] for j in range(len(self.specs))],
                   routing=self.routing_hits({j: r for j, (_, r) in combined.items()}, i) if method.agnostic else None,
                   gates=None if thresholds is None else gating.recorded(thresholds))

    def routing_hits(self, routes: Mapping[int, Route], i: int) -> list[float | None]:
        """% of each seen task's test images whose first expert is that task's own (None: unseen)."""
        return [100.0 * (routes[j].selection[:, 0] == j).double().mean().item() if j <= i else None
                for j in range(len(self.specs))]
