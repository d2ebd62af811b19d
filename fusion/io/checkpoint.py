"""A checkpoint on disk: one `.safetensors` file or a Hugging Face model folder, read lazily.

A folder holds `model.safetensors`, or shards listed by `model.safetensors.index.json`; a PEFT
adapter folder (`adapter_config.json` and `adapter_model.safetensors`) holds its factors. The
index is checked as strictly as the files: its shard names are plain file names inside the
folder, every tensor it lists is in the shard it names, and every tensor of a shard is listed.
Pickle formats are refused: loading them can run code.

Files are named as in a model folder: a lone `.safetensors` file is `model.safetensors`, whatever
its own name, so a renamed or moved copy is the same checkpoint.

Fingerprint: sha256 over each file's name, size and header bytes. It is cheap (no tensor data is
read) and tells whether a path still holds the same layout; what the store trusts for content
is the block checksums (`fusion.io.integrity`), per file name as `files` lists them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import InputError
from .bounded_json import JsonLimits, loads
from .files import check_inside, check_opened, open_input
from .format import TensorInfo
from .integrity import FileDigests
from .reader import SafetensorsFile, open_files

__all__ = ["Checkpoint", "open_checkpoint", "HF_WEIGHTS", "HF_INDEX", "ADAPTER_WEIGHTS", "ADAPTER_CONFIG",
           "PICKLE_SUFFIXES", "refuse_pickle", "is_adapter_folder"]

HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # what PEFT's save_pretrained writes
ADAPTER_CONFIG = "adapter_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# An index is {"metadata": {...}, "weight_map": {tensor: shard}}: a line per tensor, a few levels.
MAX_INDEX_BYTES = 64 * 1024 * 1024
_INDEX_LIMITS = JsonLimits(depth=8, brackets=1 << 16, commas=1 << 22)


def refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise InputError(f"{path}: pickle checkpoints are not read (loading them can run code); convert it to "
                         "safetensors first, e.g. safetensors.torch.save_file(state_dict, 'model.safetensors')")


def _plain_file_name(name, index: Path) -> str:
    """A shard name from an index: a file name in the index's folder, nothing that leaves it."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise InputError(f"{index}: shard name {name!r} is not a plain file name in the folder; fix the index")
    return name


def _read_index(index: Path) -> dict[str, str]:
    """{tensor: shard file name} from a safetensors index, read within bounds and validated."""
    with os.fdopen(open_input(index), "rb") as f:  # checked as opened: a regular file inside its folder
        raw = f.read(MAX_INDEX_BYTES + 1)  # never more, whatever the file claims or grows to
    if len(raw) > MAX_INDEX_BYTES:
        raise InputError(f"{index}: larger than the {MAX_INDEX_BYTES:,} bytes an index may have; re-save the model")
    content = loads(raw, _INDEX_LIMITS, where=str(index), what="safetensors index", fix="re-save the model")
    if not isinstance(content, dict) or "weight_map" not in content:
        raise InputError(f"{index}: not a valid safetensors index (needs a 'weight_map'); re-save the model")
    weight_map = content["weight_map"]
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{index}: 'weight_map' must map tensor names to shard files; re-save the model")
    return {str(tensor): _plain_file_name(shard, index) for tensor, shard in weight_map.items()}


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """A PEFT adapter: a folder with adapter_config.json and adapter_model.safetensors."""
    folder = Path(path)
    return (folder / ADAPTER_CONFIG).is_file() and (folder / ADAPTER_WEIGHTS).is_file()


def _folder_file(folder: Path, name: str) -> Path:
    """folder/name, refused in one line if it is a link out of the folder (fusion.io.files.check_inside)."""
    check_inside(folder / name, folder)
    return folder / name


def _folder_files(folder: Path) -> tuple[dict[str, Path], dict[str, str] | None]:
    """The safetensors files of a model folder by name, and the index's weight map if sharded."""
    if is_adapter_folder(folder):
        return {ADAPTER_WEIGHTS: _folder_file(folder, ADAPTER_WEIGHTS)}, None
    index = folder / HF_INDEX
    if index.is_file():
        weight_map = _read_index(_folder_file(folder, HF_INDEX))
        names = dict.fromkeys(weight_map.values())
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise InputError(f"{index}: lists shard {missing[0]}, which is not in {folder}; restore it or re-save the model")
        return {n: _folder_file(folder, n) for n in names}, weight_map
    if (folder / HF_WEIGHTS).is_file():
        return {HF_WEIGHTS: _folder_file(folder, HF_WEIGHTS)}, None
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise InputError(f"{folder}: holds only pickle weights ({', '.join(pickles)}); convert them to safetensors "
                         "first, e.g. model.save_pretrained(folder, safe_serialization=True)")
    raise InputError(f"{folder}: no {HF_WEIGHTS}, {HF_INDEX} or {ADAPTER_WEIGHTS} with {ADAPTER_CONFIG}; pass a "
                     ".safetensors file, a Hugging Face model folder or a PEFT adapter folder")


def _check_index(weight_map: Mapping[str, str], files: Mapping[str, SafetensorsFile], index: Path) -> None:
    for tensor, shard in weight_map.items():
        if tensor not in files[shard].entries:
            raise InputError(f"{index}: tensor {tensor!r} is listed in {shard}, which does not hold it; re-save the model")
    for shard, f in files.items():
        unlisted = [t for t in f.entries if weight_map.get(t) != shard]
        if unlisted:
            raise InputError(f"{f.path}: tensor {unlisted[0]!r} is not listed for this shard in {index.name}; "
                             "re-save the model")


def _source_files(path: Path) -> tuple[dict[str, Path], dict[str, str] | None]:
    refuse_pickle(path)
    if path.is_dir():
        return _folder_files(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise InputError(f"{path}: not a .safetensors file; pass a .safetensors file or a model folder")
        return {HF_WEIGHTS: path}, None  # a lone file counts as a folder's model.safetensors: its name is not content
    raise InputError(f"{path}: no such checkpoint; pass a .safetensors file or a model folder")


class Checkpoint:
    """A checkpoint's tensors by name, across its files, read slice by slice.

    `digests` ({file name: FileDigests}) makes every read checked; `record=True` computes them
    as the checkpoint is read (`recorded()`). `where` prefixes error messages (default: the path).
    """

    def __init__(self, path: str | os.PathLike, *, digests: Mapping[str, FileDigests] | None = None,
                 record: bool = False, where: str | None = None):
        self.path = Path(path)
        paths, weight_map = _source_files(self.path)
        if digests is not None and set(digests) != set(paths):
            raise InputError(f"{where or self.path}: holds the files {sorted(paths)}, but the store recorded "
                             f"{sorted(digests)}; point it at the checkpoint the store was made from")
        self.files: dict[str, SafetensorsFile] = {}
        for name, p in paths.items():  # opened one by one so a failure closes what is open
            try:
                label = f"{where} ({name})" if where and len(paths) > 1 else (where or str(p))
                self.files.update(open_files({name: p}, digests=(digests or {}).get(name), record=record,
                                             where=label))
                if self.path.is_dir():  # the file as opened, in case a link was swapped in since the check
                    check_opened(self.files[name]._fd, p, folder=self.path)
            except BaseException:
                self.close()
                raise
        try:
            self._where = self._locate(weight_map)
        except BaseException:
            self.close()
            raise

    def _locate(self, weight_map: dict[str, str] | None) -> dict[str, SafetensorsFile]:
        if weight_map is not None:
            _check_index(weight_map, self.files, self.path / HF_INDEX)
        where: dict[str, SafetensorsFile] = {}
        for f in self.files.values():
            for name in f.entries:
                if name in where:
                    raise InputError(f"{f.path}: tensor {name!r} also appears in {where[name].path}; re-save the model")
                where[name] = f
        return where

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what it holds -----------------------------------------------------------------------

    @property
    def is_folder(self) -> bool:
        return self.path.is_dir()

    @property
    def is_adapter(self) -> bool:
        """A PEFT adapter folder: its tensors are LoRA factors (fusion.io.adapter)."""
        return self.is_folder and ADAPTER_WEIGHTS in self.files

    @property
    def name(self) -> str:
        """A default task name: the file's stem or the folder's name."""
        return self.path.resolve().name if self.is_folder else self.path.stem

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def info(self, name: str) -> TensorInfo:
        return self._where[name].entries[name]

    def file_of(self, name: str) -> SafetensorsFile:
        return self._where[name]

    @property
    def nbytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def fingerprint(self) -> str:
        """sha256 over each file's name, size and header bytes (see the module docstring)."""
        digest = hashlib.sha256()
        for name, f in sorted(self.files.items()):
            digest.update(f"{name}\0{f.size}\0".encode())
            digest.update(f.header_bytes)
        return digest.hexdigest()

    def recorded(self) -> dict[str, FileDigests]:
        """Block digests of every file (a checkpoint opened with record=True)."""
        return {name: f.recorded() for name, f in self.files.items()}

    # -- reading -----------------------------------------------------------------------------

    def view_flat(self, name: str, lo: int = 0, hi: int | None = None) -> np.ndarray:
        return self._where[name].view_flat(name, lo, hi)

    def read_flat(self, name: str, lo: int = 0, hi: int | None = None) -> np.ndarray:
        return self._where[name].read_flat(name, lo, hi)

    def read(self, name: str) -> np.ndarray:
        return self._where[name].read(name)

    def read_flat_into(self, name: str, lo: int, hi: int, out: np.ndarray) -> np.ndarray:
        return self._where[name].read_flat_into(name, lo, hi, out)


def open_checkpoint(path: str | os.PathLike, **options) -> Checkpoint:
    """Open a `.safetensors` file or a Hugging Face model folder for lazy reading (see Checkpoint)."""
    return Checkpoint(path, **options)
