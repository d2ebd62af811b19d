"""Trigger rescalers from the per-task, per-tensor L1 sums of one unify pass.

Three modes (REFERENCE.md, "Unify" step 4), all from the same two `(T, K)` float64 tables,
`delta_l1[i, k] = ||delta_i[k]||_1` and `masked_l1[i, k] = ||M_i[k] * u[k]||_1`:

- `model`        lambda_i = sum_k delta_l1 / sum_k masked_l1 (the paper; keeps each task's L1 norm)
- `tensor-mean`  lambda_i = sum_k delta_l1 / n_k / sum_k masked_l1 / n_k (the official code)
- `tensor`       lambda_ik = delta_l1 / masked_l1, one per task per tensor

A zero denominator gives lambda = 0: nothing of that task survives there, and 0 rebuilds it.
"""

from __future__ import annotations

import torch

RESCALER_MODES = ("model", "tensor-mean", "tensor")

__all__ = ["RESCALER_MODES", "compute_rescalers", "check_mode"]


def check_mode(mode: str) -> str:
    if mode not in RESCALER_MODES:
        raise ValueError(f"unknown rescaler mode {mode!r}; use one of {', '.join(RESCALER_MODES)}")
    return mode


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)


def compute_rescalers(delta_l1: torch.Tensor, masked_l1: torch.Tensor, numels: torch.Tensor, mode: str) -> torch.Tensor:
    """`(T, K)` float64 rescalers, one column per tensor (constant along K for the scalar modes)."""
    check_mode(mode)
    delta_l1, masked_l1 = delta_l1.double(), masked_l1.double()  # (T, K)
    if mode == "tensor":
        return _safe_ratio(delta_l1, masked_l1)  # (T, K)
    if mode == "tensor-mean":
        weights = 1.0 / numels.double().clamp(min=1)  # (K,)
        delta_l1, masked_l1 = delta_l1 * weights, masked_l1 * weights
    per_task = _safe_ratio(delta_l1.sum(dim=1), masked_l1.sum(dim=1))  # (T,)
    return per_task[:, None].expand_as(delta_l1).clone()  # (T, K)
