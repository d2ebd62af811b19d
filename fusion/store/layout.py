"""Names inside a store folder: every file a store writes, and the rules for task names.

    condu.json                                  the manifest (fusion.store.manifest)
    condu.backup.json                           a second copy of it, written first at each commit
    condu.lock                                  held by the one writer
    unified-g<gen>[-<k>-of-<n>].safetensors     the unified delta of generation <gen>
    triggers/t<number>-g<gen>.safetensors       a task's bit-packed masks
    private/t<number>.safetensors               a task's tensors that cannot be fused
    files/t<number>/<name>                      a task's own small files (config.json, tokenizer)
    attachments/t<number>/<name>-g<gen>.safetensors   named data a caller keeps with a task

A task's file token `t<number>` comes from its number, which it keeps for life. The manifest
may name only paths of these shapes, so no manifest, however edited, makes the store read or
write outside its folder.
"""

from __future__ import annotations

import re

from ..errors import InputError

__all__ = ["MANIFEST", "BACKUP", "LOCK", "SUBDIRS", "task_id", "unified_names", "trigger_name", "private_name",
           "side_file_name", "attachment_name", "is_owned", "check_task_name", "check_token", "clean_task_name",
           "owned_kind", "v1_kind"]

MANIFEST = "condu.json"
BACKUP = "condu.backup.json"
LOCK = "condu.lock"
SUBDIRS = ("triggers", "private", "files", "attachments")

_TOKEN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"  # a safe file name: no separators, no leading dot
_GEN = r"g\d{6}"
_TASK = r"t\d{4,}"
_PATTERNS = {
    "unified": rf"unified-{_GEN}(-\d{{5}}-of-\d{{5}})?\.safetensors",
    "triggers": rf"triggers/{_TASK}-{_GEN}\.safetensors",
    "private": rf"private/{_TASK}\.safetensors",
    "files": rf"files/{_TASK}/{_TOKEN}",
    "attachments": rf"attachments/{_TASK}/{_TOKEN}-{_GEN}\.safetensors",
}
_OWNED = re.compile("|".join(f"(?P<{kind}>{p})" for kind, p in _PATTERNS.items()))
# The files a version 1 store (condu 0.1) wrote, for fusion.store.migrate: no files/ or
# attachments/, but prototypes/t<number>-g<gen>.safetensors.
_V1_PATTERNS = {kind: _PATTERNS[kind] for kind in ("unified", "triggers", "private")}
_V1_PATTERNS["prototypes"] = rf"prototypes/{_TASK}-{_GEN}\.safetensors"
_V1 = re.compile("|".join(f"(?P<{kind}>{p})" for kind, p in _V1_PATTERNS.items()))
_TEMPORARY = re.compile(r"(?P<path>.+)\.tmp-\d+")


def task_id(number: int) -> str:
    return f"t{number:04d}"


def _gen(generation: int) -> str:
    return f"g{generation:06d}"


def unified_names(generation: int, shards: int) -> list[str]:
    if shards == 1:
        return [f"unified-{_gen(generation)}.safetensors"]
    return [f"unified-{_gen(generation)}-{k:05d}-of-{shards:05d}.safetensors" for k in range(1, shards + 1)]


def trigger_name(number: int, generation: int) -> str:
    return f"triggers/{task_id(number)}-{_gen(generation)}.safetensors"


def private_name(number: int) -> str:
    return f"private/{task_id(number)}.safetensors"


def side_file_name(number: int, name: str) -> str:
    return f"files/{task_id(number)}/{check_token(name, 'a side file name')}"


def attachment_name(number: int, name: str, generation: int) -> str:
    return f"attachments/{task_id(number)}/{check_token(name, 'an attachment name')}-{_gen(generation)}.safetensors"


def owned_kind(rel: str) -> str | None:
    """Which kind of store file `rel` (a posix path relative to the store) is, or None."""
    match = _OWNED.fullmatch(rel)
    return match.lastgroup if match else None


def v1_kind(rel: str) -> str | None:
    """Which kind of version 1 store file `rel` is (unified, triggers, private, prototypes), or None."""
    match = _V1.fullmatch(rel) if isinstance(rel, str) else None
    return match.lastgroup if match else None


def is_owned(rel: str) -> bool:
    """A file a store writer may have made: one of the shapes above, or a temporary copy of one."""
    temporary = _TEMPORARY.fullmatch(rel)
    base = temporary.group("path") if temporary else rel
    return owned_kind(base) is not None or (temporary is not None and base in (MANIFEST, BACKUP))


def check_token(name: str, what: str) -> str:
    if not isinstance(name, str) or not re.fullmatch(_TOKEN, name):
        raise InputError(f"{name!r} is not usable as {what}: use letters, digits, '.', '_' and '-', "
                         "starting with a letter or digit, at most 100 characters")
    return name


def check_task_name(name: str) -> str:
    """A task name: a safe file-name token that is not a number (numbers select tasks by number)."""
    check_token(name, "a task name")
    if name.isdigit():
        raise InputError(f"task name {name!r} is a number, which would be read as a task number; "
                         "give it a name with a letter in it")
    return name


def clean_task_name(raw: str) -> str:
    """A valid default name from a checkpoint's file or folder name (characters outside the rule become '-')."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", raw).lstrip(".-_")[:100] or "task"
    return f"task-{name}" if name.isdigit() else name
