"""The tasks' images, each loaded once a run, and theta0's outputs on them, which every method's
evaluation and the router share: the test sets (with the optional uint8 pixel cache), theta0's
logits and features on them, and the held-out images the gated aggregate calibrates on.
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import gating
from .config import RunConfig
from .data import TaskSpec, as_dataset, few_shot, load_split
from .inference import ModelRunner
from .models import Clip
from .prototypes import dataset_features
from .runfolder import RunFolder


class TaskData:
    def __init__(self, config: RunConfig, specs: Sequence[TaskSpec], clip: Clip, side: int, folder: RunFolder,
                 runner: ModelRunner):
        self.config, self.specs, self.clip, self.side = config, specs, clip, side
        self.folder, self.runner = folder, runner
        self._tests: dict[int, tuple] = {}
        self._base_eval: dict[int, tuple] = {}
        self._held_out: dict[int, torch.Tensor] = {}

    def train_set(self, i: int):
        """Task i's training images: all of them, or `training.shots` of each class (seeded)."""
        settings = self.config.training
        split = load_split(self.specs[i], "train", image_size=self.side, seed=settings.seed)
        if settings.shots:
            split = few_shot(split, settings.shots, seed=settings.seed)
        return as_dataset(split, self.clip.processor, self.side)

    def test_set(self, j: int):
        """Task j's test images as a dataset, and their (N,) labels (cached)."""
        if j not in self._tests:
            evaluation = self.config.evaluation
            split = load_split(self.specs[j], "test", image_size=self.side, seed=self.config.training.seed,
                               limit=evaluation.max_test)
            cache = self.folder.pixels(self.specs[j].name, len(split), self.side) if evaluation.pixel_cache else None
            dataset = as_dataset(split, self.clip.processor, self.side, num_workers=self.config.training.num_workers,
                                 cache=cache)
            self._tests[j] = (dataset, torch.tensor(split.labels))
        return self._tests[j]

    def base_eval(self, j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """theta0's logits (N, C), features (N, D) and the labels (N,) on task j's test set (cached)."""
        if j not in self._base_eval:
            dataset, labels = self.test_set(j)
            self.runner.activate("theta0")
            logits, feats = self.runner.logits(dataset, self.specs[j].class_names, self.specs[j].templates,
                                               desc=f"eval theta0 on {self.specs[j].name}")
            self._base_eval[j] = (logits, feats, labels)
        return self._base_eval[j]

    def held_out_features(self, s: int) -> torch.Tensor:
        """theta0's (N, D) features of task s's held-out calibration images (cached)."""
        if s not in self._held_out:
            try:
                split = load_split(self.specs[s], "val", image_size=self.side, seed=self.config.training.seed,
                                   limit=gating.CALIBRATION_IMAGES)
            except (ValueError, OSError):
                raise ValueError(f"task {self.specs[s].name!r}: the gated aggregate calibrates on held-out `val` "
                                 "images and found none; add a val/ folder beside train/ and test/ (a `val` split "
                                 "for a saved dataset), or use --aggregate mean") from None
            self.runner.activate("theta0")
            self._held_out[s], _ = dataset_features(self.clip, as_dataset(split, self.clip.processor, self.side),
                                                    batch_size=self.config.evaluation.batch_size)
        return self._held_out[s]
