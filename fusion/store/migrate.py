"""A version 1 store (condu 0.1) to version 2, in place, as one more generation.

Version 1 kept a sha256 per file and fingerprinted the base by its headers only. Migration
checks every file against its sha256 first (a damaged store is not migrated), then records
block checksums of every file, and of the base as it is now: version 1 never recorded the
base's content, so the base must be the one the store was made from (its headers are checked).
Task numbers come from the version 1 file tokens (t0003 is task 3), which never changed; a
purely numeric name, which version 2 refuses, becomes `task-<name>`. Class prototypes become
the attachment `prototypes`. Sources keep their path but no content digest, so their fidelity
is not measured again.

The version 1 manifest is read through a typed schema (msgspec, every field typed and none of
them free-form, so the schema bounds the JSON's depth as well), every path it names must have
the shape version 1 gave it (fusion.store.layout.v1_kind) and be a file, not a link, inside the
store. The new manifest is built and checked before anything on disk changes; a refusal is one
line and leaves the store as it was.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from ..errors import InputError, IntegrityError, ManifestError
from ..io import open_checkpoint
from ..io.files import atomic_write_bytes, check_inside, check_opened
from ..io.integrity import BlockHasher, digest_file
from . import layout
from .manifest import (VERSION, BaseRef, Digests, Fidelity, Manifest, SourceRef, TaskEntry, TensorEntry, UnifiedEntry,
                       check_manifest, encode_manifest)
from .inspect import audit
from .transaction import writer_lock

__all__ = ["migrate"]

_MANIFEST_BYTES = 256 << 20  # a version 1 manifest of thousands of tensors and tasks is a few MiB
_V1_SHARD_SIZE = 2 << 30  # what version 1 assumed where a manifest had no max_shard_size

# ---- the version 1 manifest, as condu 0.1 wrote it ------------------------------------------

_STRICT = dict(forbid_unknown_fields=True, frozen=True, kw_only=True)
_Hex64 = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
_Count = Annotated[int, msgspec.Meta(ge=0)]


class _V1File(msgspec.Struct, **_STRICT):
    sha256: _Hex64
    size: _Count


class _V1Base(msgspec.Struct, **_STRICT):
    path: str
    fingerprint: _Hex64
    bytes: _Count


class _V1Tensor(msgspec.Struct, **_STRICT):
    name: str
    shape: list[_Count]
    dtype: str
    unified_dtype: str


class _V1Private(msgspec.Struct, **_STRICT):
    file: str | None
    tensors: list[str]


class _V1Fidelity(msgspec.Struct, **_STRICT):
    cosine: float | None
    rel_l2: float | None
    generation: _Count


class _V1Task(msgspec.Struct, **_STRICT):
    uid: Annotated[str, msgspec.Meta(pattern=r"^t\d{4,9}$")]
    name: str
    source: str
    fingerprint: _Hex64
    added_generation: _Count = 0
    private: _V1Private
    zero_filled: list[str]
    prototypes: str | None = None
    l1: float
    mask_density: float
    triggers: str
    fidelity: _V1Fidelity
    rescaler: float | dict[str, float]

    @property
    def number(self) -> int:
        return int(self.uid[1:])


class _V1Unified(msgspec.Struct, **_STRICT):
    files: list[str]
    weight_map: dict[str, str]


class _V1Manifest(msgspec.Struct, **_STRICT):
    format: Literal["condu-store"]
    version: Literal[1]
    generation: _Count
    base: _V1Base
    rescaler: Literal["model", "tensor-mean", "tensor"]
    missing: Literal["error", "zero"]
    max_shard_size: Annotated[int, msgspec.Meta(gt=0)] = _V1_SHARD_SIZE
    tensors: list[_V1Tensor]
    next_uid: Annotated[int, msgspec.Meta(ge=1)]
    tasks: list[_V1Task]
    files: dict[str, _V1File]
    unified: _V1Unified


class _Head(msgspec.Struct):
    """Just enough to say what a manifest that is no version 1 manifest is."""

    format: str | None = None
    version: int | str | None = None


def _read_v1(store_dir: Path) -> _V1Manifest:
    path = store_dir / layout.MANIFEST
    try:
        if path.stat().st_size > _MANIFEST_BYTES:
            raise ManifestError(f"{path}: larger than {_MANIFEST_BYTES} bytes, not a version 1 manifest; nothing "
                                "migrated")
        data = path.read_bytes()
    except OSError as err:
        raise ManifestError(f"{path}: unreadable ({err.strerror or err.__class__.__name__}); nothing to "
                            "migrate") from None
    try:
        return msgspec.json.decode(data, type=_V1Manifest)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as err:
        problem = str(err).splitlines()[0] if str(err) else err.__class__.__name__
    try:
        head = msgspec.json.decode(data, type=_Head)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        head = None  # not even its format and version can be read: damaged
    if head is not None and (head.format != "condu-store" or head.version != 1):
        raise ManifestError(f"{path}: not a version 1 store (version {head.version!r}); nothing to migrate")
    raise ManifestError(f"{path}: a damaged version 1 manifest ({problem}); restore it from a copy, nothing migrated")


# ---- every path it names, checked before a byte is read ------------------------------------


def _check_paths(store_dir: Path, v1: _V1Manifest) -> None:
    """Every path has its version 1 shape, belongs to its task, and is listed with a checksum."""
    where = store_dir / layout.MANIFEST

    def require(rel: str, kind: str, owner: str | None, what: str) -> None:
        if layout.v1_kind(rel) != kind or (owner and not rel.split("/")[1].startswith(owner)):
            raise ManifestError(f"{where}: {what} {rel!r} is not a version 1 {kind} file name of its own; restore "
                                "the manifest, nothing migrated")
        if rel not in v1.files:
            raise ManifestError(f"{where}: {what} {rel!r} has no checksum in its file table; restore the manifest, "
                                "nothing migrated")

    for rel in v1.files:
        if layout.v1_kind(rel) is None:
            raise ManifestError(f"{where}: names {rel!r}, not a version 1 store file; nothing migrated")
    for rel in v1.unified.files:
        require(rel, "unified", None, "unified file")
    for task in v1.tasks:  # t0003's files: triggers/t0003-g..., private/t0003.safetensors, prototypes/t0003-g...
        require(task.triggers, "triggers", f"{task.uid}-", f"task {task.uid}'s triggers")
        if task.private.file is not None:
            require(task.private.file, "private", f"{task.uid}.", f"task {task.uid}'s private file")
        if task.prototypes is not None:
            require(task.prototypes, "prototypes", f"{task.uid}-", f"task {task.uid}'s prototypes")
    uids = [t.uid for t in v1.tasks]
    if len(set(uids)) != len(uids):
        raise ManifestError(f"{where}: two tasks share a file token; restore the manifest, nothing migrated")


def _open_store_file(store_dir: Path, rel: str) -> int:
    """A store file, opened read-only: a file of its own, not a link, really inside the store."""
    path = store_dir / rel
    check_inside(path, store_dir)  # a folder on the way that links out of the store
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise IntegrityError(f"{path}: missing (its sha256 differs); restore it before migrating") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ManifestError(f"{path}: a link, where version 1 wrote a file; put the file itself there before "
                                "migrating") from None
        raise
    try:
        check_opened(fd, path, folder=store_dir)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _checked_digests(store_dir: Path, rel: str, entry: _V1File) -> Digests:
    """The file's version 2 block checksums, from the same read that checks its version 1 sha256."""
    fd = _open_store_file(store_dir, rel)
    sha, hasher = hashlib.sha256(), BlockHasher()
    try:
        while data := os.read(fd, 1 << 22):
            sha.update(data)
            hasher.update(data)
    finally:
        os.close(fd)
    if hasher.size != entry.size or sha.hexdigest() != entry.sha256:
        raise IntegrityError(f"{store_dir / rel}: missing or damaged (its sha256 differs); restore it before migrating")
    return Digests.of(hasher.finish())


# ---- the version 2 manifest ----------------------------------------------------------------


def _v1_fingerprint(checkpoint) -> str:
    """Version 1's fingerprint: as today's, but over the files' own names."""
    digest = hashlib.sha256()
    for f in sorted(checkpoint.files.values(), key=lambda f: f.path.name):
        digest.update(f"{f.path.name}\0{f.size}\0".encode())
        digest.update(f.header_bytes)
    return digest.hexdigest()


def _base_ref(v1: _V1Manifest) -> BaseRef:
    path = Path(v1.base.path)
    with open_checkpoint(path) as base:
        if _v1_fingerprint(base) != v1.base.fingerprint:
            raise InputError(f"{path}: not the base this store was made from (its headers differ); restore it")
        files = {name: Digests.of(digest_file(f.path)) for name, f in base.files.items()}
        return BaseRef(path=str(path), fingerprint=base.fingerprint(), files=files)


def _task_name(name: str) -> str:
    try:
        return layout.check_task_name(name)
    except ValueError:
        return layout.clean_task_name(name if not name.isdigit() else f"task-{name}")


def _attachment(task: _V1Task) -> str | None:
    """Where version 1's prototypes/<uid>-g<gen> of a task go: the attachment `prototypes`."""
    if task.prototypes is None:
        return None
    generation = int(re.fullmatch(r"prototypes/t\d+-g(\d{6})\.safetensors", task.prototypes)[1])
    return layout.attachment_name(task.number, "prototypes", generation)


def _task_entry(task: _V1Task) -> TaskEntry:
    attachment = _attachment(task)
    fidelity = task.fidelity
    return TaskEntry(number=task.number, name=_task_name(task.name),
                     source=SourceRef(path=task.source, fingerprint=task.fingerprint, content=""),
                     added_generation=task.added_generation, rescaler=task.rescaler, l1=task.l1,
                     mask_density=task.mask_density,
                     fidelity=Fidelity(cosine=fidelity.cosine, rel_l2=fidelity.rel_l2, generation=fidelity.generation),
                     triggers=task.triggers, private=task.private.file, private_tensors=list(task.private.tensors),
                     zero_filled=list(task.zero_filled), attachments={"prototypes": attachment} if attachment else {})


def _manifest_v2(store_dir: Path, v1: _V1Manifest, digests: dict[str, Digests], renamed: dict[str, str]) -> Manifest:
    tensors = [TensorEntry(name=t.name, shape=list(t.shape), dtype=t.dtype, unified_dtype=t.unified_dtype)
               for t in v1.tensors]
    manifest = Manifest(format="condu-store", version=VERSION, generation=v1.generation + 1, hash="xxh3-64",
                        base=_base_ref(v1), rescaler=v1.rescaler, missing=v1.missing,
                        max_shard_size=v1.max_shard_size, tensors=tensors, next_number=v1.next_uid,
                        tasks=[_task_entry(t) for t in v1.tasks],
                        unified=UnifiedEntry(files=list(v1.unified.files), weight_map=dict(v1.unified.weight_map)),
                        files={renamed.get(rel, rel): d for rel, d in sorted(digests.items())})
    check_manifest(manifest, f"{store_dir / layout.MANIFEST} (as version {VERSION})")
    return manifest


def _check_tables(store_dir: Path, manifest: Manifest) -> None:
    """The files hold the tensors the tables name: version 1 checked only their sha256."""
    health = audit(store_dir, manifest)
    problems = health.shared + [p for _, task_problems in health.tasks for p in task_problems]
    if problems:
        raise ManifestError(f"{store_dir / layout.MANIFEST}: disagrees with the store's files ({problems[0]}); "
                            "restore the manifest, nothing migrated")


# ---- the change on disk ----------------------------------------------------------------------


def _link_prototypes(store_dir: Path, renamed: dict[str, str], made: list[Path]) -> None:
    """Hard links of version 1's prototypes under their attachment names; each folder and link
    made goes into `made`, so a failure can take exactly those away."""
    for old, new in renamed.items():
        for folder in reversed((store_dir / new).relative_to(store_dir).parents[:-1]):
            if not (store_dir / folder).is_dir():
                (store_dir / folder).mkdir()
                made.append(store_dir / folder)
        os.link(store_dir / old, store_dir / new, follow_symlinks=False)
        made.append(store_dir / new)


def _undo(made: list[Path]) -> None:
    for path in reversed(made):
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink(missing_ok=True)


def migrate(store_dir: str | os.PathLike) -> str:
    """Rewrite a version 1 store's manifest as version 2; returns a line saying what was done.

    Everything is checked and the new manifest built before anything changes; nothing of
    version 1 is deleted until the new manifest is in place, and a failure before that takes
    away exactly what this made (links, folders, the backup manifest, the lock file)."""
    store_dir = Path(store_dir)
    had_lock = (store_dir / layout.LOCK).exists()
    made: list[Path] = []
    backup = store_dir / layout.BACKUP
    old_backup = backup.read_bytes() if backup.is_file() and not backup.is_symlink() else None
    try:
        with writer_lock(store_dir):
            v1 = _read_v1(store_dir)
            _check_paths(store_dir, v1)
            digests = {rel: _checked_digests(store_dir, rel, entry) for rel, entry in v1.files.items()}
            renamed = {t.prototypes: _attachment(t) for t in v1.tasks if t.prototypes is not None}
            manifest = _manifest_v2(store_dir, v1, digests, renamed)
            data = encode_manifest(manifest)
            _link_prototypes(store_dir, renamed, made)
            _check_tables(store_dir, manifest)  # with the prototypes where the new manifest says
            atomic_write_bytes(backup, data)
            made.append(backup)
            atomic_write_bytes(store_dir / layout.MANIFEST, data)
    except BaseException:
        _undo([p for p in made if p != backup])
        if backup in made and old_backup is not None:
            atomic_write_bytes(backup, old_backup)
        elif backup in made:
            backup.unlink(missing_ok=True)
        if not had_lock:
            (store_dir / layout.LOCK).unlink(missing_ok=True)
        raise
    for old in renamed:
        (store_dir / old).unlink(missing_ok=True)
    if (store_dir / "prototypes").is_dir() and not any((store_dir / "prototypes").iterdir()):
        (store_dir / "prototypes").rmdir()
    names = ", ".join(f"{t.number} ({t.name})" for t in manifest.tasks)
    return f"{store_dir}: migrated to version {VERSION} (generation {manifest.generation}); tasks {names}"
