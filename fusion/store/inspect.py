"""Looking at a store: `info` (from the manifest alone) and `verify`, the whole-file audit.

`verify` reads every file of the generation and the base in full and checks each block
against its checksum, and each data file's header against the tensor table. It reports what
is whole per task: damage to the unified delta or the base touches every task, damage to a
task's own files only that task (which `remove` can then drop). It also checks the backup
manifest: when `condu.backup.json` could not restore `condu.json`, the store is one damaged file
away from losing its table of contents, so that is a problem too (not ok, exit status 1), though
every task is whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..dtypes import DTYPES, unified_form
from ..io import SafetensorsFile
from ..io.integrity import digest_file
import msgspec

from . import layout
from .manifest import Manifest, ManifestError, TaskEntry, read_manifest_file
from .plan import FusedTensor
from .snapshot import describe

__all__ = ["Health", "audit", "info"]


@dataclass
class Health:
    """What `verify` found: problems shared by every task, each task's own, and the store's own
    (its backup manifest), which leave every task whole."""

    shared: list[str] = field(default_factory=list)
    tasks: list[tuple[TaskEntry, list[str]]] = field(default_factory=list)
    store: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return self.shared + [p for _, problems in self.tasks for p in problems] + self.store

    @property
    def ok(self) -> bool:
        return not self.problems

    def whole(self, task: TaskEntry) -> bool:
        return not self.shared and not dict((t.number, p) for t, p in self.tasks).get(task.number)


def _check_file(store_dir: Path, manifest: Manifest, rel: str) -> str | None:
    path, recorded = store_dir / rel, manifest.digests(rel)
    if not path.is_file():
        return f"{describe(manifest, rel)}: missing"
    found = digest_file(path, block=recorded.block)
    if found.size != recorded.size:
        return f"{describe(manifest, rel)}: {found.size} bytes, the manifest says {recorded.size}"
    bad = recorded.first_mismatch(found)
    if bad is not None:
        begin, end = recorded.span(bad)
        return f"{describe(manifest, rel)}: bytes {begin}..{end} do not match their checksum (damaged)"
    return None


def _check_tensors(store_dir: Path, manifest: Manifest, rel: str, expected: dict[str, tuple]) -> str | None:
    """The file holds exactly the expected tensors, as (dtype code, shape)."""
    try:
        with SafetensorsFile(store_dir / rel) as f:
            found = {n: (i.dtype.code, tuple(i.shape)) for n, i in f.entries.items()}
    except (ValueError, OSError) as err:
        return f"{describe(manifest, rel)}: unreadable ({err})"
    if found != expected:
        return f"{describe(manifest, rel)}: its tensors differ from the manifest's tensor table"
    return None


def _expected_unified(manifest: Manifest, rel: str) -> dict[str, tuple]:
    layouts = {t.name: FusedTensor.of(t).unified_layout for t in manifest.tensors}  # (dtype, shape) in the file
    return {t.name: (layouts[t.name][0].code, tuple(layouts[t.name][1])) for t in manifest.tensors
            if manifest.unified.weight_map[t.name] == rel}


def _task_problems(store_dir: Path, manifest: Manifest, task: TaskEntry, damaged: dict[str, str]) -> list[str]:
    problems = [damaged[rel] for rel in task.paths() if rel in damaged]
    masks = {t.name: ("U8", (FusedTensor.of(t).mask_bytes,)) for t in manifest.tensors}
    if task.triggers not in damaged:
        problems += filter(None, [_check_tensors(store_dir, manifest, task.triggers, masks)])
    if task.private and task.private not in damaged:
        with SafetensorsFile(store_dir / task.private) as f:
            if set(f.entries) != set(task.private_tensors):
                problems.append(f"{describe(manifest, task.private)}: its tensors differ from the manifest's list")
    return problems


def _base_problems(manifest: Manifest, base_path: str) -> list[str]:
    base = Path(base_path)
    files = {n: (base if base.is_file() else base / n) for n in manifest.base.files}
    problems = []
    for name, path in files.items():
        if not path.is_file():
            problems.append(f"base {base_path}: {name} is missing; restore it or run `condu-fuse set-base PATH`")
            continue
        recorded = manifest.base.files[name].file_digests()
        bad = recorded.first_mismatch(digest_file(path, block=recorded.block))
        if bad is not None:
            problems.append(f"base {path}: its content differs from the base the store was made from "
                            f"(first at byte {recorded.span(bad)[0]}); restore it")
    return problems


def _backup_problem(store_dir: Path) -> str | None:
    """Why `repair` could not restore condu.json from condu.backup.json, or None when it could."""
    backup = store_dir / layout.BACKUP
    try:
        saved = read_manifest_file(backup)
    except FileNotFoundError:
        reason = "missing"
    except ManifestError:
        reason = "damaged"
    except OSError as err:
        reason = f"unreadable ({err.strerror or err.__class__.__name__})"
    else:
        gone = [rel for rel in saved.files if not (store_dir / rel).is_file()]
        if not gone:
            return None
        reason = f"names {gone[0]}, which is gone"
    return (f"{layout.BACKUP}: {reason}, so `condu-fuse repair` could not restore a damaged {layout.MANIFEST}; "
            f"run `condu-fuse repair`, which rewrites it from {layout.MANIFEST}")


def audit(store_dir: Path, manifest: Manifest) -> Health:
    """Read everything once and report what is whole."""
    damaged = {rel: p for rel in manifest.files if (p := _check_file(store_dir, manifest, rel))}
    health = Health()
    for rel in manifest.unified.files:
        problem = damaged.get(rel) or _check_tensors(store_dir, manifest, rel, _expected_unified(manifest, rel))
        health.shared += [problem] if problem else []
    health.shared += _base_problems(manifest, manifest.base.path)
    health.tasks = [(t, _task_problems(store_dir, manifest, t, damaged)) for t in manifest.tasks]
    health.store += filter(None, [_backup_problem(store_dir)])
    return health


def _sizes(manifest: Manifest) -> dict[str, int]:
    sizes = {"unified": 0, "triggers": 0, "private": 0, "files": 0, "attachments": 0}
    for rel, d in manifest.files.items():
        sizes["unified" if rel.startswith("unified-") else rel.split("/")[0]] += d.size
    sizes["total"] = sum(sizes.values())
    return sizes


def _degraded_by_choice(manifest: Manifest) -> dict[int, list[int]]:
    """Per task number, the generations whose change damaged it and was let through (--allow-degrade)."""
    chosen: dict[int, list[int]] = {}
    for event in manifest.history:
        for number in event.tasks:
            chosen.setdefault(number, []).append(event.generation)
    return chosen


def info(store_dir: Path, manifest: Manifest, records: list) -> dict:
    """Tasks, sizes and savings, JSON-able (`condu-fuse info --json`)."""
    sizes = _sizes(manifest)
    separate = len(records) * manifest.base.nbytes
    chosen = _degraded_by_choice(manifest)
    return {
        "store": str(store_dir.resolve()), "format": manifest.format, "version": manifest.version,
        "generation": manifest.generation,
        "base": {"path": manifest.base.path, "hub": msgspec.to_builtins(manifest.base.hub), "bytes": manifest.base.nbytes,
                 "dtypes": sorted({DTYPES[t.dtype].name for t in manifest.tensors})},
        "space": manifest.space,
        "rescaler": manifest.rescaler, "missing": manifest.missing,
        "tensors": len(manifest.tensors),
        "fused_parameters": sum(FusedTensor.of(t).numel for t in manifest.tensors),
        "unified_dtypes": sorted({unified_form(t.unified_dtype).name for t in manifest.tensors}),
        "quant_block": manifest.quant_block,
        "tasks": [{**r.as_dict(), "degraded_by_choice": chosen.get(r.number, [])} for r in records],
        "history": msgspec.to_builtins(manifest.history),
        "sizes": sizes,
        "separate_checkpoints_bytes": separate,
        "savings": separate / sizes["total"] if sizes["total"] else None,
    }
