"""The loop's training step: each task's fine-tune in every chain the run's methods read.

A chain is one fine-tune a task, each written to the run folder (runfolder.py) and never trained
twice: a checkpoint on disk is the fine-tune, so a resumed run picks up where it stopped.

    individual   each task from theta0 (REFERENCE.md: ConDU fine-tunes from theta0, never from
                 the unified model): individual experts, task arithmetic, continual TIES, OPCM, ConDU
    sequential   each task from the previous task's fine-tune: sequential fine-tuning, MagMax
    zscl         each task from the previous task's ZSCL model, trained with ZSCL's distillation on a
                 reference set, L2 pull and weight ensembling (zscl.py): ZSCL
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from safetensors.torch import load_file

from . import zscl
from .config import RunConfig
from .data import TaskSpec
from .finetunes import FullWeights, weights_file
from .models import Clip, image_size, load_weights
from .runfolder import RunFolder
from .train import finetune


@dataclass(frozen=True)
class Chain:
    from_previous: bool  # task i starts from task i-1's fine-tune of the chain (task 0: from theta0)
    zscl: bool = False  # trained with ZSCL's terms (zscl.py), by the run's one zscl method's settings


CHAINS = {"individual": Chain(from_previous=False), "sequential": Chain(from_previous=True),
          "zscl": Chain(from_previous=True, zscl=True)}


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
        self._reference: zscl.Reference | None = None  # theta0's features of the ZSCL reference set, once a run

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
        if CHAINS[chain].zscl:
            self.fine_tune_zscl(i, train_set, settings, path)
        else:
            self.finetunes.train(self.clip, self.start(chain, i), self.specs[i], train_set, settings, path,
                                 seed=settings.seed + i, progress=self.progress)
        return time.perf_counter() - began

    def fine_tune_zscl(self, i: int, train_set, settings, path: Path) -> None:
        """Task i of the zscl chain: from the previous ZSCL model (task 0: theta0), with ZSCL's terms."""
        options = zscl.zscl_settings(self.config.methods)
        reference = self.reference(options) if options.weight else None
        start = self.start("zscl", i)
        weights = self.finetunes.clip_state if start is None else load_file(str(weights_file(start)))
        hook = zscl.ZsclTraining(reference, options, batch_size=options.batch_size or settings.batch_size,
                                 seed=settings.seed + i, num_workers=settings.num_workers)
        finetune(self.clip, weights, self.specs[i], train_set, settings, path, seed=settings.seed + i,
                 progress=self.progress, hook=hook)

    def reference(self, options) -> zscl.Reference:
        """The ZSCL reference set and theta0's features of it (computed with theta0 loaded, once a run)."""
        if self._reference is None:
            load_weights(self.clip.model, self.finetunes.clip_state)
            side = self.config.image_size or image_size(self.clip.processor)
            self._reference = zscl.reference_features(self.clip, options.reference, side,
                                                      batch_size=self.config.evaluation.batch_size,
                                                      num_workers=self.config.training.num_workers)
        return self._reference
