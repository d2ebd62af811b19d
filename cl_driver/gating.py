"""The `gated` aggregate: an expert joins a routed prediction only where it fits the image better
than it fits any image of another task it knows.

Inference is the official `mean` rule (theta0 plus the top-K experts by w_t(x), logits
averaged) with a gate per expert: expert t joins image x only if w_t(x) > tau_t. Where no
expert passes, the prediction is theta0's, i.e. zero-shot.

tau_t is calibrated at every step on held-out images (the `val` split) of the tasks learned so
far, never on a task not yet learned: it is the highest w_t(x) over the held-out images of the
other learned tasks. So on every image of a learned task that is not t's own, expert t stays
out: a learned task posing as unseen gets exactly zero-shot's prediction. An unseen image
admits expert t only if it fits t's prototypes better than anything t was not trained for.
With one task learned there is nothing to compare with, and tau = +inf.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

CALIBRATION_IMAGES = 100  # held-out images per learned task


def expert_thresholds(held_out_weights: Mapping[int, torch.Tensor], num_experts: int) -> torch.Tensor:
    """(T,) tau_t = the max of w_t(x) over held-out images x of every learned task s != t.

    `held_out_weights[s]` is the (N_s, T) routing weights of task s's held-out images.
    """
    thresholds = torch.full((num_experts,), -math.inf)
    for s, weights in held_out_weights.items():
        best = weights.max(dim=0).values  # (T,): each expert's best fit to task s's images
        best[s] = -math.inf  # an expert's own task does not raise its bar
        thresholds = torch.maximum(thresholds, best)
    return thresholds.masked_fill(thresholds == -math.inf, math.inf)  # no other task seen: shut


def passes(selection: torch.Tensor, values: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """(N, K) bool: whether each selected expert's similarity is above its own tau."""
    return values > thresholds[selection]


def gate_selection(selection: torch.Tensor, values: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """(N, K) selection with every expert that does not pass its gate replaced by -1 (no expert)."""
    return selection.masked_fill(~passes(selection, values, thresholds), -1)


def recorded(thresholds: torch.Tensor) -> list[float | None]:
    """The taus as JSON numbers; None for +inf (that expert never joins)."""
    return [None if math.isinf(t) else t for t in thresholds.tolist()]
