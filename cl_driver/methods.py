"""The methods of a run, and the one place a new one plugs in: `METHODS`.

Each entry of a config's `methods` becomes a `Method` through METHODS[kind]. The loop trains the
fine-tune chains every method names (training.CHAINS), keeps one ConDU store per rescaler a
method reads, and at every step asks each method for its row. So a new baseline is:

- a merge of fine-tunes: a function in baselines.py and a `Merged` entry here naming the chain
  whose fine-tunes it merges; or, merged one task at a time (continual TIES, OPCM), a step
  function and a `RunningMerge` entry;
- a way of training (ZSCL): a chain in training.CHAINS and a `Chained` entry here;
- anything else: a class with the three members of `Method`;

and its `kind` (with its options) in config.py's MethodConfig.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Protocol

import torch

from . import baselines
from .config import MethodConfig, OpcmSettings, TiesSettings
from .evaluation import Evaluation, Row
from .finetunes import weights_file

StateDict = dict[str, torch.Tensor]


class Method(Protocol):
    config: MethodConfig

    @property
    def chains(self) -> tuple[str, ...]:
        """The fine-tune chains it reads (training.CHAINS)."""

    @property
    def store(self) -> str | None:
        """The rescaler mode of the ConDU store it reads, if it reads one."""

    def row(self, evaluation: Evaluation, i: int) -> Row:
        """Its accuracy on every task after step i (0-based)."""


@dataclass(frozen=True)
class ZeroShot:
    """theta0 on every task, at every step."""
    config: MethodConfig
    chains = ()
    store = None

    def row(self, evaluation: Evaluation, i: int) -> Row:
        return Row(evaluation.zero_shot_row())


@dataclass(frozen=True)
class Individual:
    """Each seen task with its own fine-tune from theta0 (task identity): the upper bound."""
    config: MethodConfig
    chains = ("individual",)
    store = None

    def row(self, evaluation: Evaluation, i: int) -> Row:
        return Row(evaluation.individual_row(i))


@dataclass(frozen=True)
class Chained:
    """One model a step: the chain's fine-tune of task i (sequential fine-tuning)."""
    config: MethodConfig
    chain: str
    store = None

    @property
    def chains(self) -> tuple[str, ...]:
        return (self.chain,)

    def row(self, evaluation: Evaluation, i: int) -> Row:
        checkpoint = evaluation.folder.checkpoint(self.chain, i)
        return Row(evaluation.model_row((self.chain, i), lambda: evaluation.checkpoint_weights(checkpoint)))


@dataclass(frozen=True)
class Merged:
    """One model a step: `merge` of the chain's fine-tunes of tasks 1..i+1, against theta0."""
    config: MethodConfig
    chain: str
    merge: Callable[[StateDict, list[Path]], StateDict]
    key: tuple  # names the merged model in the expert cache, with the step
    store = None

    @property
    def chains(self) -> tuple[str, ...]:
        return (self.chain,)

    def row(self, evaluation: Evaluation, i: int) -> Row:
        paths = [evaluation.folder.checkpoint(self.chain, t) for t in range(i + 1)]
        return Row(evaluation.model_row((*self.key, i), lambda: evaluation.merged_weights(self.merge, paths)))


@dataclass(frozen=True)
class RunningMerge:
    """One model a step: the chain's fine-tunes folded in one task at a time, `step(state, delta_i)`
    (baselines.Running). The state after the last step is kept in memory, so a step merges one more
    task; a resumed run folds the earlier tasks in again from their checkpoints (baselines.fold),
    the same operations in the same order."""
    config: MethodConfig
    chain: str
    step: Callable[[baselines.Running | None, StateDict], baselines.Running]
    key: tuple  # names the merged model in the expert cache, with the step
    store = None
    states: dict[int, baselines.Running] = field(default_factory=dict, compare=False, repr=False)

    @property
    def chains(self) -> tuple[str, ...]:
        return (self.chain,)

    def state(self, evaluation: Evaluation, i: int) -> baselines.Running:
        """The running merge after tasks 0..i (0-based)."""
        if i not in self.states:
            previous = self.state(evaluation, i - 1) if i > 0 else None
            delta = baselines.task_vector(evaluation.base_state, weights_file(evaluation.folder.checkpoint(self.chain, i)))
            self.states.clear()  # only the latest is needed by the next step
            self.states[i] = self.step(previous, delta)
        return self.states[i]

    def row(self, evaluation: Evaluation, i: int) -> Row:
        def build() -> StateDict:
            return evaluation.finetunes.weights(baselines.apply_delta(evaluation.base_state,
                                                                      self.state(evaluation, i).delta))
        return Row(evaluation.model_row((*self.key, i), build))


def continual_ties(m: MethodConfig) -> RunningMerge:
    ties = m.ties or TiesSettings()
    step = partial(baselines.continual_ties_step, keep=ties.keep, scale=ties.scale, merge=ties.merge)
    return RunningMerge(m, "individual", step, ("continual_ties", ties.keep, ties.scale, ties.merge))


def opcm(m: MethodConfig) -> RunningMerge:
    alpha = (m.opcm or OpcmSettings()).alpha
    return RunningMerge(m, "individual", partial(baselines.opcm_step, alpha=alpha), ("opcm", alpha))


@dataclass(frozen=True)
class Condu:
    """ConDU: experts decoupled from the store of the fine-tunes from theta0, routed where needed."""
    config: MethodConfig
    chains = ("individual",)

    @property
    def store(self) -> str:
        return self.config.rescaler

    def row(self, evaluation: Evaluation, i: int) -> Row:
        return evaluation.condu_row(self.config, i)


METHODS: dict[str, Callable[[MethodConfig], Method]] = {
    "zero_shot": ZeroShot,
    "sequential": lambda m: Chained(m, "sequential"),
    "task_arithmetic": lambda m: Merged(m, "individual", partial(baselines.task_arithmetic, alpha=m.alpha),
                                        ("task_arithmetic", m.alpha)),
    "magmax": lambda m: Merged(m, "sequential", partial(baselines.magmax, scale=m.scale), ("magmax", m.scale)),
    "individual": Individual,
    "condu": Condu,
    "continual_ties": continual_ties,
    "opcm": opcm,
    "zscl": lambda m: Chained(m, "zscl"),
}


def make_methods(configs: tuple[MethodConfig, ...]) -> list[Method]:
    return [METHODS[m.kind](m) for m in configs]
