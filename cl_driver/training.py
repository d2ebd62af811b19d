"""The loop's training step: each task's fine-tune in every chain the run's methods read.

A chain is one fine-tune a task, each written to the run folder (runfolder.py) and never trained
twice: a checkpoint on disk is the fine-tune, so a resumed run picks up where it stopped.

    individual   each task from theta0 (REFERENCE.md: ConDU fine-tunes from theta0, never from
                 the unified model): individual experts, task arithmetic, ConDU
    sequential   each task from the previous task's fine-tune: sequential fine-tuning, MagMax
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .config import RunConfig
from .data import TaskSpec
from .finetunes import FullWeights
from .models import Clip
from .runfolder import RunFolder


@dataclass(frozen=True)
class Chain:
    from_previous: bool  # task i starts from task i-1's fine-tune of the chain (task 0: from theta0)


CHAINS = {"individual": Chain(from_previous=False), "sequential": Chain(from_previous=True)}


def chains_needed(wanted: Iterable[Iterable[str]]) -> list[str]:
    """The chains any method reads, in CHAINS' order (the order they train in)."""
    names = {name for chains in wanted for name in chains}
    unknown = sorted(names - set(CHAINS))
    if unknown:
        raise ValueError(f"fine-tune chains {unknown} are not in training.CHAINS ({', '.join(CHAINS)})")
    return [name for name in CHAINS if name in names]


class Training:
    def __init__(self, config: RunConfig, specs: Sequence[TaskSpec], clip: Clip, finetunes: FullWeights,
                 folder: RunFolder, *, progress: bool):
        self.config, self.specs, self.clip = config, specs, clip
        self.finetunes, self.folder, self.progress = finetunes, folder, progress

    def start(self, chain: str, i: int) -> Path | None:
        """What task i of `chain` is fine-tuned from: None for theta0 (the base)."""
        return self.folder.checkpoint(chain, i - 1) if CHAINS[chain].from_previous and i > 0 else None

    def fine_tune(self, chain: str, i: int, train_set) -> float | None:
        """Fine-tune task i of `chain` unless its checkpoint is on disk; the seconds it took, or None
        when an earlier attempt left the checkpoint."""
        path = self.folder.checkpoint(chain, i)
        if path.exists():
            return None
        settings = self.config.task_training(self.config.tasks[i])
        began = time.perf_counter()
        self.finetunes.train(self.clip, self.start(chain, i), self.specs[i], train_set, settings, path,
                             seed=settings.seed + i, progress=self.progress)
        return time.perf_counter() - began
