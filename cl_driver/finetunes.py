"""What a fine-tune is on disk, what ConDU fuses of it, and how it becomes CLIP weights.

- `FullWeights` (train_part whole, image or text): a checkpoint is a model folder (its
  model.safetensors, the base's config, tokenizer and processor files, a card naming theta0);
  fusion works on the weights themselves, against theta0.
- `LoraAdapters` (train_part lora): a checkpoint is a PEFT adapter folder; fusion works on the
  LoRA factors, against the shared initial adapter (`base-adapter/`, part of the pre-trained
  state). A model is CLIP's weights plus scaling * B @ A on each target.

Both give the loop the same few things: the base path of the stores, a checkpoint's path, the
state that fusion sees of a checkpoint, and the CLIP weights of such a state.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from . import lora
from .config import TrainingConfig
from .checkpoints import MODEL_WEIGHTS, save_weights
from .models import Clip, base_reference, load_weights
from .train import finetune, finetune_lora

StateDict = dict[str, torch.Tensor]


def weights_file(checkpoint: str | os.PathLike) -> Path:
    """The safetensors file the merging baselines read for a checkpoint: an adapter folder's
    factor file, a model folder's weights, or a lone file itself (the store takes folders whole)."""
    checkpoint = Path(checkpoint)
    if lora.is_adapter(checkpoint):
        return checkpoint / lora.ADAPTER_WEIGHTS
    return checkpoint / MODEL_WEIGHTS if checkpoint.is_dir() else checkpoint


class FullWeights:
    """Fine-tunes of the whole model (or of one tower), as safetensors state dicts."""

    rebuilds_on_model_device = True  # a decoupled expert is the model's weights: rebuild it where the model is

    def __init__(self, root: Path, clip_state: StateDict, settings: TrainingConfig):
        self.root, self.clip_state, self.settings = root, clip_state, settings

    @property
    def base_path(self) -> Path:
        return self.root / "base.safetensors"

    def write_base(self, clip: Clip) -> None:
        if not self.base_path.exists():
            save_weights(self.clip_state, self.base_path)

    def base_state(self) -> StateDict:
        """The base of every delta, in the space fusion works in."""
        return self.clip_state

    def fused_state(self, checkpoint: Path) -> StateDict:
        return load_file(str(weights_file(checkpoint)))

    def weights(self, state: StateDict) -> StateDict:
        """CLIP weights of a state in fusion's space."""
        return state

    def train(self, clip: Clip, start: Path | None, spec, dataset, settings: TrainingConfig, out: Path, *,
              seed: int, progress: bool) -> None:
        weights = self.clip_state if start is None else load_file(str(weights_file(start)))
        finetune(clip, weights, spec, dataset, settings, out, seed=seed, progress=progress)


class LoraAdapters(FullWeights):
    """LoRA fine-tunes as PEFT adapter folders, fused in factor space."""

    rebuilds_on_model_device = False  # factors are merged into the host copy of theta0

    @property
    def base_path(self) -> Path:
        return self.root / "base-adapter"

    def write_base(self, clip: Clip) -> None:
        """The initial adapter shared by every task, drawn once with the run's seed."""
        if not lora.is_adapter(self.base_path):
            load_weights(clip.model, self.clip_state)
            lora.write_initial_adapter(clip.model, self.settings.lora.rank, self.settings.lora.init_std,
                                       self.settings.seed, self.base_path, base=base_reference(clip))

    def base_state(self) -> StateDict:
        return self.fused_state(self.base_path)

    def weights(self, state: StateDict) -> StateDict:
        return lora.merge_factors(self.clip_state, state, lora.adapter_scaling(self.base_path))

    def train(self, clip: Clip, start: Path | None, spec, dataset, settings: TrainingConfig, out: Path, *,
              seed: int, progress: bool) -> None:
        finetune_lora(clip, self.clip_state, start or self.base_path, spec, dataset, settings, out, seed=seed,
                      progress=progress)


def finetunes_for(root: Path, clip_state: StateDict, settings: TrainingConfig) -> FullWeights:
    return (LoraAdapters if settings.train_part == "lora" else FullWeights)(root, clip_state, settings)
