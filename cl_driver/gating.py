"""The `gated` aggregate: experts join a routed prediction only where they fit the image.

Inference is the official `mean` rule (theta0 plus the top-K experts by w_t(x), logits
averaged) with a gate: expert t joins image x only if w_t(x) > tau. With tau = +inf no expert
ever joins and the prediction is theta0's, i.e. zero-shot.

tau is calibrated at every step on held-out images (the `val` split) of the tasks learned so
far, never on a task not yet learned. Each learned task s in turn plays an unseen task (leave
one task out): its images are routed to the top-K experts other than s and combined under each
candidate tau. tau is the candidate with the most correct calibration predictions among those
under which no learned task does worse than theta0 alone; ties go to the larger tau (fewer
experts). With one task learned there is nothing to calibrate on, and tau = +inf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from .inference import rows_selecting

CALIBRATION_IMAGES = 100  # held-out images per learned task


@dataclass(frozen=True)
class GateCase:
    """One learned task posing as unseen.

    base_logits (N, C): theta0's; labels (N,); values (N, K): the routed experts' similarities,
    best first; slot_logits (N, K, C): those experts' logits, slot for slot.
    """

    base_logits: torch.Tensor
    labels: torch.Tensor
    values: torch.Tensor
    slot_logits: torch.Tensor


def leave_one_out(weights: torch.Tensor, task: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) routing weights -> the top-k experts other than `task`: (N, K') indices and weights."""
    others = torch.tensor([t for t in range(weights.shape[1]) if t != task], dtype=torch.long)
    values, local = weights[:, others].topk(min(k, len(others)), dim=1)  # (N, K'), best first
    return others[local], values


def slot_logits(selection: torch.Tensor, expert_logits: Mapping[int, torch.Tensor], num_classes: int) -> torch.Tensor:
    """(N, K) selection and each expert's logits on `rows_selecting(selection, t)` -> (N, K, C)."""
    out = torch.zeros(*selection.shape, num_classes)
    for expert, logits in expert_logits.items():
        rows, slots = rows_selecting(selection, expert)
        out[rows, slots] = logits
    return out


def prefix_correct(case: GateCase) -> torch.Tensor:
    """(N, K + 1): whether theta0 averaged with the first m experts is right, m = 0..K.

    Averaging does not move the argmax, so running sums suffice.
    """
    running = torch.cat([case.base_logits[:, None], case.slot_logits], dim=1).cumsum(dim=1)  # (N, K+1, C)
    return running.argmax(dim=2) == case.labels[:, None]


def candidate_thresholds(cases: list[GateCase]) -> torch.Tensor:
    """Ascending taus: one below every similarity (all experts join) and each observed similarity."""
    values = torch.cat([c.values.flatten() for c in cases]).unique()  # sorted
    return torch.cat([values[:1] - 1.0, values])


def correct_counts(case: GateCase, thresholds: torch.Tensor) -> torch.Tensor:
    """(S,) correct predictions of the case under each of S thresholds."""
    correct = prefix_correct(case)  # (N, K+1)
    joined = (case.values[None] > thresholds[:, None, None]).sum(dim=2)  # (S, N): values are sorted
    return correct.gather(1, joined.T).sum(dim=0)  # (S,)


def calibrate_threshold(cases: list[GateCase]) -> float:
    """tau: the most correct predictions over all cases with no case below theta0 alone."""
    if not cases:
        return math.inf
    thresholds = candidate_thresholds(cases)  # (S,)
    counts = torch.stack([correct_counts(c, thresholds) for c in cases])  # (cases, S)
    zero_shot = torch.stack([prefix_correct(c)[:, 0].sum() for c in cases])  # (cases,)
    allowed = (counts >= zero_shot[:, None]).all(dim=0)  # (S,); the largest threshold always passes
    total = torch.where(allowed, counts.sum(dim=0), -1)
    best = int((total == total.max()).nonzero().max())  # ties: the larger tau
    # The largest candidate keeps every calibration expert out: generalize that to +inf.
    return math.inf if best == len(thresholds) - 1 else float(thresholds[best])


def gate_selection(selection: torch.Tensor, values: torch.Tensor, threshold: float) -> torch.Tensor:
    """(N, K) selection with every expert whose similarity is <= tau replaced by -1 (no expert)."""
    return selection.masked_fill(values <= threshold, -1)
