"""Checkpoint arguments as the store takes them: local paths or hub ids, and the base they record.

    resolve_input("org/name@v1")     Input(path=<the cached snapshot>, hub=HubRef("org/name", "v1", <commit>))
    infer_base(["ckpt_a", "ckpt_b"])  InferredBase: the base they all record (base_model in README.md's
                                      front matter, base_model_name_or_path in adapter_config.json,
                                      _name_or_path in config.json, the first found), and where

Resolution is `fusion.hub`'s: a local path wins, HF_HUB_OFFLINE is honoured, and every failure
is one line naming the argument and the fix. huggingface_hub is imported only for an id.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import InputError
from ..hub import BASE_RECORDS, base_records, resolve_checkpoint
from ..io import open_checkpoint
from ..io.adapter import factor_config, read_adapter_config
from ..io.checkpoint import is_adapter_folder
from .manifest import HubRef

__all__ = ["Input", "resolve_input", "Recorded", "InferredBase", "infer_base"]


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


@dataclass(frozen=True)
class Recorded:
    """The base one checkpoint argument records, and where: the first of fusion.hub.BASE_RECORDS it has."""

    checkpoint: str  # the argument as given
    base: str
    key: str  # base_model, base_model_name_or_path or _name_or_path
    where: str  # its file: ckpt_a/README.md, or README.md of org/name for a hub id

    def __str__(self) -> str:
        return f"{self.key} in {self.where}"


@dataclass(frozen=True)
class InferredBase:
    """The base `unify` took from the checkpoints' own records, when no base was given."""

    base: str  # as recorded: a hub id or a path
    records: tuple[Recorded, ...]  # one per checkpoint, in order
    # Every checkpoint a LoRA adapter of one configuration (the base a model, so the store is dense):
    # about what a factor-space store of them would take; else None.
    factor_store_bytes: int | None = None

    @property
    def said_by(self) -> str:
        """`base_model in ckpt_a/README.md, agreed by 2 checkpoints`: the record it was taken from."""
        agreed = f", agreed by {len(self.records)} checkpoints" if len(self.records) > 1 else ""
        return f"{self.records[0]}{agreed}"


_NONE_RECORDED = ", ".join(f"no {key} in {name}" for name, key in BASE_RECORDS)


def infer_base(checkpoints: Sequence[str | os.PathLike]) -> InferredBase:
    """The base every checkpoint records, if they agree and it resolves; else one line asking for --base."""
    records, paths = [], []
    for value in checkpoints:
        text = os.fspath(value)
        resolved = resolve_checkpoint(text)
        found = next(base_records(resolved.path), None)
        if found is None:
            raise InputError(f"{text}: records no base model ({_NONE_RECORDED}); pass --base")
        where = f"{found.file} of {text}" if resolved.from_hub else os.path.join(text, found.file)
        records.append(Recorded(text, found.base, found.key, where))
        paths.append(resolved.path)
    inferred = InferredBase(records[0].base, tuple(records))
    if len({r.base for r in records}) > 1:
        listed = ", ".join(f"{r.checkpoint} {r.base!r} ({r})" for r in records)
        raise InputError(f"the checkpoints record different bases: {listed}; pass --base with the one they share")
    try:
        base = resolve_checkpoint(inferred.base).path
    except ValueError as err:
        raise InputError(f"the checkpoints record the base {inferred.base!r} ({inferred.said_by}), which does not "
                         f"resolve ({err}); pass --base") from None
    if is_adapter_folder(base):
        return inferred  # factor space already
    return InferredBase(inferred.base, inferred.records, factor_store_bytes(paths))


def factor_store_bytes(paths: Sequence[Path]) -> int | None:
    """About what a factor-space store of these checkpoints takes, when every one is a LoRA adapter of
    one configuration with the same factor shapes (so they may share an initial adapter): one
    adapter's factors for the unified delta, and a bit per factor element per task. Else None."""
    layouts, itemsize = [], {}
    try:
        for path in paths:
            if not is_adapter_folder(path):
                return None
            with open_checkpoint(path) as adapter:
                shapes = {n: adapter.info(n).shape for n in adapter.keys()}
                itemsize = itemsize or {n: adapter.info(n).dtype.itemsize for n in adapter.keys()}
            layouts.append((factor_config(read_adapter_config(path)), shapes))
    except (ValueError, OSError):
        return None  # unify itself says what is wrong with it
    if not layouts or any(layout != layouts[0] for layout in layouts):
        return None
    numel = {n: math.prod(shape) for n, shape in layouts[0][1].items()}
    return sum(k * itemsize[n] for n, k in numel.items()) + len(paths) * sum(-(-k // 8) for k in numel.values())
