"""ZSCL (Zheng et al., ICCV 2023): continual fine-tuning that keeps CLIP's zero-shot skill, as its
official MTIL code trains (Thunderbeee/ZSCL, mtil/src/models/finetune.py and scripts/ZSCL.sh):

- each task starts from the previous task's ZSCL model (training.CHAINS["zscl"]);
- the loss is the task's cross-entropy (label smoothing) plus

      weight * [ D(teacher, student) + D(teacher^T, student^T) ]      image->text and text->image
      + l2 * sum over parameters of (theta - theta_start)^2            theta_start: the task's start

  where, on a batch of reference images x and all reference texts t,
      student = s * f(x) g0(t)^T,   teacher = s * f0(x) g0(t)^T      (B, R)
  f: the model's unit-norm image features as it trains; f0, g0: theta0's image and text features;
  s: CLIP's logit scale. The student meets the *pre-trained* text features, as in the official
  code. D is its `distillation`: the soft cross-entropy of softmax(student / T) against
  softmax(teacher / T), times T^2;
- weight ensembling (its `--we`): after the optimizer step of every iteration k (0-based) with
  k % interval == 0, the average a <- (a * n + theta) / (n + 1), n = 1, 2, ...; a starts as the
  task's start weights. The task's model is a, and the next task starts from it.

The reference set: for the real MTIL, the images of a folder (ZSCL: ImageNet) with captions (ZSCL:
the Conceptual Captions validation captions) or the folder's class names; for mini-MTIL, pairs
drawn from the shipped CLIP's own pre-training distribution (cl_driver.mini.captions). theta0's
features of it, f0 and g0, are computed once a run.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from .config import ZsclReference, ZsclSettings
from .data import IMAGE_SUFFIXES, Split, as_dataset, readable_class_name, subset
from .models import Clip, image_features, text_features
from .prototypes import dataset_features

MINI_REFERENCE_IMAGES = 1024  # a `mini` reference set's size when `images` is not given


# ---------------------------------------------------------------- the rule


def distillation(teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, R), (B, R) logits -> scalar: mean over rows of the cross-entropy of softmax(student / T)
    against the target softmax(teacher / T), times T^2 (ZSCL's helpers.distillation)."""
    target = F.softmax(teacher / temperature, dim=1)
    return F.cross_entropy(student / temperature, target) * temperature ** 2


def reference_loss(current: torch.Tensor, pretrained: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor,
                   temperature: float, *, text_loss: bool = True) -> torch.Tensor:
    """(B, D) image features of the model as it trains and (B, D) of theta0 on the same reference
    images, (R, D) theta0's text features -> scalar: the image->text distillation, plus the
    text->image one (the same logits transposed) with `text_loss`."""
    student = scale * current @ texts.T  # (B, R)
    teacher = scale * pretrained @ texts.T  # (B, R)
    loss = distillation(teacher, student, temperature)
    if text_loss:
        loss = loss + distillation(teacher.T, student.T, temperature)
    return loss


def l2_to_start(params: Sequence[torch.Tensor], start: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum over parameters of ||theta - theta_start||^2 (ZSCL's l2_loss, summed)."""
    return sum(F.mse_loss(p, s, reduction="sum") for p, s in zip(params, start))


def ensemble(average: torch.Tensor, current: torch.Tensor, count: int) -> torch.Tensor:
    """The running average of `count` earlier members plus `current` (ZSCL's merge_we)."""
    return (average * count + current) / (count + 1)


def averaged_at(step: int, interval: int | None) -> bool:
    """Whether iteration `step` (0-based) joins the weight ensemble: every `interval`-th, from the first."""
    return interval is not None and step % interval == 0


# ---------------------------------------------------------------- the reference set


def listed_images(root: Path) -> list[Path]:
    """Every image under `root`, in any sub-folder, sorted; hidden files and folders skipped."""
    if not root.is_dir():
        raise ValueError(f"{root}: no such folder for the ZSCL reference images; fix zscl.reference.path")
    found = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not found:
        raise ValueError(f"{root}: no images under it for the ZSCL reference set; fix zscl.reference.path")
    return found


def read_captions(path: Path) -> list[str]:
    """Captions from a text file, one a line; or from a .csv / .tsv file with a `title` column,
    tab-separated as ZSCL's gather_cc.py writes the Conceptual Captions file."""
    if not path.is_file():
        raise ValueError(f"{path}: no such captions file; fix zscl.reference.captions")
    if path.suffix.lower() in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            rows = csv.DictReader(f, delimiter="\t")
            if "title" not in (rows.fieldnames or []):
                raise ValueError(f"{path}: no `title` column among {rows.fieldnames}; give a tab-separated file "
                                 "with a `title` column, or a text file of one caption a line")
            captions = [row["title"].strip() for row in rows]
    else:
        captions = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    captions = [c for c in captions if c]
    if not captions:
        raise ValueError(f"{path}: no captions in it; fix zscl.reference.captions")
    return captions


def folder_class_texts(root: Path, images: Sequence[Path], template: str) -> list[str]:
    """The template filled with the readable name of each folder that holds reference images."""
    folders = sorted({p.parent.relative_to(root).parts[0] for p in images if p.parent != root})
    if not folders:
        raise ValueError(f"{root}: its images are not in class folders, and zscl.reference.captions is not given; "
                         "give a captions file or put the images in one folder per class")
    return [template.format(readable_class_name(f)) for f in folders]


def _seeded_texts(texts: list[str], limit: int | None, seed: int) -> list[str]:
    split = subset(Split(list(range(len(texts))), lambda i: texts[i]), limit, seed=seed)
    return [texts[i] for i in split.labels]


def reference_set(settings: ZsclReference, image_size: int) -> tuple[Split, list[str]]:
    """The reference images (labels: their own indices) and texts of a ZSCL run."""
    if settings.kind == "mini":
        from .mini.captions import reference_pairs

        images, texts = reference_pairs(settings.images or MINI_REFERENCE_IMAGES, image_size=image_size,
                                        seed=settings.seed)
        return Split(list(range(len(images))), lambda i: images[i].convert("RGB")), _seeded_texts(texts, settings.texts,
                                                                                                  settings.seed)
    from PIL import Image

    root = Path(settings.path)
    files = listed_images(root)
    texts = (read_captions(Path(settings.captions)) if settings.captions
             else folder_class_texts(root, files, settings.template))
    chosen = subset(Split(list(range(len(files))), lambda i: files[i]), settings.images, seed=settings.seed).labels
    return (Split(list(range(len(chosen))), lambda i: Image.open(files[chosen[i]]).convert("RGB")),
            _seeded_texts(texts, settings.texts, settings.seed))


@dataclass
class Reference:
    """A reference set and theta0's unit-norm features of it."""
    dataset: torch.utils.data.Dataset  # (pixels (3, H, W), index)
    images0: torch.Tensor  # (N, D) f0 of each image, on the CPU
    texts0: torch.Tensor  # (R, D) g0 of each text, on the CPU


@torch.no_grad()
def reference_features(clip: Clip, settings: ZsclReference, image_size: int, *, batch_size: int = 128,
                       num_workers: int = 0) -> Reference:
    """The reference set and its features; `clip` must hold theta0."""
    split, texts = reference_set(settings, image_size)
    dataset = as_dataset(split, clip.processor, image_size, num_workers=num_workers)
    images0, order = dataset_features(clip, dataset, batch_size=batch_size, num_workers=num_workers)
    assert torch.equal(order, torch.arange(len(split)))  # features in the dataset's order
    return Reference(dataset, images0, text_features(clip, texts).cpu())


# ---------------------------------------------------------------- the training hook


def _cycle(loader) -> Iterator:
    while True:
        yield from loader


class ZsclTraining:
    """ZSCL's terms of one task's fine-tuning, through train.py's TrainingHook: the reference
    distillation and the L2 pull to the start in the loss, weight ensembling after the steps."""

    def __init__(self, reference: Reference | None, settings: ZsclSettings, *, batch_size: int, seed: int,
                 num_workers: int = 0):
        self.reference, self.settings = reference, settings
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.ensembled = 0  # how many iterations joined the average

    def begin(self, model) -> None:
        """Record the start (the L2 anchor and the average's first member) and the reference batches."""
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.start = [p.detach().clone() for p in self.params]
        self.average = [p.detach().clone() for p in self.params]
        if self.reference is not None and self.settings.weight:
            self.texts0 = self.reference.texts0.to(self.params[0].device)  # (R, D), used at every step
            loader = torch.utils.data.DataLoader(self.reference.dataset, batch_size=self.batch_size, shuffle=True,
                                                 num_workers=self.num_workers,
                                                 generator=torch.Generator().manual_seed(self.seed))
            self.batches = _cycle(loader)

    def loss(self, model, step: int) -> torch.Tensor | None:
        terms = []
        if self.reference is not None and self.settings.weight:
            pixels, index = next(self.batches)
            device = self.params[0].device
            current = image_features(model, pixels.to(device))  # (B, D)
            distilled = reference_loss(current, self.reference.images0[index].to(device),
                                       self.texts0, model.logit_scale.exp().float(),
                                       self.settings.temperature, text_loss=self.settings.text_loss)
            terms.append(self.settings.weight * distilled)
        if self.settings.l2:
            terms.append(self.settings.l2 * l2_to_start(self.params, self.start))
        return sum(terms) if terms else None

    @torch.no_grad()
    def after_step(self, model, step: int) -> None:
        if averaged_at(step, self.settings.ensemble_interval):
            self.ensembled += 1
            self.average = [ensemble(a, p.detach(), self.ensembled) for a, p in zip(self.average, self.params)]

    @torch.no_grad()
    def end(self, model) -> None:
        """The task's model is the weight ensemble (the last weights when ensembling is off)."""
        if self.settings.ensemble_interval is not None:
            for p, a in zip(self.params, self.average):
                p.copy_(a)


def zscl_settings(methods) -> ZsclSettings:
    """The settings of a run's ZSCL method (config.py allows one)."""
    return next(m.zscl or ZsclSettings() for m in methods if m.kind == "zscl")
