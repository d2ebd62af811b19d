"""A version 1 store (condu 0.1) to version 2, in place, as one more generation.

Version 1 kept a sha256 per file and fingerprinted the base by its headers only. Migration
checks every file against its sha256 first (a damaged store is not migrated), then records
block checksums of every file, and of the base as it is now: version 1 never recorded the
base's content, so the base must be the one the store was made from (its headers are checked).
Task numbers come from the version 1 file tokens (t0003 is task 3), which never changed; a
purely numeric name, which version 2 refuses, becomes `task-<name>`. Class prototypes become
the attachment `prototypes`. Sources keep their path but no content digest, so their fidelity
is not measured again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from ..io import open_checkpoint
from ..io.files import atomic_write_bytes
from ..io.integrity import digest_file
from . import layout
from .manifest import (VERSION, BaseRef, Digests, Fidelity, Manifest, SourceRef, TaskEntry, TensorEntry, UnifiedEntry,
                       encode_manifest)
from .transaction import writer_lock

__all__ = ["migrate"]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(1 << 22):
            digest.update(data)
    return digest.hexdigest()


def _read_v1(store_dir: Path) -> dict:
    path = store_dir / layout.MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable ({err}); nothing to migrate") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "condu-store" or manifest.get("version") != 1:
        raise ValueError(f"{path}: not a version 1 store (version {manifest.get('version')!r}); nothing to migrate")
    return manifest


def _check_v1_files(store_dir: Path, files: dict) -> None:
    for rel, entry in files.items():
        path = store_dir / rel
        if layout.owned_kind(rel) is None and not rel.startswith("prototypes/"):
            raise ValueError(f"{store_dir}: the version 1 manifest names {rel!r}, not a store file; not migrated")
        if not path.is_file() or path.stat().st_size != entry["size"] or _sha256(path) != entry["sha256"]:
            raise ValueError(f"{path}: missing or damaged (its sha256 differs); restore it before migrating")


def _v1_fingerprint(checkpoint) -> str:
    """Version 1's fingerprint: as today's, but over the files' own names."""
    digest = hashlib.sha256()
    for f in sorted(checkpoint.files.values(), key=lambda f: f.path.name):
        digest.update(f"{f.path.name}\0{f.size}\0".encode())
        digest.update(f.header_bytes)
    return digest.hexdigest()


def _base_ref(v1: dict) -> BaseRef:
    path = Path(v1["base"]["path"])
    with open_checkpoint(path) as base:
        if _v1_fingerprint(base) != v1["base"]["fingerprint"]:
            raise ValueError(f"{path}: not the base this store was made from (its headers differ); restore it")
        files = {name: Digests.of(digest_file(f.path)) for name, f in base.files.items()}
        return BaseRef(path=str(path), fingerprint=base.fingerprint(), files=files)


def _task_entry(task: dict, prototypes: str | None) -> TaskEntry:
    name = task["name"]
    try:
        layout.check_task_name(name)
    except ValueError:
        name = layout.clean_task_name(name if not name.isdigit() else f"task-{name}")
    fidelity = task["fidelity"]
    return TaskEntry(number=int(task["uid"][1:]), name=name,
                     source=SourceRef(path=task["source"], fingerprint=task["fingerprint"], content=""),
                     added_generation=task.get("added_generation", 0), rescaler=task["rescaler"], l1=task["l1"],
                     mask_density=task["mask_density"],
                     fidelity=Fidelity(cosine=fidelity["cosine"], rel_l2=fidelity["rel_l2"],
                                       generation=fidelity["generation"]),
                     triggers=task["triggers"], private=task["private"]["file"],
                     private_tensors=list(task["private"]["tensors"]), zero_filled=list(task["zero_filled"]),
                     attachments={"prototypes": prototypes} if prototypes else {})


def _link_prototypes(store_dir: Path, tasks: list[dict]) -> dict[str, str]:
    """prototypes/<uid>-g<gen> of version 1 as the attachment `prototypes` (hard links, no copy)."""
    renamed = {}
    for task in tasks:
        old = task.get("prototypes")
        if old:
            generation = int(Path(old).stem.rsplit("-g", 1)[1])
            new = layout.attachment_name(int(task["uid"][1:]), "prototypes", generation)
            (store_dir / new).parent.mkdir(parents=True, exist_ok=True)
            os.link(store_dir / old, store_dir / new)
            renamed[old] = new
    return renamed


def _manifest_v2(store_dir: Path, v1: dict, renamed: dict[str, str]) -> Manifest:
    tasks = [_task_entry(t, renamed.get(t.get("prototypes"))) for t in v1["tasks"]]
    kept = [rel for rel in v1["files"] if rel not in renamed] + list(renamed.values())
    return Manifest(format="condu-store", version=VERSION, generation=v1["generation"] + 1, hash="xxh3-64",
                    base=_base_ref(v1), rescaler=v1["rescaler"], missing=v1["missing"],
                    max_shard_size=v1["max_shard_size"], tensors=[TensorEntry(**t) for t in v1["tensors"]],
                    next_number=v1["next_uid"], tasks=tasks,
                    unified=UnifiedEntry(files=v1["unified"]["files"], weight_map=v1["unified"]["weight_map"]),
                    files={rel: Digests.of(digest_file(store_dir / rel)) for rel in sorted(kept)})


def migrate(store_dir: str | os.PathLike) -> str:
    """Rewrite a version 1 store's manifest as version 2; returns a line saying what was done.

    Nothing of version 1 is deleted until the new manifest is in place; a failure before that
    removes only the links this made."""
    store_dir = Path(store_dir)
    with writer_lock(store_dir):
        v1 = _read_v1(store_dir)
        _check_v1_files(store_dir, v1["files"])
        renamed = _link_prototypes(store_dir, v1["tasks"])
        try:
            manifest = _manifest_v2(store_dir, v1, renamed)
            data = encode_manifest(manifest)
            atomic_write_bytes(store_dir / layout.BACKUP, data)
            atomic_write_bytes(store_dir / layout.MANIFEST, data)
        except BaseException:
            for new in renamed.values():
                (store_dir / new).unlink(missing_ok=True)
            (store_dir / layout.BACKUP).unlink(missing_ok=True)
            raise
    for old in renamed:
        (store_dir / old).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        (store_dir / "prototypes").rmdir()
    names = ", ".join(f"{t.number} ({t.name})" for t in manifest.tasks)
    return f"{store_dir}: migrated to version {VERSION} (generation {manifest.generation}); tasks {names}"
