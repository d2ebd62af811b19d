"""Trigger rescalers from the per-task, per-tensor L1 sums of one unify pass.

Three modes (REFERENCE.md, "Unify" step 4), all from the same two `(T, K)` float64 tables,
`delta_l1[i, k] = ||delta_i[k]||_1` and `masked_l1[i, k] = ||M_i[k] * u[k]||_1`:

- `model`        lambda_i = sum_k delta_l1 / sum_k masked_l1 (the paper; keeps each task's L1 norm)
- `tensor-mean`  lambda_i = sum_k delta_l1 / n_k / sum_k masked_l1 / n_k (the official code)
- `tensor`       lambda_ik = delta_l1 / masked_l1, one per task per tensor

A zero denominator gives lambda = 0: nothing of that task survives there, and 0 rebuilds it.
"""

from __future__ import annotations

import numpy as np

from .constants import RESCALER_MODES
from .errors import InputError

__all__ = ["compute_rescalers", "check_mode"]


def check_mode(mode: str) -> str:
    if mode not in RESCALER_MODES:
        raise InputError(f"unknown rescaler mode {mode!r}; use one of {', '.join(RESCALER_MODES)}")
    return mode


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, and 0 where den is 0."""
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def compute_rescalers(delta_l1: np.ndarray, masked_l1: np.ndarray, numels: np.ndarray, mode: str) -> np.ndarray:
    """`(T, K)` float64 rescalers, one column per tensor (constant along K for the scalar modes)."""
    check_mode(mode)
    delta_l1 = np.asarray(delta_l1, dtype=np.float64)  # (T, K)
    masked_l1 = np.asarray(masked_l1, dtype=np.float64)  # (T, K)
    if mode == "tensor":
        return _safe_ratio(delta_l1, masked_l1)  # (T, K)
    if mode == "tensor-mean":
        weights = 1.0 / np.maximum(np.asarray(numels, dtype=np.float64), 1.0)  # (K,)
        delta_l1, masked_l1 = delta_l1 * weights, masked_l1 * weights
    per_task = _safe_ratio(delta_l1.sum(axis=1), masked_l1.sum(axis=1))  # (T,)
    return np.repeat(per_task[:, None], delta_l1.shape[1], axis=1)  # (T, K)
