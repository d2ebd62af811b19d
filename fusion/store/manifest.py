"""The manifest `condu.json`: a typed schema, validated once on load, that proves its own content.

The manifest is the store's table of contents: the space (`dense`: the base is a model, and a
task is a full fine-tune or a LoRA adapter counted as its dense delta; `factors`: the base is a
LoRA adapter, and every task is an adapter of its configuration), the base (where it is, its hub
id and commit, the checksums of its content, and in factor space its adapter configuration), the
tensor table, and per task its number, name, kind (`model` or `adapter`), source (path, hub id
and commit), rescaler(s), statistics, files and own dtype, plus the size and block checksums of
every file of the generation, and the history of changes let through with --allow-degrade
(fusion.store.guard). It ends with `checksum`, an XXH3-128 of its canonical content (every other
field, keys sorted, compact JSON): a changed digit anywhere makes it fail to load. Loading checks, in this order: the JSON, the
format and version, the checksum, the types (msgspec), then the rules that tie fields together
(`_check_consistency`). Any failure is one line naming the field.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import msgspec
import xxhash

from ..constants import MISSING_MODES, RESCALER_MODES
from ..dtypes import DTYPES, QUANT_BLOCK, QUANT_FORMS
from ..errors import InputError, ManifestError
from ..io.bounded_json import JsonLimits, loads
from ..io.integrity import DIGEST_HEX, FileDigests
from . import layout

__all__ = ["FORMAT", "VERSION", "Digests", "HubRef", "BaseRef", "TensorEntry", "Fidelity", "SourceRef", "TaskEntry",
           "HistoryEvent", "UnifiedEntry", "Manifest", "ManifestError", "load_manifest", "read_manifest_file",
           "encode_manifest", "check_manifest"]

FORMAT = "condu-store"
VERSION = 2

_STRICT = dict(forbid_unknown_fields=True, frozen=True, kw_only=True)


class Digests(msgspec.Struct, **_STRICT):
    """A file's size and the XXH3-64 digests of its blocks, concatenated (fusion.io.integrity)."""

    size: int
    block: int
    xxh3: str

    def file_digests(self) -> FileDigests:
        return FileDigests(self.size, self.block, self.xxh3)

    @classmethod
    def of(cls, digests: FileDigests) -> "Digests":
        return cls(size=digests.size, block=digests.block, xxh3=digests.hex)


class HubRef(msgspec.Struct, **_STRICT):
    """A checkpoint that came from the Hugging Face Hub: its id, the revision asked for, the commit."""

    id: str
    revision: str | None = None
    commit: str | None = None


class BaseRef(msgspec.Struct, **_STRICT):
    path: str
    hub: HubRef | None = None
    fingerprint: str  # of the headers (fusion.io.Checkpoint.fingerprint)
    files: dict[str, Digests]  # content checksums, per file name of the checkpoint
    adapter_config: dict[str, Any] | None = None  # factor space: the fields every task's adapter shares

    @property
    def nbytes(self) -> int:
        return sum(d.size for d in self.files.values())


class TensorEntry(msgspec.Struct, **_STRICT):
    """A fused tensor: the base's dtype and the dtype its unified delta is stored in (safetensors codes;
    Q8 and Q4 for int8 and int4 blocks, fusion.dtypes.BlockQuant)."""

    name: str
    shape: list[int]
    dtype: str
    unified_dtype: str


class Fidelity(msgspec.Struct, **_STRICT):
    """The rebuilt delta against the fine-tune's own: cosine and relative L2, at a generation."""

    cosine: float | None
    rel_l2: float | None
    generation: int


class SourceRef(msgspec.Struct, **_STRICT):
    path: str
    hub: HubRef | None = None
    fingerprint: str  # of the headers, as for the base
    content: str  # XXH3-128 over the bytes of its fused tensors, in tensor order


class TaskEntry(msgspec.Struct, **_STRICT):
    number: int  # kept for life; the task's files are named t<number>
    name: str
    kind: Literal["model", "adapter"] = "model"  # a full checkpoint, or a PEFT LoRA adapter
    source: SourceRef
    added_generation: int
    rescaler: float | dict[str, float]  # one, or one per tensor (rescaler mode "tensor")
    l1: float  # of the delta this generation was unified from
    mask_density: float
    fidelity: Fidelity
    triggers: str
    private: str | None = None
    private_tensors: list[str] = []
    zero_filled: list[str] = []
    files: dict[str, str] = {}  # side file name -> path in the store
    attachments: dict[str, str] = {}  # attachment name -> path in the store
    # The dtype of its fused tensors in its own checkpoint (a safetensors code; one per tensor where
    # they differ), which decouple writes by default. None: not recorded (stores made before it,
    # adapters counted dense): decouple writes the base's dtypes.
    dtype: str | dict[str, str] | None = None

    @property
    def id(self) -> str:
        return layout.task_id(self.number)

    def paths(self) -> list[str]:
        return [self.triggers, *([self.private] if self.private else []), *self.files.values(), *self.attachments.values()]

    def rescaler_of(self, tensor: str) -> float:
        return self.rescaler[tensor] if isinstance(self.rescaler, dict) else self.rescaler

    def dtype_of(self, tensor: str) -> str | None:
        """The code of fused `tensor`'s dtype in the task's own checkpoint, None where not recorded."""
        return self.dtype.get(tensor) if isinstance(self.dtype, dict) else self.dtype


class HistoryEvent(msgspec.Struct, **_STRICT):
    """A change its caller let through although it damaged tasks (`--allow-degrade`): what it let through."""

    generation: int  # the generation the change made
    operation: Literal["unify", "add", "remove"]
    tasks: list[int]  # the tasks it damaged, by number
    allowed: list[str]  # each refusal it overrode, one line each


class UnifiedEntry(msgspec.Struct, **_STRICT):
    files: list[str]
    weight_map: dict[str, str]  # tensor -> file


class Manifest(msgspec.Struct, **_STRICT):
    format: Literal["condu-store"]
    version: int
    generation: int
    hash: Literal["xxh3-64"]
    base: BaseRef
    space: Literal["dense", "factors"] = "dense"  # weights of a model, or LoRA factors (the base is an adapter)
    rescaler: Literal["model", "tensor-mean", "tensor"]
    missing: Literal["error", "zero"]
    max_shard_size: int
    tensors: list[TensorEntry]
    next_number: int
    tasks: list[TaskEntry]
    unified: UnifiedEntry
    files: dict[str, Digests]
    history: list[HistoryEvent] = []  # changes let through with --allow-degrade (older stores: none)
    # Elements per block of the block-quantized unified deltas (tensors stored as Q8 or Q4, each block
    # with its float32 scale); None where every unified delta is a float dtype (older stores: none).
    quant_block: int | None = None
    checksum: str = ""

    def task_by_number(self, number: int) -> TaskEntry | None:
        return next((t for t in self.tasks if t.number == number), None)

    def task_by_name(self, name: str) -> TaskEntry | None:
        return next((t for t in self.tasks if t.name == name), None)

    def digests(self, rel: str) -> FileDigests:
        return self.files[rel].file_digests()


assert RESCALER_MODES == ("model", "tensor-mean", "tensor") and MISSING_MODES == ("error", "zero")


# ---- canonical content and its checksum -----------------------------------------------------


def _canonical(content: dict) -> bytes:
    body = {k: v for k, v in content.items() if k != "checksum"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _checksum(content: dict) -> str:
    return xxhash.xxh3_128_hexdigest(_canonical(content))


def encode_manifest(manifest: Manifest) -> bytes:
    """The manifest's file content, with its checksum; checked before it is written."""
    check_manifest(manifest, "manifest to write")
    content = msgspec.to_builtins(manifest)
    content["checksum"] = _checksum(content)
    return json.dumps(content, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode() + b"\n"


# ---- loading --------------------------------------------------------------------------------


# A manifest nests about eight deep (tasks, their records, a factor-space adapter config); anything
# deeper is damage, refused before the parser could recurse on it. Its size grows with the tensors.
_MANIFEST_LIMITS = JsonLimits(depth=32, brackets=1 << 24, commas=1 << 24)


def read_manifest_file(path: Path) -> Manifest:
    """Parse and check one manifest file (condu.json or its backup)."""
    try:
        content = loads(path.read_bytes(), _MANIFEST_LIMITS, where=str(path), what="the manifest",
                        fix="it is damaged")
    except FileNotFoundError:
        raise
    except InputError as err:  # past the bounds, not UTF-8, not JSON
        raise ManifestError(str(err)) from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise ManifestError(f"{path}: not a ConDU store manifest, or damaged")
    if content.get("version") != VERSION:
        if content.get("version") == 1:
            raise ManifestError(f"{path}: a version 1 store; migrate it with `condu-fuse migrate --store {path.parent}`")
        raise ManifestError(f"{path}: store format version {content.get('version')!r}; this condu reads version "
                            f"{VERSION} (and migrates version 1)")
    if content.get("checksum") != _checksum(content):
        raise ManifestError(f"{path}: its checksum does not match its content (damaged or edited by hand)")
    try:
        manifest = msgspec.convert(content, Manifest)
    except msgspec.ValidationError as err:
        raise ManifestError(f"{path}: {err}") from None
    check_manifest(manifest, str(path))
    return manifest


def load_manifest(store_dir: Path) -> Manifest:
    """The store's current manifest; one line if there is none or it cannot be trusted."""
    path = store_dir / layout.MANIFEST
    try:
        return read_manifest_file(path)
    except FileNotFoundError:
        if store_dir.is_dir() and (store_dir / layout.BACKUP).is_file():
            raise ManifestError(f"{path}: missing, but {layout.BACKUP} is there; restore it with "
                                f"`condu-fuse repair --store {store_dir}`") from None
        raise ManifestError(f"{store_dir}: no ConDU store here (no {layout.MANIFEST}); create one with unify") from None
    except ManifestError as err:
        if (store_dir / layout.BACKUP).is_file():
            raise ManifestError(f"{err}; {layout.BACKUP} may hold it whole: try "
                                f"`condu-fuse repair --store {store_dir}`") from None
        raise


# ---- the rules that tie fields together -----------------------------------------------------


def _require(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise ManifestError(f"{where}: {message}")


def _valid(check, value, *args) -> bool:
    try:
        check(value, *args)
    except ValueError:
        return False
    return True


def _check_files(m: Manifest, where: str) -> None:
    for rel, d in m.files.items():
        _require(layout.owned_kind(rel) is not None, where, f"file {rel!r} is not a store file name")
        _require(d.size >= 0 and d.block > 0 and len(d.xxh3) == -(-d.size // d.block) * DIGEST_HEX,
                 where, f"file {rel!r}: checksums do not fit its size")
    referenced = list(m.unified.files) + [p for t in m.tasks for p in t.paths()]
    missing = [rel for rel in referenced if rel not in m.files]
    _require(not missing, where, f"{missing[:1]} is used but not in the file table")
    _require(len(set(referenced)) == len(referenced), where, "a file is used twice")
    orphans = sorted(set(m.files) - set(referenced))
    _require(not orphans, where, f"file table lists {orphans[:1]}, which nothing uses")


def _check_tensors(m: Manifest, where: str) -> None:
    names = [t.name for t in m.tensors]
    _require(len(set(names)) == len(names), where, "a tensor appears twice in the tensor table")
    for t in m.tensors:
        _require(all(s >= 0 for s in t.shape), where, f"tensor {t.name!r} has a negative dimension")
        _require(t.dtype in DTYPES and DTYPES[t.dtype].is_float, where, f"tensor {t.name!r}: dtype {t.dtype!r}")
        _require(t.unified_dtype in ("F32", "F16", "BF16", *QUANT_FORMS), where,
                 f"tensor {t.name!r}: unified dtype {t.unified_dtype!r}")
    quantized = any(t.unified_dtype in QUANT_FORMS for t in m.tensors)
    _require(m.quant_block == (QUANT_BLOCK if quantized else None), where,
             f"quant_block {m.quant_block!r}: " + (f"this condu reads blocks of {QUANT_BLOCK} elements" if quantized
                                                   else "set, but no unified delta is block-quantized"))
    _require(set(m.unified.weight_map) == set(names), where, "the unified delta's weight map does not match the tensors")
    _require(set(m.unified.weight_map.values()) <= set(m.unified.files), where, "the weight map names an unlisted file")
    _require(all(layout.owned_kind(f) == "unified" for f in m.unified.files), where, "a unified file has a bad name")


def _check_task(m: Manifest, task: TaskEntry, where: str) -> None:
    label = f"{where}: task {task.number}"
    _require(_valid(layout.check_task_name, task.name), label, f"name {task.name!r} is not a valid task name")
    _require(0 < task.number < m.next_number, label, f"number outside 1..{m.next_number - 1}")
    rescalers = list(task.rescaler.values()) if isinstance(task.rescaler, dict) else [task.rescaler]
    _require(all(math.isfinite(r) and r >= 0 for r in rescalers), label, "rescaler is not a finite number >= 0")
    if m.rescaler == "tensor":
        _require(isinstance(task.rescaler, dict) and set(task.rescaler) == {t.name for t in m.tensors}, label,
                 "needs one rescaler per fused tensor")
    else:
        _require(not isinstance(task.rescaler, dict), label, f"needs one rescaler in mode {m.rescaler!r}")
    codes = list(task.dtype.values()) if isinstance(task.dtype, dict) else [task.dtype] if task.dtype else []
    _require(all(c in DTYPES and DTYPES[c].is_float for c in codes), label,
             f"dtype {task.dtype!r} is not a float dtype")
    _require(not isinstance(task.dtype, dict) or set(task.dtype) <= {t.name for t in m.tensors}, label,
             "dtype names a tensor that is not fused")
    expected = {"triggers": [task.triggers], "private": [task.private] if task.private else [],
                "files": list(task.files.values()), "attachments": list(task.attachments.values())}
    for kind, paths in expected.items():
        for rel in paths:
            _require(layout.owned_kind(rel) == kind and rel.split("/")[1].startswith(task.id), label,
                     f"{rel!r} is not a {kind} file of this task")


def _check_space(m: Manifest, where: str) -> None:
    if m.space == "factors":
        _require(m.base.adapter_config is not None, where, "a factor-space store needs the base adapter's config")
        _require(all(t.kind == "adapter" for t in m.tasks), where, "a factor-space store holds adapters only")
    else:
        _require(m.base.adapter_config is None, where, "a dense store's base is a model, yet it has an adapter config")


def check_manifest(m: Manifest, where: str) -> None:
    """The rules a manifest's fields obey together; a ManifestError names the first one broken."""
    _require(m.version == VERSION and m.generation >= 0 and m.max_shard_size > 0, where, "bad header fields")
    _check_space(m, where)
    _require(all(_valid(layout.check_token, n, "a file name") for n in m.base.files), where, "bad base file name")
    _check_tensors(m, where)
    numbers, names = [t.number for t in m.tasks], [t.name for t in m.tasks]
    _require(len(set(numbers)) == len(numbers), where, "two tasks share a number")
    _require(len(set(names)) == len(names), where, "two tasks share a name")
    for task in m.tasks:
        _check_task(m, task, where)
    _check_files(m, where)
    _require(all(0 <= e.generation <= m.generation and all(0 < n < m.next_number for n in e.tasks)
                 for e in m.history), where, "a history event names a later generation or an unknown task")
