"""Checkpoint arguments that may be Hugging Face hub ids: `org/name` or `org/name@revision`.

    resolved = resolve_checkpoint("openai/clip-vit-base-patch16@main")
    resolved.path      # the local snapshot folder (or the local path itself)
    resolved.commit    # the commit it came from, to record next to the id

An existing local path always wins. Anything else that reads as `org/name[@revision]` is fetched
with `huggingface_hub` into its standard cache (HF_HOME, HF_HUB_CACHE), downloading only weights,
indexes, configs and tokenizer files (and a PEFT adapter's two files). `HF_HUB_OFFLINE=1` keeps
it to the cache. Every failure is one `ValueError` line that names the argument and the fix.

    base_records("ckpt_a")   [BaseRecord("org/base", "base_model", "README.md"), ...]: the bases a
                             checkpoint folder names (model card, adapter config, config), first wins

A revision is a branch or tag name as git's check-ref-format allows it (so `refs/pr/3` is one),
or a commit; anything else (`..`, a leading `/` or `-`, control characters) is refused. A
folder's records are read as its other side files are (fusion.io.files): never through a link
that leaves the folder or its hub cache repository's blobs/, and bounded in size and depth.

Only the standard library is imported with the module; fusion.io (numpy) when a record is read,
and `huggingface_hub` when an id is resolved, so commands that take local paths start without it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import InputError

# What a checkpoint needs; pickled weights (.bin, .pt, .ckpt) and other frameworks' files are left out.
HUB_FILES = (
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "adapter_config.json",
    "README.md",  # the model card: its front matter names the base (base_records)
)
# The hub's own rule for repository names (huggingface_hub.utils.validate_repo_id), owner required.
_NAME = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"^(?P<repo>{_NAME}/{_NAME})(?:@(?P<revision>[^\s@]+))?$")
# What git's check-ref-format refuses in a ref name (a commit's 40 hex digits pass): control
# characters, space and ~^:?*[\; "..", "//" and "@{"; a component that starts with "." or ends
# with ".lock"; a name that starts with "/" or "-" (an option) or ends with "/" or ".".
_BAD_REVISION = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|//|@\{|(?:^|/)\.|\.lock(?:/|$)|^[-/]|[/.]$")
_REVISION_CHARS = 255
_TRUE = {"1", "on", "yes", "true"}  # the values huggingface_hub reads as true
ID_FORM = "org/name[@revision]"


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """Where a checkpoint argument lives on disk, and which hub commit it is, if any."""

    path: Path
    hub_id: str | None = None  # "org/name" when the argument was a hub id
    revision: str | None = None  # the revision asked for (None: the default branch)
    commit: str | None = None  # the commit the cached snapshot holds

    @property
    def from_hub(self) -> bool:
        return self.hub_id is not None


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """("org/name", revision or None) when `text` has the form of a hub id, else None; an id whose
    revision is no branch, tag or commit name is refused in one line."""
    match = _HUB_ID.match(text)
    if match is None or "--" in match["repo"] or ".." in match["repo"] or match["repo"].endswith(".git"):
        return None
    revision = match["revision"]
    if revision is not None and not valid_revision(revision):
        from .errors import InputError

        raise InputError(f"{match['repo']}: revision {revision!r} is not a branch, tag or commit name (git's "
                         "rules: no '..', no leading '/' or '-', no control characters, spaces or ~^:?*[\\); give "
                         "a branch, tag or 40-hex commit")
    return match["repo"], revision


def valid_revision(revision: str) -> bool:
    """A branch or tag name that git's check-ref-format accepts, or a commit (40 hex digits)."""
    return 0 < len(revision) <= _REVISION_CHARS and revision != "@" and not _BAD_REVISION.search(revision)


def offline_mode() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, when it is first imported)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_cache_dir() -> str | None:
    """The hub cache the environment names now; None leaves huggingface_hub's default."""
    env = os.environ
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return os.path.expanduser(cache)
    return os.path.join(os.path.expanduser(env["HF_HOME"]), "hub") if env.get("HF_HOME") else None


def resolve_checkpoint(name_or_path: str | os.PathLike) -> ResolvedCheckpoint:
    """A local path as it is, or a hub id's snapshot folder in the cache (downloaded when needed)."""
    text = os.fspath(name_or_path)
    local = Path(os.path.expanduser(text))
    if local.exists():
        return ResolvedCheckpoint(path=local)
    parsed = parse_hub_id(text)
    if parsed is None:
        raise InputError(f"{text}: no such file or folder, and not a hub id ({ID_FORM}); fix the path or the id")
    repo, revision = parsed
    folder = Path(_download(text, repo, revision))
    _require_weights(text, folder)
    return ResolvedCheckpoint(path=folder, hub_id=repo, revision=revision, commit=folder.name)


def _download(text: str, repo: str, revision: str | None) -> str:
    """snapshot_download of the checkpoint files, its errors turned into one line each."""
    import huggingface_hub
    from huggingface_hub import errors

    offline = offline_mode()
    try:
        return huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=list(HUB_FILES),
                                                 cache_dir=hub_cache_dir(), local_files_only=offline)
    except errors.GatedRepoError:
        raise InputError(f"{text}: hub repository {repo} is gated; accept its terms on the hub, then log in "
                         "with `hf auth login`") from None
    except errors.RepositoryNotFoundError:
        raise InputError(f"{text}: no such local path, and no hub repository {repo} (or it is private: "
                         "log in with `hf auth login`); check the path or the id") from None
    except errors.RevisionNotFoundError:
        raise InputError(f"{text}: hub repository {repo} has no revision {revision!r}; give a branch, tag or "
                         "commit that exists") from None
    except getattr(errors, "IncompleteSnapshotError", ()):  # newer huggingface_hub checks completeness
        raise InputError(f"{text}: the cached snapshot of {repo} misses files; download it again with network "
                         "(HF_HUB_OFFLINE unset)") from None
    except errors.LocalEntryNotFoundError:
        raise InputError(_not_cached(text, repo, revision, offline)) from None
    except errors.HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", "?")
        raise InputError(f"{text}: the hub answered HTTP {status} for {repo}; retry later, or give a local "
                         "folder") from None


def _not_cached(text: str, repo: str, revision: str | None, offline: bool) -> str:
    wanted = f"{repo}@{revision}" if revision else repo
    where = hub_cache_dir() or "the default hub cache"
    if offline:
        return (f"{text}: no such local path, and hub id {wanted} is not in the hub cache ({where}) while "
                "HF_HUB_OFFLINE is set; download it once with network (unset HF_HUB_OFFLINE), or give a local folder")
    return (f"{text}: no such local path, and hub id {wanted} is neither reachable (no connection to the hub) "
            f"nor in the hub cache ({where}); connect once to download it, or give a local folder")


def _require_weights(text: str, folder: Path) -> None:
    if not any(folder.rglob("*.safetensors")):
        raise InputError(f"{text}: the hub repository has no .safetensors weights (pickled ones are not read); "
                         "convert them to safetensors and give the local folder")


# Where a checkpoint folder names its base, the first record found winning: the model card's front
# matter (the hub's and transformers'/peft's push tooling write it; transformers 5 no longer writes
# _name_or_path), PEFT's adapter config, then transformers' config.
BASE_RECORDS = (("README.md", "base_model"), ("adapter_config.json", "base_model_name_or_path"),
                ("config.json", "_name_or_path"))
_CARD_BYTES = 1 << 20  # a model card is read for its front matter up to here, no further
# A config's JSON, as fusion.io.bounded_json.JsonLimits(depth, brackets, commas): configs nest a
# few levels (text_config, quantization_config) and list labels and tokens by the thousand.
_RECORD_LIMITS = (32, 1 << 20, 1 << 22)
_NULLS = {"", "~", "null", "Null", "NULL"}


@dataclass(frozen=True)
class BaseRecord:
    """A base model a checkpoint folder names, and the record that names it."""

    base: str  # a hub id or a path, as written
    key: str  # base_model, base_model_name_or_path or _name_or_path
    file: str  # the record's file name in the folder


def base_records(path: str | os.PathLike) -> Iterator[BaseRecord]:
    """The bases a checkpoint folder names, in BASE_RECORDS order (the first one wins); none for a file.
    Lazy: a record is read only when the ones before it were taken, so it alone can fail."""
    folder = Path(path)
    if not folder.is_dir():
        return
    for name, key in BASE_RECORDS:
        record = folder / name
        if record.is_symlink() or record.is_file():  # a link is read only if it stays inside (open_input)
            value = card_base_model(record) if name == "README.md" else _json_field(record, key)
            if value:
                yield BaseRecord(value, key, name)


def recorded_base(path: str | os.PathLike) -> str | None:
    """The base a checkpoint folder names itself (the first of BASE_RECORDS it has); None when it names none."""
    first = next(base_records(path), None)
    return first.base if first else None


def card_base_model(path: Path) -> str | None:
    """`base_model` in a model card's YAML front matter: a string, or a list of one string.

    A small reader of that one key, bounded by _CARD_BYTES: a top-level `base_model:` whose value
    is a plain or quoted scalar, a flow list `[id]`, or a block list of `- id` lines."""
    lines = _front_matter(path)
    for k, line in enumerate(lines):
        key, colon, rest = line.partition(":")
        if colon and key.rstrip() == "base_model" and not key[:1].isspace():
            value = _uncommented(rest)
            if value.startswith("["):
                items = _flow_list(value, path)
            else:
                items = [_scalar(value, path)] if value else _block_list(lines[k + 1 :], path)
            return _one_base([i for i in items if i is not None], path)
    return None


def _front_matter(path: Path) -> list[str]:
    """The lines between the `---` fences that open a model card; [] when it opens with none."""
    from .io.files import open_input

    try:
        fd = open_input(path)
        try:
            head = os.read(fd, _CARD_BYTES).decode("utf-8", errors="replace")
        finally:
            os.close(fd)
    except OSError as err:
        raise InputError(f"{path}: not readable ({err.strerror or err.__class__.__name__}); fix or remove the file") from None
    lines = head.lstrip("\ufeff").lstrip().splitlines()
    if not lines or lines[0].rstrip() != "---":
        return []
    for end in range(1, len(lines)):
        if lines[end].rstrip() == "---":
            return lines[1:end]
    return []  # never closed (within the bound): not front matter, as the hub reads it


def _uncommented(text: str) -> str:
    """`text` up to its YAML comment: a `#` at the start or after a space, outside quotes."""
    quote = None
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote  # '' inside single quotes closes and reopens: the same
        elif char in "'\"" and (i == 0 or text[i - 1] in " \t[,"):  # a quote opens only a scalar
            quote = char
        elif char == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i].strip()
    return text.strip()


def _bad_card(path: Path) -> InputError:
    return InputError(f"{path}: base_model in its front matter is neither a model id nor a list of one; fix the "
                      "model card, or pass --base")


def _scalar(text: str, path: Path) -> str | None:
    """A plain or quoted YAML scalar holding a model id or path; None for null."""
    text = text.strip()
    if text[:1] in ("'", '"'):
        if len(text) < 2 or text[-1] != text[0] or text[0] in text[1:-1]:
            raise _bad_card(path)
        text = text[1:-1].strip()
        return text or None
    if text[:1] in ("|", ">", "&", "*", "!", "{", "[", "-", "?") or ": " in text:
        raise _bad_card(path)  # block scalars, anchors, tags, mappings: not a model id
    return None if text in _NULLS else text


def _flow_list(text: str, path: Path) -> list[str | None]:
    if not text.endswith("]") or "[" in text[1:]:
        raise _bad_card(path)
    return [_scalar(item, path) for item in text[1:-1].split(",") if item.strip()]


def _block_list(lines: list[str], path: Path) -> list[str | None]:
    """The `- id` lines under `base_model:`, up to the next top-level key."""
    items = []
    for line in lines:
        text = _uncommented(line)
        if not text:
            continue
        if not text.startswith("-"):
            if line[:1].isspace():
                raise _bad_card(path)  # a nested mapping or a continued scalar
            break  # the next key: base_model was null or its list ended
        items.append(_scalar(text[1:], path))
    return items


def _one_base(items: list[str], path: Path) -> str | None:
    if len(items) > 1:
        raise InputError(f"{path}: base_model lists {len(items)} models (a merge); pass --base with the one to fuse "
                         "against")
    return items[0] if items else None


def _json_field(path: Path, key: str) -> str | None:
    from .io.bounded_json import JsonLimits, loads
    from .io.files import read_side_file

    try:
        data = loads(read_side_file(path).data, JsonLimits(*_RECORD_LIMITS), where=str(path), what="config",
                     fix="fix or replace the file")
    except OSError as err:
        raise InputError(f"{path}: not readable ({err.strerror or err.__class__.__name__}); fix or replace the "
                         "file") from None
    value = data.get(key) if isinstance(data, dict) else None
    return (value.strip() or None) if isinstance(value, str) else None
