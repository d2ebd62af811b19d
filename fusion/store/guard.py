"""A change never silently destroys a stored task: the checks a change passes before it commits.

The store may be a task's only copy, and one bad input can wreck tasks that are not its own: a
single weight of 3e38 in a new checkpoint becomes the unified delta's magnitude there, and every
earlier task that agrees in sign gets a rescaler near 1e-37, so its rebuild collapses onto that
one weight (its model becomes the base). Two checks refuse such a change, in one line naming the
task and the tensor, and leave the store as it was; `allow_degrade` (`--allow-degrade`) lets it
through and the manifest's history says so (fusion.store.manifest.HistoryEvent).

1. Magnitude, while the pass reads a new checkpoint: no |delta| above MAX_DELTA_OVER_RMS times
   the RMS of the base tensor it changes (ABSOLUTE_DELTA_BOUND where that is smaller: a base
   tensor of zeros has no scale of its own). A running max |delta| per chunk and the base's sum
   of squares per tensor, checked as each tensor's last chunk is done.
2. Drift, after the pass: each stored task's new rebuild n = lambda' M' u' against its rebuild in
   the current generation p, which is the row it entered the pass as. The kernels measure the
   sums A, E, D, Z, C (fusion.fidelity) of n against p in the same pass (`Originals.drift`), so

       <n, p> = lambda' (A - E)     ||n||^2 = lambda'^2 A     ||p||^2 = C
       ||n - p||^2 = (lambda' - 1)^2 A + 2 (lambda' - 1) E + D + Z      (per tensor)

   A task is damaged when its cosine falls below MIN_COSINE or its rescaler changes by more than
   MAX_RESCALER_CHANGE either way. The tensor named is the one holding the largest share of
   ||n - p||^2: where the change to the task happened.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..errors import InputError
from .manifest import TaskEntry

__all__ = ["MIN_COSINE", "MAX_RESCALER_CHANGE", "MAX_DELTA_OVER_RMS", "ABSOLUTE_DELTA_BOUND", "ALLOW", "Finding",
           "TaskDrift", "MagnitudeWatch", "chunk_peak", "delta_bound", "drift_of", "assess", "refuse"]

# Bounds, far from where ordinary continual steps go and far from where destroyed tasks land.
# Ordinary: a stored task dominated by a much larger new one keeps about half of its weights, at the
# new task's magnitudes, which are independent of its own: cosine sqrt(1/2) * E|x|^2 / E[x^2],
# 0.45 for Gaussian deltas and about 0.3 for heavy-tailed ones. Measured, the lowest cosine of a
# stored task against its previous rebuild: 0.80 in the quick mini-MTIL run (4 tasks, 3 steps, each
# rescaler mode), 0.44 over every change of the store tests (a LoRA adapter counted dense, added to
# full fine-tunes; 0.85 otherwise), 0.47 over 2400 random stores of 2 to 6 Gaussian tasks whose
# scales differ up to 4x, 0.75 over the Hypothesis stores of checkpoint_sets. Destroyed: a rebuild
# pulled onto the few weights an outlier holds keeps cosine ~ sqrt(their share of the task), 0.06 to
# 0.13 in the tests' cases and less in a real model; a task whose mask empties has cosine 0.
MIN_COSINE = 0.2
# Ordinary steps change a rescaler by at most 1.2x (mini-MTIL) and 3.7x (the store tests); the
# tests' collapse onto one outlier (at half the magnitude bound) by 340x, a weight of 3e38 by 3e37x.
MAX_RESCALER_CHANGE = 100.0
# A fine-tune moves weights by a fraction of their size: the largest |delta| of the mini-MTIL run is
# 0.23 x its base tensor's RMS (2e-5 of this bound). 1e4 x is far outside what training does and
# far inside what a corrupted or mis-scaled file holds (3e38).
MAX_DELTA_OVER_RMS = 1e4
# For base tensors of zeros or nearly (zero-initialised biases, PEFT's lora_B), which have no scale of
# their own: 1e4 x the RMS of a typical weight (0.01).
ABSOLUTE_DELTA_BOUND = 100.0
ALLOW = "pass --allow-degrade (Python: allow_degrade=True) to accept it"


class Finding(NamedTuple):
    """A damage one check found: the task it damages (by number) and the one-line refusal."""

    number: int
    message: str


# ---- 1. magnitude, in the pass ----------------------------------------------------------------------


def chunk_peak(row: np.ndarray, base: np.ndarray | None, scratch: np.ndarray) -> float:
    """max |row - base| (or max |row| without a base) over one chunk, as float32 deltas; NaN if any is.
    `scratch` holds the difference: no temporary of the chunk's size."""
    delta = row if base is None else np.subtract(row, base, out=scratch[: row.size])
    return max(float(delta.max()), -float(delta.min())) if delta.size else 0.0


def delta_bound(base_rms: float) -> tuple[float, bool]:
    """The largest |delta| accepted on a base tensor of this RMS, and whether it is the absolute bound."""
    relative = MAX_DELTA_OVER_RMS * base_rms
    return (relative, False) if relative >= ABSOLUTE_DELTA_BOUND else (ABSOLUTE_DELTA_BOUND, True)


def _square_sum(base: np.ndarray) -> float:
    total = float(np.dot(base, base))  # float32 BLAS: fast; overflows only for |theta0| > 1e19
    return total if math.isfinite(total) else float(np.dot(base.astype(np.float64), base.astype(np.float64)))


class MagnitudeWatch:
    """Per fused tensor, the base's sum of squares and each new task's largest |delta|, chunk by chunk.

    `chunk` runs on the pass's reader thread, `tensor_done` in its emit stage after the tensor's last
    chunk: by then every chunk of that tensor has been read."""

    def __init__(self, new: list, numels: dict[str, int], largest: int, *, operation: str, allow: bool):
        self.new, self.numels, self.operation, self.allow = new, numels, operation, allow
        self.scratch = np.empty(largest, dtype=np.float32)
        self.base_sq: dict[str, float] = {}
        self.peaks: dict[str, np.ndarray] = {}
        self.findings: list[Finding] = []

    def chunk(self, name: str, rows: np.ndarray, base: np.ndarray, weights: bool) -> None:
        """rows (T_new, n): the new tasks' weights (`weights`) or deltas on the chunk; base (n,): theta0."""
        self.base_sq[name] = self.base_sq.get(name, 0.0) + _square_sum(base)
        peaks = [chunk_peak(row, base if weights else None, self.scratch) for row in rows]
        self.peaks[name] = np.fmax(self.peaks.get(name, np.zeros(len(rows))), peaks)  # (T_new,); NaN left to the L1 check

    def tensor_done(self, name: str) -> None:
        """Refuse (or, allowed, record) a new task whose delta on `name` is out of bounds."""
        rms = math.sqrt(self.base_sq.pop(name, 0.0) / max(self.numels[name], 1))
        bound, absolute = delta_bound(rms)
        for task, peak in zip(self.new, self.peaks.pop(name, []).tolist()):
            if peak > bound:
                scale = (f"the absolute bound {bound:g} (its base tensor has RMS {rms:.3g}: zeros, or too small "
                         "to scale a bound)" if absolute else
                         f"{MAX_DELTA_OVER_RMS:g} x its base tensor's RMS {rms:.3g} (bound {bound:.3g})")
                message = (f"{self.operation} {task.where(name)}: tensor {name!r} of task {task.number} ({task.name}) "
                           f"has a delta of {peak:.3g}, over {scale}: a corrupt or mis-scaled checkpoint would "
                           f"destroy the stored tasks; the store is unchanged; fix the tensor, or {ALLOW}")
                if not self.allow:
                    raise InputError(message)
                self.findings.append(Finding(task.number, message))


# ---- 2. drift of the stored tasks, after the pass -----------------------------------------------------


@dataclass(frozen=True)
class TaskDrift:
    """How a change moves one stored task's rebuild (n) from its rebuild in the current generation (p)."""

    number: int
    name: str
    cosine: float  # cos(n, p); 1 when both are zero, 0 when one is
    l2_ratio: float | None  # ||n|| / ||p||; None when p is zero
    rescaler_change: float | None  # lambda' / lambda (per tensor in mode `tensor`: their weighted geometric mean)
    tensor: str | None  # the tensor with the largest share of ||n - p||^2; None when nothing moved
    share: float  # that share

    @property
    def damaged(self) -> bool:
        change = self.rescaler_change
        too_far = change is not None and (change > MAX_RESCALER_CHANGE or change < 1 / MAX_RESCALER_CHANGE)
        return self.cosine < MIN_COSINE or too_far

    def as_dict(self) -> dict:
        return {"number": self.number, "name": self.name, "cosine": self.cosine, "l2_ratio": self.l2_ratio,
                "rescaler_change": self.rescaler_change, "tensor": self.tensor, "share": self.share}


def drift_of(sums: np.ndarray, rescalers: np.ndarray) -> tuple[float, float | None, np.ndarray]:
    """cosine, L2 ratio and per-tensor ||n - p||^2 (K,) of one task from its (K, 5) drift sums and (K,) new
    rescalers (as float32, the factor its rebuild is multiplied by)."""
    lam = np.asarray(rescalers, dtype=np.float64).astype(np.float32).astype(np.float64)  # (K,)
    a, e, d, z, c = np.asarray(sums, dtype=np.float64).T  # each (K,)
    # Kept within | ||n|| -/+ ||p|| |^2: with u far above p (an outlier) the terms around lambda = 1
    # cancel to rounding noise, and the triangle inequality still names the tensor that moved.
    new_k, old_k = lam * np.sqrt(a), np.sqrt(c)  # (K,)
    error2 = np.clip((lam - 1) ** 2 * a + 2 * (lam - 1) * e + d + z, (new_k - old_k) ** 2, (new_k + old_k) ** 2)
    dot, new2, old2 = float((lam * (a - e)).sum()), float((lam * lam * a).sum()), float(c.sum())
    if new2 == 0 or old2 == 0:
        cosine = 1.0 if new2 == old2 else 0.0
    else:
        cosine = max(-1.0, min(1.0, dot / math.sqrt(new2 * old2)))
    return cosine, (math.sqrt(new2 / old2) if old2 > 0 else None), error2


def rescaler_change(old: np.ndarray, new: np.ndarray, weights: np.ndarray) -> float | None:
    """lambda' / lambda over the tensors where both are > 0, as a geometric mean weighted by `weights`
    (each tensor's ||p||^2: a tensor that holds little of the task moves its scale little); one
    scalar in modes `model` and `tensor-mean`. None where no tensor has both."""
    both = (old > 0) & (new > 0) & (weights > 0)  # (K,)
    if not both.any():
        return None
    w = weights[both] / weights[both].sum()
    return float(np.exp((w * np.log(new[both] / old[both])).sum()))


def assess(keep: list[TaskEntry], names: list[str], rescalers: np.ndarray, sums: np.ndarray) -> list[TaskDrift]:
    """The drift of every stored task carried by a pass: `rescalers` (T, K) the new ones, `sums`
    (T, K, 5) the drift sums; rows 0..len(keep)-1 are the stored tasks."""
    out = []
    for i, task in enumerate(keep):
        cosine, ratio, error2 = drift_of(sums[i], rescalers[i])
        old = np.array([task.rescaler_of(n) for n in names], dtype=np.float64)  # (K,)
        change = rescaler_change(old, np.asarray(rescalers[i], dtype=np.float64), sums[i][:, 4])
        total = float(error2.sum())
        worst = int(np.argmax(error2)) if total > 0 else None
        out.append(TaskDrift(task.number, task.name, cosine, ratio, change, None if worst is None else names[worst],
                             float(error2[worst]) / total if worst is not None else 0.0))
    return out


def _what(drift: TaskDrift) -> str:
    parts = []
    if drift.cosine < MIN_COSINE:
        parts.append(f"cosine {drift.cosine:.3f} against its current rebuild (bound {MIN_COSINE})")
    change = drift.rescaler_change
    if change is not None and (change > MAX_RESCALER_CHANGE or change < 1 / MAX_RESCALER_CHANGE):
        parts.append(f"its rescaler changed {change:.3g}x (bound {MAX_RESCALER_CHANGE:g}x either way)")
    return " and ".join(parts)


def refuse(drifts: list[TaskDrift], *, change: str, fix: str) -> list[Finding]:
    """One finding per damaged task, worst (lowest cosine) first. `change` says what was asked
    (`add ckpt/`, `remove task 2 (b)`), `fix` what the user can do instead."""
    damaged = sorted((d for d in drifts if d.damaged), key=lambda d: d.cosine)
    findings = []
    for d in damaged:
        where = f"; most of the change is in tensor {d.tensor!r} ({d.share:.0%} of it)" if d.tensor else ""
        findings.append(Finding(d.number, f"{change}: would damage task {d.number} ({d.name}): {_what(d)}{where}; "
                                          f"the store is unchanged; {fix}, or {ALLOW}"))
    return findings
