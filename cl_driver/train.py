"""Fine-tune CLIP on one task: cross-entropy with label smoothing over its text classifier.

AdamW and a cosine schedule with linear warmup, for a fixed number of iterations (MTIL's
protocol). Training goes through Hugging Face `accelerate`: under a launcher every process takes
its share of each batch (the config's batch size is the global one) and the main process alone
writes the result; one process on a CPU is a plain loop. Whole-model (or one-tower) fine-tunes are
written as model folders, LoRA fine-tunes as PEFT adapter folders; both name theta0 as their base.
A method that trains its own way adds to this loop through a `TrainingHook` (ZSCL: zscl.py).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import lora
from .config import TrainingConfig
from .data import TaskSpec
from .checkpoints import save_model_folder
from .models import Clip, base_folder, base_reference, image_features, load_weights, state_dict_cpu

FROZEN = ("logit_scale",)  # CLIP's temperature stays as pre-trained
PART_PREFIXES = {
    "whole": ("",),
    "image": ("vision_model.", "visual_projection."),
    "text": ("text_model.", "text_projection."),
}


class TrainingHook(Protocol):
    """What a method adds to one task's fine-tuning, on the model itself (not a launcher's wrapper)."""

    def begin(self, model) -> None:
        """Once, with the start weights loaded and the trainable parameters chosen."""

    def loss(self, model, step: int) -> torch.Tensor | None:
        """A term added to step `step`'s cross-entropy (0-based), or None."""

    def after_step(self, model, step: int) -> None:
        """After the optimizer's step `step`."""

    def end(self, model) -> None:
        """After the last step, before the model is written: it may set the weights written."""


def select_trainable(model, part: str) -> list[torch.nn.Parameter]:
    """Freeze everything but the chosen tower(s); return the parameters left to train."""
    prefixes = PART_PREFIXES[part]
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(name not in FROZEN and name.startswith(prefixes))
        if param.requires_grad:
            trainable.append(param)
    return trainable


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int):
    """Linear warmup to the peak lr, then a cosine decay to zero at `total_steps`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class ClassifierLogits(torch.nn.Module):
    """images (B, 3, H, W) -> logits (B, C) against the task's class texts, in one forward."""

    def __init__(self, clip_model, tokens: dict | None, fixed_classifier: torch.Tensor | None):
        super().__init__()
        self.clip = clip_model
        self.tokens, self.fixed = tokens, fixed_classifier

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        feats = image_features(self.clip, pixels)  # (B, D)
        if self.fixed is not None:
            classifier = self.fixed.to(feats.device)
        else:
            tokens = {k: v.to(feats.device) for k, v in self.tokens.items()}
            text = self.clip.get_text_features(**tokens)
            classifier = F.normalize((text if isinstance(text, torch.Tensor) else text.pooler_output).float(), dim=-1)
        return self.clip.logit_scale.exp().float() * feats @ classifier.T  # (B, C)


def _class_tokens(clip: Clip, spec: TaskSpec, settings: TrainingConfig) -> dict:
    template = spec.templates[settings.train_template % len(spec.templates)]
    tokens = clip.tokenizer([template.format(c) for c in spec.class_names], padding=True, truncation=True,
                            max_length=clip.max_text_length, return_tensors="pt")
    return {k: v for k, v in tokens.items() if k in ("input_ids", "attention_mask")}


def _fixed_classifier(clip: Clip, tokens: dict) -> torch.Tensor:
    """The class texts' embeddings when the text tower is frozen: computed once."""
    with torch.no_grad():
        text = clip.model.get_text_features(**{k: v.to(clip.device) for k, v in tokens.items()})
    return F.normalize((text if isinstance(text, torch.Tensor) else text.pooler_output).float(), dim=-1)


def _batches(loader, iterations: int):
    """Cycle the loader until `iterations` batches were drawn."""
    drawn = 0
    while drawn < iterations:
        for batch in loader:
            yield batch
            drawn += 1
            if drawn == iterations:
                return


def save_checkpoint(state: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write a state dict as safetensors atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    return path


def _training_parts(clip: Clip, params: list, spec: TaskSpec, dataset, settings: TrainingConfig, seed: int):
    """The logits module, AdamW over `params`, the schedule and a seeded shuffling loader for one task.
    The loader draws the config's batch, the global one: a launcher splits it across processes."""
    tokens = _class_tokens(clip, spec, settings)
    fixed = _fixed_classifier(clip, tokens) if settings.train_part == "image" else None
    module = ClassifierLogits(clip.model, tokens, fixed).train()
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = cosine_with_warmup(optimizer, settings.warmup_steps, settings.iterations)
    loader = torch.utils.data.DataLoader(dataset, batch_size=settings.batch_size, shuffle=True,
                                         num_workers=settings.num_workers,
                                         generator=torch.Generator().manual_seed(seed))
    return module, optimizer, loader, scheduler


def _optimize(accelerator, module, optimizer, loader, scheduler, settings: TrainingConfig, bar,
              hook: TrainingHook | None = None, model=None) -> None:
    """`settings.iterations` steps of cross-entropy with label smoothing, plus the hook's term."""
    for step, (pixels, labels) in enumerate(_batches(loader, settings.iterations)):
        loss = F.cross_entropy(module(pixels), labels, label_smoothing=settings.label_smoothing)
        if hook is not None:
            with accelerator.autocast():
                extra = hook.loss(model, step)
            loss = loss if extra is None else loss + extra
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if hook is not None:
            hook.after_step(model, step)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")


def _freeze(model) -> None:
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)


def _fit(clip: Clip, params: list, spec: TaskSpec, dataset, settings: TrainingConfig, seed: int, progress: bool,
         hook: TrainingHook | None = None):
    """Train `params` of the model in place on every process of the run; returns the accelerator."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    accelerator = Accelerator(cpu=clip.device.type == "cpu", mixed_precision=settings.mixed_precision,
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    parts = accelerator.prepare(*_training_parts(clip, params, spec, dataset, settings, seed))
    if hook is not None:
        hook.begin(clip.model)
    show = progress and accelerator.is_main_process
    with tqdm(total=settings.iterations, desc=f"train {spec.name}", disable=not show, leave=False) as bar:
        _optimize(accelerator, *parts, settings, bar, hook, clip.model)
    if hook is not None:
        hook.end(clip.model)
    _freeze(clip.model)
    accelerator.free_memory()
    return accelerator


def finetune(clip: Clip, start: dict[str, torch.Tensor], spec: TaskSpec, dataset, settings: TrainingConfig,
             out: str | os.PathLike, *, seed: int = 0, progress: bool = True, hook: TrainingHook | None = None) -> Path:
    """Fine-tune from the weights `start` on `dataset` and write the result to `out`, a model folder
    that names theta0 as its base (checkpoints.py); `hook` adds a method's own terms."""
    torch.manual_seed(seed)
    load_weights(clip.model, start)
    accelerator = _fit(clip, select_trainable(clip.model, settings.train_part), spec, dataset, settings, seed,
                       progress, hook)
    if accelerator.is_main_process:
        save_model_folder(state_dict_cpu(clip.model), out, base_folder=base_folder(clip), base=base_reference(clip),
                          task=spec.name)
    accelerator.wait_for_everyone()
    return Path(out)


def finetune_lora(clip: Clip, dense: dict[str, torch.Tensor], start: str | os.PathLike, spec: TaskSpec, dataset,
                  settings: TrainingConfig, out: str | os.PathLike, *, seed: int = 0, progress: bool = True) -> Path:
    """Train the LoRA factors of the adapter folder `start` on top of the frozen weights `dense`,
    and write the result to `out` as an adapter folder."""
    torch.manual_seed(seed)
    load_weights(clip.model, dense)
    with lora.attached(clip.model, start, trainable=True) as peft_model:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        accelerator = _fit(clip, params, spec, dataset, settings, seed, progress)
        if accelerator.is_main_process:
            lora.save_adapter(peft_model, out, base=base_reference(clip),
                              description=f"A LoRA adapter of CLIP trained by `condu-cl` on the task `{spec.name}`: "
                                          "`PeftModel.from_pretrained` loads it on the base above.")
        accelerator.wait_for_everyone()
    return Path(out)
