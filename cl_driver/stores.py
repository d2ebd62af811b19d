"""The ConDU stores of a run, through fusion's public API: the continual step (unify the first
task, add each later one, attach its class prototypes) and what the loop reads back.

A step an interrupted run already made is not made twice: a task the store holds is not added
again, and prototypes already attached stay as they are.
"""

from __future__ import annotations

import os

import torch

from fusion import Store

PROTOTYPES = "prototypes"  # the attachment (and its tensor) that holds a task's (C, D) prototypes


def fuse_task(path: str | os.PathLike, base: str | os.PathLike, checkpoint: str | os.PathLike, name: str,
              prototypes: torch.Tensor, *, rescaler: str, kernel: str | None) -> Store:
    """Task `name` (its fine-tune from theta0) in the store at `path`, with its (C, D) prototypes.

    A checkpoint file, or an adapter folder: with the initial adapter as base, the store fuses
    adapters in factor space."""
    if not Store.exists(path):
        store = Store.unify(path, base, [checkpoint], names=[name], rescaler=rescaler, kernel=kernel)
    else:
        store = Store.open(path, kernel=kernel)
        if name not in [t.name for t in store.tasks]:
            store.add(checkpoint, name=name)
    if PROTOTYPES not in store.task(name).attachments:
        store.attach(name, PROTOTYPES, {PROTOTYPES: prototypes.contiguous()})
    return store


def learned_prototypes(store: Store, i: int) -> list[torch.Tensor]:
    """The (C_t, D) prototypes of tasks 1..i+1 of a store, in task order."""
    return [torch.from_numpy(store.attachment(t + 1, PROTOTYPES)[PROTOTYPES]) for t in range(i + 1)]


def fidelity_of(store: Store) -> list[dict]:
    """Per stored task: its name and its reconstruction fidelity (cosine, relative L2)."""
    return [{"task": t.name, **t.fidelity} for t in store.tasks]


def store_sizes(info: dict) -> dict:
    """Bytes on disk of a store next to its base and T separate fine-tuned checkpoints."""
    return {"tasks": len(info["tasks"]), "base_bytes": info["base"]["bytes"], **info["sizes"],
            "separate_checkpoints_bytes": info["separate_checkpoints_bytes"], "savings": info["savings"]}
