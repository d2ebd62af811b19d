"""Tasks as callers see them: a TaskRecord per stored task, chosen by number or by name.

Names are never numbers (fusion.store.layout), so `3` and `cola` cannot be confused, and a task
keeps its number for life.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import msgspec

from ..dtypes import DTYPES
from ..errors import InputError
from . import layout
from .manifest import Manifest, TaskEntry

__all__ = ["TaskRecord", "DEGRADED_REL_L2", "select_task", "default_task_name"]

# A task rebuilt at least this far from its fine-tune (relative L2) is no nearer to it than the base
# is: its trigger and rescaler no longer serve it.
DEGRADED_REL_L2 = 1.0


@dataclass(frozen=True)
class TaskRecord:
    """One stored task, as the manifest describes it."""

    number: int  # kept for life
    name: str
    source: str  # the checkpoint it came from: an absolute path, or a hub id
    added_generation: int
    rescaler: float | dict[str, float]  # one, or one per tensor (rescaler mode "tensor")
    l1: float  # L1 norm of the delta this generation was unified from
    mask_density: float  # fraction of fused elements whose mask bit is set
    fidelity: dict  # cosine, rel_l2 (rebuilt against the fine-tune's delta), generation measured at
    private: tuple[str, ...] = ()  # tensors kept whole (absent from the base, or another shape)
    zero_filled: tuple[str, ...] = ()  # base tensors the checkpoint lacked, counted as unchanged
    files: tuple[str, ...] = ()  # its own small files (config.json, tokenizer files)
    attachments: tuple[str, ...] = ()  # names of the data kept with it (fusion.Store.attach)
    kind: str = "model"  # "adapter": it came from a PEFT LoRA adapter
    hub: dict | None = None  # {"id", "revision", "commit"} when it came from the hub
    # What decouple writes it in by default: its own checkpoint's dtype ("bfloat16"), one per fused
    # tensor where they differ, or None where the store did not record it (then the base's).
    dtype: str | dict[str, str] | None = None

    @classmethod
    def of(cls, task: TaskEntry) -> "TaskRecord":
        source = task.source.hub.id if task.source.hub else task.source.path
        fidelity = {"cosine": task.fidelity.cosine, "rel_l2": task.fidelity.rel_l2, "generation": task.fidelity.generation}
        rescaler = dict(task.rescaler) if isinstance(task.rescaler, dict) else task.rescaler
        return cls(task.number, task.name, source, task.added_generation, rescaler, task.l1, task.mask_density,
                   fidelity, tuple(task.private_tensors), tuple(task.zero_filled), tuple(task.files),
                   tuple(task.attachments), task.kind, msgspec.to_builtins(task.source.hub), _dtype_names(task.dtype))

    def rescaler_of(self, tensor: str) -> float:
        return self.rescaler[tensor] if isinstance(self.rescaler, dict) else self.rescaler

    @property
    def degraded(self) -> bool:
        """Rebuilt farther from its fine-tune than the base is (rel_l2 >= 1), as last measured."""
        rel_l2 = self.fidelity["rel_l2"]
        return rel_l2 is not None and rel_l2 >= DEGRADED_REL_L2

    def as_dict(self) -> dict:
        return {"number": self.number, "name": self.name, "source": self.source,
                "added_generation": self.added_generation, "rescaler": self.rescaler, "l1": self.l1,
                "mask_density": self.mask_density, "fidelity": self.fidelity, "private": list(self.private),
                "zero_filled": list(self.zero_filled), "files": list(self.files), "attachments": list(self.attachments),
                "kind": self.kind, "hub": self.hub, "degraded": self.degraded, "dtype": self.dtype}


def _dtype_names(recorded: str | dict[str, str] | None) -> str | dict[str, str] | None:
    """A task's recorded dtype codes (BF16) as the names users write (bfloat16)."""
    if isinstance(recorded, dict):
        return {tensor: DTYPES[code].name for tensor, code in recorded.items()}
    return DTYPES[recorded].name if recorded else None


def select_task(manifest: Manifest, task: int | str, store_dir: Path) -> TaskEntry:
    """A task by number (an int or a string of digits) or by name."""
    found = None
    if isinstance(task, int) and not isinstance(task, bool):
        found = manifest.task_by_number(task)
    elif isinstance(task, str):
        found = manifest.task_by_number(int(task)) if task.strip().isdigit() else manifest.task_by_name(task)
    if found is None:
        choices = ", ".join(f"{t.number} ({t.name})" for t in manifest.tasks)
        raise InputError(f"{store_dir}: no task {task!r}; choose a number or a name: {choices}")
    return found


def default_task_name(raw: str, taken: Sequence[str]) -> str:
    name, k = layout.clean_task_name(raw), 2
    candidate = name
    while candidate in taken:
        candidate, k = f"{name}-{k}", k + 1
    return candidate
