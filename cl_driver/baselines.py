"""Merged-model baselines, computed tensor by tensor from checkpoints on disk.

- continual task arithmetic: theta0 + alpha * sum_i delta_i, delta_i = theta_i - theta0 of the
  fine-tunes from theta0 (the same checkpoints ConDU and the individual experts use);
- MagMax (Marczak et al., 2024): per element, the delta of largest magnitude among the tasks
  seen, times `scale`. As in the MagMax paper, its task vectors come from *sequential*
  fine-tuning (task i starts from the model after task i-1): delta_i = theta_i^seq - theta0.

Only floating-point tensors are merged; integer buffers are the base's.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from typing import Callable, Sequence

import torch
from safetensors import safe_open

from fusion import is_fusable

StateDict = dict[str, torch.Tensor]


def sum_deltas(deltas: torch.Tensor, alpha: float) -> torch.Tensor:
    """(T, ...) -> (...): alpha * sum of the task vectors."""
    return alpha * deltas.sum(dim=0)


def max_magnitude(deltas: torch.Tensor, scale: float) -> torch.Tensor:
    """(T, ...) -> (...): per element, the delta of largest |value| (first task on ties), scaled."""
    winner = deltas.abs().argmax(dim=0, keepdim=True)  # (1, ...)
    return scale * deltas.gather(0, winner).squeeze(0)


def merge_checkpoints(base: StateDict, checkpoints: Sequence[str | os.PathLike],
                      merge: Callable[[torch.Tensor], torch.Tensor]) -> StateDict:
    """theta0 + merge(stacked deltas), one tensor at a time, reading the checkpoints lazily."""
    merged = {}
    with ExitStack() as stack:
        files = [stack.enter_context(safe_open(str(p), framework="pt")) for p in checkpoints]
        for name, tensor in base.items():
            if not is_fusable(tensor) or not files:
                merged[name] = tensor
                continue
            deltas = torch.stack([f.get_tensor(name).float() - tensor.float() for f in files])  # (T, ...)
            merged[name] = (tensor.float() + merge(deltas)).to(tensor.dtype)
    return merged


def task_arithmetic(base: StateDict, checkpoints: Sequence[str | os.PathLike], *, alpha: float) -> StateDict:
    return merge_checkpoints(base, checkpoints, lambda d: sum_deltas(d, alpha))


def magmax(base: StateDict, checkpoints: Sequence[str | os.PathLike], *, scale: float) -> StateDict:
    return merge_checkpoints(base, checkpoints, lambda d: max_magnitude(d, scale))
