"""Checkpoint arguments as the store takes them: local paths or hub ids, and the base they record.

    resolve_input("org/name@v1")     Input(path=<the cached snapshot>, hub=HubRef("org/name", "v1", <commit>))
    infer_base(["ckpt_a", "ckpt_b"])  the base they all record (base_model_name_or_path in
                                      adapter_config.json, _name_or_path in config.json)

Resolution is `fusion.hub`'s: a local path wins, HF_HUB_OFFLINE is honoured, and every failure
is one line naming the argument and the fix. huggingface_hub is imported only for an id.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..hub import recorded_base, resolve_checkpoint
from .manifest import HubRef

__all__ = ["Input", "resolve_input", "infer_base"]


@dataclass(frozen=True)
class Input:
    """A checkpoint argument, resolved: what the user gave, where it is, and its hub record."""

    text: str
    path: Path
    hub: HubRef | None = None

    @property
    def source(self) -> str:
        """Where the store records it was read: an absolute path (for an id, its snapshot folder)."""
        return str(self.path.resolve())

    def default_name(self, fallback: str) -> str:
        """A task name: the repository's name for a hub id (its snapshot folder is a commit hash)."""
        return self.hub.id.split("/")[1] if self.hub else fallback


def resolve_input(value: str | os.PathLike) -> Input:
    resolved = resolve_checkpoint(value)
    hub = HubRef(id=resolved.hub_id, revision=resolved.revision, commit=resolved.commit) if resolved.from_hub else None
    return Input(os.fspath(value), Path(resolved.path), hub)


def infer_base(checkpoints: Sequence[str | os.PathLike]) -> str:
    """The base every checkpoint records, if they agree and it resolves; else one line asking for --base."""
    records = {}
    for value in checkpoints:
        text = os.fspath(value)
        recorded = recorded_base(resolve_checkpoint(text).path)
        if recorded is None:
            raise ValueError(f"{text}: records no base model (no base_model_name_or_path in adapter_config.json, no "
                             "_name_or_path in config.json); pass --base")
        records[text] = recorded
    if len(set(records.values())) > 1:
        listed = ", ".join(f"{text} records {base!r}" for text, base in records.items())
        raise ValueError(f"the checkpoints record different bases ({listed}); pass --base with the one they share")
    base = next(iter(records.values()))
    try:
        resolve_checkpoint(base)
    except ValueError as err:
        raise ValueError(f"the checkpoints record the base {base!r}, which does not resolve ({err}); pass --base") from None
    return base
