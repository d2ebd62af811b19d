"""One change of a store: a lock, the new generation's files, and one atomic commit.

    with change(store_dir) as tx:          # the lock; leftovers of dead writers removed
        w = tx.writer("triggers/t0003-g000007.safetensors", layout)
        ...                                 # write and finish new files under new names
        tx.commit(manifest)                 # backup, then condu.json swapped; old files deleted

Files of a generation are never rewritten: a change writes new files under new names, fsyncs
them, writes the new manifest to `condu.backup.json` and then over `condu.json` (each an
atomic rename), and only then deletes what the new manifest no longer names. A crash at any
moment leaves `condu.json` naming a whole generation. If the block raises, every file the
change made is removed and the store is as it was. Only files whose names a store writer uses
(`layout.is_owned`) are ever deleted, so a user's files in the folder are safe.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path
from typing import Iterator

from ..errors import Interrupted, InvariantError, StoreLocked
from ..io.files import atomic_write_bytes, fsync_dir, naming_full_disk, read_side_file, stored_mode
from ..io.integrity import BlockHasher
from ..io.writer import SafetensorsWriter, ShardedWriter
from . import faults, layout
from .manifest import Digests, Manifest, ManifestError, encode_manifest, read_manifest_file

__all__ = ["StoreLockedError", "Transaction", "change", "writer_lock", "cleanup"]


StoreLockedError = StoreLocked  # the name of earlier releases


@contextlib.contextmanager
def writer_lock(store_dir: Path) -> Iterator[None]:
    """Hold condu.lock exclusively for one writer; a second writer fails at once."""
    with open(store_dir / layout.LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreLockedError(f"{store_dir}: another process is writing this store ({layout.LOCK} is held); "
                                   "wait for it to finish") from None
        yield


def _owned_files(store_dir: Path) -> Iterator[tuple[str, Path]]:
    """(relative path, path) of every file a store writer may have made."""
    for root, _, names in os.walk(store_dir):
        for name in names:
            path = Path(root) / name
            rel = path.relative_to(store_dir).as_posix()
            if layout.is_owned(rel):
                yield rel, path


def cleanup(store_dir: Path, manifest: Manifest | None) -> None:
    """Delete store files the manifest does not name (older generations, dead writers' temporaries)."""
    keep = set(manifest.files) if manifest else set()
    for rel, path in _owned_files(store_dir):
        if rel not in keep:
            path.unlink(missing_ok=True)
    for sub in ("files", "attachments"):  # a removed task's folders
        for folder in sorted((store_dir / sub).glob("t*"), reverse=True):
            with contextlib.suppress(OSError):
                folder.rmdir()


def _heal_backup(store_dir: Path, manifest: Manifest | None) -> None:
    """Make condu.backup.json equal condu.json again (a commit may have stopped between the two)."""
    main, backup = store_dir / layout.MANIFEST, store_dir / layout.BACKUP
    if manifest is not None and (not backup.is_file() or backup.read_bytes() != main.read_bytes()):
        atomic_write_bytes(backup, main.read_bytes())


class Transaction:
    """The files of generation `generation`, written under the lock, and their commit."""

    def __init__(self, store_dir: Path, current: Manifest | None):
        self.store_dir = store_dir
        self.current = current
        self.generation = current.generation + 1 if current else 0
        self.written: dict[str, Digests] = {}
        self._writers: list[SafetensorsWriter | ShardedWriter] = []
        self.committed: Manifest | None = None

    # -- new files ---------------------------------------------------------------------------

    def writer(self, rel: str, tensor_layout, **options) -> SafetensorsWriter:
        """A checksummed writer of store file `rel`; `finished(rel, writer)` records it."""
        if layout.owned_kind(rel) is None:
            raise InvariantError(f"{rel} is not a store file name")
        (self.store_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        writer = SafetensorsWriter(self.store_dir / rel, tensor_layout, **options)
        self._writers.append(writer)
        return writer

    def unified_writer(self, tensor_layout, *, max_shard_size: int, **options) -> ShardedWriter:
        """The checksummed writer of this generation's unified delta, sharded by size."""
        g = self.generation
        writer = ShardedWriter(self.store_dir, tensor_layout, single=layout.unified_names(g, 1)[0],
                               shard_name=lambda k, n: layout.unified_names(g, n)[k - 1],
                               max_shard_size=max_shard_size, **options)
        self._writers.append(writer)
        return writer

    def finished(self, rel: str, writer: SafetensorsWriter) -> None:
        self.written[rel] = Digests.of(writer.digests)

    def copy_in(self, src: Path, rel: str) -> None:
        """Copy a side file of an input folder into the store (read as fusion.io.files.read_side_file
        allows, no more open than the source), checksummed as it is written, then fsynced."""
        side = read_side_file(src)  # read before anything is made, so a refused file leaves nothing
        target = self.store_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        hasher = BlockHasher()
        hasher.update(side.data)
        atomic_write_bytes(target, side.data, mode=stored_mode(side.mode))
        self.written[rel] = Digests.of(hasher.finish())

    def digests(self, rel: str) -> Digests:
        """The checksums of a file of the new generation: written now, or carried over."""
        if rel in self.written:
            return self.written[rel]
        if self.current is None or rel not in self.current.files:
            raise InvariantError(f"{rel}: neither written nor carried over")
        return self.current.files[rel]

    # -- commit ------------------------------------------------------------------------------

    def commit(self, manifest: Manifest) -> Manifest:
        """Make `manifest` (naming only files written now or carried over) the store's, atomically."""
        data = encode_manifest(manifest)  # checked before anything is swapped
        for sub in ("", *layout.SUBDIRS, *(f"{s}/{p.name}" for s in ("files", "attachments")
                                            for p in (self.store_dir / s).glob("t*"))):
            if (self.store_dir / sub).is_dir():
                fsync_dir(self.store_dir / sub)
        faults.hit("files-written")
        atomic_write_bytes(self.store_dir / layout.BACKUP, data)
        faults.hit("backup-written")
        atomic_write_bytes(self.store_dir / layout.MANIFEST, data)
        self.committed = manifest
        faults.hit("manifest-swapped")
        cleanup(self.store_dir, manifest)
        return manifest

    def abort(self) -> None:
        """Remove what this change wrote; the manifest on disk (old, or new if swapped) stays whole."""
        for writer in self._writers:
            writer.abort()
        on_disk = self.committed or _manifest_on_disk(self.store_dir)
        cleanup(self.store_dir, on_disk)
        _heal_backup(self.store_dir, on_disk)


def _manifest_on_disk(store_dir: Path) -> Manifest | None:
    try:
        return read_manifest_file(store_dir / layout.MANIFEST)
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def change(store_dir: Path, current_loader) -> Iterator[Transaction]:
    """Lock the store, load its manifest with `current_loader()` (None for a new store), clean
    leftovers, and yield a Transaction; an exception in the block aborts it."""
    with writer_lock(store_dir):
        current = current_loader()
        cleanup(store_dir, current)
        _heal_backup(store_dir, current)
        tx = Transaction(store_dir, current)
        try:
            with naming_full_disk(store_dir):  # a full disk the writers did not name: the store, at least
                yield tx
        except KeyboardInterrupt:
            tx.abort()
            raise Interrupted(_interrupted(store_dir, tx)) from None
        except BaseException:
            tx.abort()
            raise


def _interrupted(store_dir: Path, tx: Transaction) -> str:
    """What Ctrl-C left: the old generation, or the new one when it came after the manifest's swap."""
    if tx.committed is None:
        return f"{store_dir}: interrupted; the store is unchanged"
    return f"{store_dir}: interrupted after the change was committed; generation {tx.committed.generation} is the store's"


def remove_new_store(store_dir: Path, created: bool, had_lock: bool) -> None:
    """Undo what a failed first unify created: leftovers, subfolders, the lock, the folder."""
    if not store_dir.is_dir() or (store_dir / layout.MANIFEST).exists():
        return
    cleanup(store_dir, None)
    for sub in layout.SUBDIRS:
        if (store_dir / sub).is_dir() and not any((store_dir / sub).rglob("*")):
            shutil.rmtree(store_dir / sub, ignore_errors=True)
    (store_dir / layout.BACKUP).unlink(missing_ok=True)
    if not had_lock:
        (store_dir / layout.LOCK).unlink(missing_ok=True)
    if created:
        with contextlib.suppress(OSError):
            store_dir.rmdir()


__all__ += ["remove_new_store", "ManifestError"]
