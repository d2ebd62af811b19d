"""Class prototypes, computed with theta0, and the routing weights they give.

Prototype of class c of task i (REFERENCE.md, Inference):
    P_ic = normalize( mean_x normalize(f0(x)) over the class's training images
                    + mean_t normalize(g0(t(c))) over the task's prompt templates )
Weight of task i for an image x: w_i(x) = max_c cos(f0(x), P_ic).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .models import Clip, image_features, template_features


@torch.no_grad()
def dataset_features(clip: Clip, dataset, *, batch_size: int = 128, num_workers: int = 0,
                     desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm image features (N, D) and labels (N,) of a dataset, in its order, on the CPU."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats, labels = [], []
    for pixels, label in tqdm(loader, desc=desc, disable=desc is None, leave=False):
        feats.append(image_features(clip.model, pixels.to(clip.device)).cpu())
        labels.append(torch.as_tensor(label))
    return torch.cat(feats), torch.cat(labels)


def class_means(feats: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, D) features, (N,) labels -> (C, D) per-class means (zero for a class without images)."""
    sums = torch.zeros(num_classes, feats.shape[1], dtype=feats.dtype).index_add_(0, labels, feats)  # (C, D)
    counts = torch.bincount(labels, minlength=num_classes).clamp(min=1).to(feats.dtype)  # (C,)
    return sums / counts[:, None]


def combine_prototypes(image_means: torch.Tensor, text_means: torch.Tensor) -> torch.Tensor:
    """(C, D) + (C, D) -> (C, D) unit-norm prototypes."""
    return F.normalize(image_means + text_means, dim=-1)


@torch.no_grad()
def compute_prototypes(clip0: Clip, train_feats: torch.Tensor, train_labels: torch.Tensor,
                       class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(C, D) prototypes; `clip0` must hold theta0 and `train_feats` be theta0's features."""
    text_means = template_features(clip0, class_names, templates).mean(dim=1).cpu()  # (C, D)
    return combine_prototypes(class_means(train_feats, train_labels, len(class_names)), text_means)


def routing_weights(feats0: torch.Tensor, prototypes: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N, D) theta0 features and T prototype sets (C_i, D) -> (N, T) weights max_c cos(f0(x), P_ic)."""
    return torch.stack([(feats0 @ protos.T).max(dim=1).values for protos in prototypes], dim=1)
