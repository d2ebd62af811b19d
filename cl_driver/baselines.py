"""Merged-model baselines, computed from checkpoints on disk.

All at once, tensor by tensor, from the task vectors of the tasks seen so far:

- continual task arithmetic: theta0 + alpha * sum_i delta_i, delta_i = theta_i - theta0 of the
  fine-tunes from theta0 (the same checkpoints ConDU and the individual experts use);
- MagMax (Marczak et al., 2024): per element, the delta of largest magnitude among the tasks
  seen, times `scale`. As in the MagMax paper, its task vectors come from *sequential*
  fine-tuning (task i starts from the model after task i-1): delta_i = theta_i^seq - theta0.

One task at a time, a running merged task vector m_t folded with the next fine-tune's delta
(`step(state, delta)`; continual merging as FusionBench's `fusion_bench/method/opcm/` runs it,
on the fine-tunes from theta0):

- continual TIES (FusionBench's ContinualTiesMergingForCLIP): m_1 = lambda * delta_1, then
  m_t = m_{t-1} + lambda * TIES(m_{t-1}, delta_t): the running merged vector and the new task
  vector are TIES-merged as two rows (trim, elect, disjoint merge; Yadav et al., 2023), and the
  result is added, scaled, to the running vector. It does not re-merge every seen task vector.
- OPCM (Tang et al., 2025, "Merging Models on the Fly Without Retraining"; FusionBench's
  OPCMForCLIP): each linear weight of the new task vector loses its components on the singular
  directions of the running merged weight (`opcm_project`); the running sum of projected task
  vectors is rescaled to the mean norm of the task vectors seen (`opcm_step`).

Only floating-point tensors are merged; integer buffers are the base's.
"""

from __future__ import annotations

import math
import os
from contextlib import ExitStack
from typing import Callable, NamedTuple, Sequence

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


# ---------------------------------------------------------------- one task at a time


class Running(NamedTuple):
    """A continual merge after t tasks: the merged task vector, and what its rule carries along."""
    delta: StateDict  # m_t, per fused tensor, float32
    lam: float = 1.0  # OPCM: lambda_t, what the running sum of projected task vectors was divided by
    norms: tuple[float, ...] = ()  # OPCM: ||delta_1||, ..., ||delta_t||, over the whole model


def task_vector(base: StateDict, checkpoint: str | os.PathLike) -> StateDict:
    """delta = theta - theta0 of every fused (floating-point) tensor, in float32."""
    with safe_open(str(checkpoint), framework="pt") as f:
        return {name: f.get_tensor(name).float() - tensor.float() for name, tensor in base.items() if is_fusable(tensor)}


def apply_delta(base: StateDict, delta: StateDict) -> StateDict:
    """theta0 + delta, each tensor back in the base's dtype; the others are the base's."""
    return {name: (tensor.float() + delta[name]).to(tensor.dtype) if name in delta else tensor
            for name, tensor in base.items()}


def fold(base: StateDict, checkpoints: Sequence[str | os.PathLike],
         step: Callable[[Running | None, StateDict], Running]) -> StateDict:
    """The reference of a continual merge: theta0 + m_T after folding the checkpoints in, in order."""
    state = None
    for checkpoint in checkpoints:
        state = step(state, task_vector(base, checkpoint))
    return apply_delta(base, state.delta)


def flatten(delta: StateDict) -> torch.Tensor:
    """{name: tensor} -> (n,): every tensor, in sorted name order (FusionBench's order)."""
    return torch.cat([delta[name].reshape(-1) for name in sorted(delta)])


def unflatten(vector: torch.Tensor, like: StateDict) -> StateDict:
    """(n,) -> {name: tensor} shaped as `like`, the inverse of `flatten`."""
    out, start = {}, 0
    for name in sorted(like):
        size = like[name].numel()
        out[name] = vector[start:start + size].reshape(like[name].shape)
        start += size
    return out


# -- TIES (Yadav et al., 2023), as FusionBench's ties_merging_utils computes it


def ties_trim(vectors: torch.Tensor, keep: float) -> torch.Tensor:
    """(T, n) -> (T, n): per row, the entries whose magnitude is at least the row's k-th smallest,
    k = n - floor(keep * n); the rest set to 0. That keeps floor(keep * n) + 1 entries a row when
    magnitudes do not tie (FusionBench's topk_values_mask); keep = 1 keeps everything."""
    n = vectors.shape[1]
    k = n - int(n * keep)
    if k < 1:
        return vectors.clone()
    threshold = vectors.abs().kthvalue(k, dim=1, keepdim=True).values  # (T, 1)
    return vectors * (vectors.abs() >= threshold)


def ties_elect(trimmed: torch.Tensor) -> torch.Tensor:
    """(T, n) -> (n,) signs of the summed mass; an entry that sums to 0 takes the majority sign,
    the sign of the sum of all elected signs (FusionBench's resolve_sign)."""
    signs = torch.sign(trimmed.sum(dim=0))  # (n,)
    return torch.where(signs == 0, torch.sign(signs.sum()), signs)


def ties_disjoint(trimmed: torch.Tensor, signs: torch.Tensor, merge: str) -> torch.Tensor:
    """(T, n), (n,) -> (n,): the entries that agree with the elected sign, summed, or averaged over
    how many agree (`mean`, the TIES paper's disjoint mean). A non-positive elected sign takes the
    negative entries, as FusionBench's disjoint_merge does."""
    agree = torch.where(signs > 0, trimmed > 0, trimmed < 0)  # (T, n)
    selected = trimmed * agree
    total = selected.sum(dim=0)  # (n,)
    if merge == "sum":
        return total
    return total / agree.sum(dim=0).clamp(min=1)


def ties_merge(vectors: torch.Tensor, *, keep: float, merge: str) -> torch.Tensor:
    """(T, n) task vectors -> (n,) their TIES merge (before the scale lambda)."""
    trimmed = ties_trim(vectors, keep)
    return ties_disjoint(trimmed, ties_elect(trimmed), merge)


def continual_ties_step(state: Running | None, delta: StateDict, *, keep: float, scale: float,
                        merge: str) -> Running:
    """m_1 = scale * delta_1; m_t = m_{t-1} + scale * TIES([m_{t-1}, delta_t]) over the whole model
    (trimmed to the top `keep` of each row's magnitudes across every tensor)."""
    if state is None:
        return Running({name: scale * d for name, d in delta.items()})
    rows = torch.stack([flatten(state.delta), flatten(delta)])  # (2, n)
    merged = flatten(state.delta) + scale * ties_merge(rows, keep=keep, merge=merge)  # (n,)
    return Running(unflatten(merged, delta))


# -- OPCM (Tang et al., 2025), as FusionBench's OPCMForCLIP computes it


def is_linear_weight(name: str, tensor: torch.Tensor) -> bool:
    """The weights OPCM projects: a linear layer's 2-D weight. FusionBench picks nn.Linear modules;
    in a state dict, Hugging Face CLIP's other 2-D weights are its embedding tables (`*_embedding`),
    and PEFT's LoRA factors of a linear layer are linear weights too."""
    return tensor.ndim == 2 and "embedding" not in name


def split_rank(singular: torch.Tensor, alpha: float) -> int:
    """(k,) singular values, descending -> r, the first index (0-based) at which their cumulative
    share exceeds alpha; 0 for a zero matrix. The block of pairs (i, j < r) is protected."""
    total = singular.sum()
    if total <= 0:
        return 0
    above = (singular.cumsum(dim=0) / total > alpha).float()  # (k,)
    return int(above.argmax())


def opcm_project(previous: torch.Tensor, task: torch.Tensor, alpha: float) -> torch.Tensor:
    """(m, n), (m, n) -> (m, n): `task` without its components u_i v_j^T on the singular pairs of
    `previous` = U S V^T that OPCM protects: every (i, i), and every (i, j) with i, j < r
    (split_rank). With the full SVD this is FusionBench's U (U^T task V, those entries zeroed) V^T;
    the protected pairs all lie in the first min(m, n) columns, so the thin SVD gives the same."""
    u, s, vh = torch.linalg.svd(previous, full_matrices=False)  # (m, k), (k,), (k, n)
    coords = u.T @ task @ vh.T  # (k, k): task in the pairs u_i v_j^T
    protected = torch.eye(len(s), dtype=torch.bool)
    r = split_rank(s, alpha)
    protected[:r, :r] = True
    return task - u @ (coords * protected) @ vh


def model_norm(delta: StateDict) -> float:
    """||delta||_2 over every tensor of the model together."""
    return math.sqrt(sum(float(d.double().square().sum()) for d in delta.values()))


def opcm_step(state: Running | None, delta: StateDict, *, alpha: float) -> Running:
    """m_1 = delta_1 (lambda_1 = 1). Then, with the linear weights of delta_t projected (opcm_project
    against m_{t-1}) and every other tensor as it is:
        S_t = lambda_{t-1} m_{t-1} + projected delta_t        (the running sum)
        lambda_t = ||S_t|| / mean(||delta_1||, ..., ||delta_t||),   m_t = S_t / lambda_t
    so m_t keeps the mean norm of the task vectors seen."""
    if state is None:
        return Running(dict(delta), 1.0, (model_norm(delta),))
    norms = (*state.norms, model_norm(delta))
    projected = {name: opcm_project(state.delta[name], d, alpha) if is_linear_weight(name, d) else d
                 for name, d in delta.items()}
    running = {name: state.lam * state.delta[name] + projected[name] for name in delta}  # S_t
    size = model_norm(running)
    lam = size / (sum(norms) / len(norms)) if size > 0 else 1.0  # a zero sum stays zero
    return Running({name: s / lam for name, s in running.items()}, lam, norms)
