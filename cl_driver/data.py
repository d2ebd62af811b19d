"""Task specs and their images: image folders, `datasets` saved on disk, the built-in tasks.

A split is a list of labels and a way to fetch image i as a PIL image; pixels are made by the
model's own image processor. Small splits are turned into one pixel tensor once (the mini
benchmark); large ones stream through a DataLoader (MTIL).

A folder task's classes are its class folders: named by `class_names` when the config gives them,
else by the folders' own names made readable. A folder source with `split` is one folder of class
folders, cut here into train/test/val per class with a seed (`stratified_split`); `resolve_task`
records the cut in RECORD_DIR/<task>.json when given a folder, and reads it back from there.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from .config import DEFAULT_TEMPLATES, TaskConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MATERIALIZE_BYTES = 512 * 2**20  # splits whose pixels fit in this many bytes are kept as one tensor


@dataclass(frozen=True)
class TaskSpec:
    """A task with its class names and templates resolved (builtin tasks bring their own)."""

    name: str
    class_names: tuple[str, ...]
    templates: tuple[str, ...]
    source: dict
    max_train: int | None = None
    max_test: int | None = None
    class_folders: tuple[str, ...] | None = None  # folder sources: the class folders' names, in label order
    files: dict | None = None  # a folder source with `split`: {split: [(label, "class/file"), ...]}


@dataclass
class Split:
    """Labels plus a loader of image i (a PIL RGB image)."""

    labels: list[int]
    load: Callable[[int], "object"]

    def __len__(self) -> int:
        return len(self.labels)


def resolve_task(task: TaskConfig, *, record_dir: str | os.PathLike | None = None) -> TaskSpec:
    """The task with its class names and templates filled in (a builtin task's own; a ClassLabel's
    names; the class folders' names, made readable; DEFAULT_TEMPLATES). A folder source with
    `split` gets its files cut into train/test/val, recorded in `record_dir` when given (a run's
    splits/ folder) and read back from there, so a resumed run uses the same split."""
    class_names, templates, source = task.class_names, task.templates, task.source_dict
    folders, files = None, None
    if source["kind"] == "builtin":
        builtin = _builtin(source["task"])
        class_names = class_names or tuple(builtin.class_names)
        templates = templates or tuple(builtin.templates)
    elif source["kind"] == "folder":
        if source.get("split"):
            folders, files = own_split(task.name, source, class_names, record_dir)
        elif class_names is None:
            folders = tuple(class_folder_names(_class_root(source)))
        class_names = class_names or readable_class_names(folders)
    elif class_names is None:  # hf_disk
        class_names = hf_class_names(source)
    return TaskSpec(task.name, tuple(class_names), tuple(templates or DEFAULT_TEMPLATES), source, task.max_train,
                    task.max_test, folders, files)


def _builtin(name: str):
    from .mini.tasks import BUILTIN_TASKS, get_task

    if name not in BUILTIN_TASKS:
        raise ValueError(f"source.task: no builtin task {name!r}; choose one of {', '.join(BUILTIN_TASKS)}")
    return get_task(name)


# ---------------------------------------------------------------- sources


def readable_class_name(folder: str) -> str:
    """'012_sea_lion' -> 'sea lion': a leading ordering number and its '_' dropped (as `condu-cl
    prepare` writes them), '_' and '-' read as spaces."""
    name = re.sub(r"^\d+_(?=.)", "", folder)
    return " ".join(re.sub(r"[_-]+", " ", name).split()) or folder


def readable_class_names(folders: Sequence[str]) -> tuple[str, ...]:
    """Class names from class folders' names, refused when two folders read the same."""
    names = tuple(readable_class_name(f) for f in folders)
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ValueError(f"class folders {folders[names.index(name)]!r} and {folders[i]!r} both read as "
                             f"{name!r}; rename one, or give the task class_names")
    return names


def _no_folder(root: Path) -> ValueError:
    return ValueError(f"{root}: no such image folder; run `condu-cl prepare` or fix source.path")


def class_folder_names(root: Path) -> list[str]:
    """The sub-folders of `root` (one per class), sorted; hidden ones skipped."""
    if not root.is_dir():
        raise _no_folder(root)
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise ValueError(f"{root}: no class folders; put each class's images in a sub-folder named after the class")
    return names


def _check_not_unsplit(path: Path) -> None:
    """A folder source's `path` of class folders without train/ inside: say how to split it."""
    if not (path / "train").is_dir() and path.is_dir() and any(p.is_dir() for p in path.iterdir()):
        raise ValueError(f"{path}: no train/ and test/ inside; to cut its class folders into splits, add "
                         "`split: {test: 0.2, val: 0.1}` to the task's source, or write the split with "
                         f"`condu-cl prepare split {path} --out DIR`")


def _class_root(source: dict) -> Path:
    """The folder whose sub-folders name a folder source's classes: train/'s."""
    if source.get("train"):
        return Path(source["train"])
    _check_not_unsplit(Path(source["path"]))
    return Path(source["path"]) / "train"


def _class_folders(root: Path, class_names: Sequence[str]) -> list[Path]:
    """Sub-folders of `root` in class order: by name when they match, else in sorted order."""
    if not root.is_dir():
        raise _no_folder(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    by_name = {p.name: p for p in folders}
    if all(name in by_name for name in class_names):
        return [by_name[name] for name in class_names]
    if len(folders) != len(class_names):
        raise ValueError(f"{root}: {len(folders)} class folders but {len(class_names)} class_names; "
                         "name the folders after the classes or list one class per folder")
    return folders


def _named_folders(root: Path, names: Sequence[str]) -> list[Path]:
    """root/<name> for each class folder name, in label order; a split may lack a class, never add one."""
    if not root.is_dir():
        raise _no_folder(root)
    extra = sorted(set(class_folder_names(root)) - set(names))
    if extra:
        raise ValueError(f"{root}: class folders {extra} are not among the task's classes {list(names)} "
                         "(taken from train/); give every split the same class folders")
    return [root / name for name in names]


def image_files(folder: Path) -> list[Path]:
    """The images of a class folder (by suffix), sorted; hidden files skipped."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _listed(paths: Sequence[Path], labels: Sequence[int]) -> Split:
    from PIL import Image

    return Split(list(labels), lambda i: Image.open(paths[i]).convert("RGB"))


def folder_split(root: str | os.PathLike, class_names: Sequence[str], *,
                 folders: Sequence[str] | None = None) -> Split:
    """One sub-folder per class (named `folders` when given, in label order); files with an image
    suffix, in sorted order."""
    root = Path(root)
    paths, labels = [], []
    chosen = _named_folders(root, folders) if folders is not None else _class_folders(root, class_names)
    for label, folder in enumerate(chosen):
        files = image_files(folder)
        paths += files
        labels += [label] * len(files)
    return _listed(paths, labels)


# ---------------------------------------------------------------- a folder's own split

SPLITS = ("train", "test", "val")
SPLIT_RECORD_VERSION = 1


def split_counts(n: int, test: float, val: float) -> tuple[int, int]:
    """(n_test, n_val) of a class of n images: the rounded shares, cut (val first) so that at
    least one image trains."""
    n_test, n_val = int(n * test + 0.5), int(n * val + 0.5)
    n_val = min(n_val, max(n - 1 - n_test, 0))
    return min(n_test, max(n - 1 - n_val, 0)), n_val


def stratified_split(classes: Mapping[str, Sequence[str]], *, test: float, val: float = 0.0,
                     seed: int = 0) -> dict[str, list[tuple[int, str]]]:
    """Cut each class's files (class folder -> file names, in label order) into train/test/val.

    Each class is shuffled by its own seeded generator (the seed and the folder's name), so a
    class's cut depends only on its own files; shares are rounded per class and every class keeps
    at least one training image. Returns {split: [(label, "folder/file"), ...]}, sorted."""
    out: dict[str, list[tuple[int, str]]] = {split: [] for split in SPLITS}
    for label, (folder, files) in enumerate(classes.items()):
        order = sorted(files)
        random.Random(f"{seed}/{folder}").shuffle(order)
        n_test, n_val = split_counts(len(order), test, val)
        parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
        for split, names in parts.items():
            out[split] += [(label, f"{folder}/{name}") for name in sorted(names)]
    return out


def folder_classes(root: Path, class_names: Sequence[str] | None) -> dict[str, list[str]]:
    """root's class folders in label order (by class_names when given), each with its image file
    names; a class without images is refused."""
    folders = ([p.name for p in _class_folders(root, class_names)] if class_names is not None
               else class_folder_names(root))
    if {"train", "test"} <= set(folders):
        raise ValueError(f"{root}: has train/ and test/ folders, so it is split already; drop `split` from the "
                         "source (a folder source reads train/ and test/)")
    classes = {folder: [p.name for p in image_files(root / folder)] for folder in folders}
    for folder, files in classes.items():
        if not files:
            raise ValueError(f"{root / folder}: no images ({', '.join(IMAGE_SUFFIXES)}); add some or remove "
                             "the class folder")
    return classes


def cut_folder(root: Path, class_names: Sequence[str] | None, *, test: float, val: float = 0.0,
               seed: int = 0) -> tuple[dict[str, list[str]], dict[str, list[tuple[int, str]]]]:
    """root's classes (folder -> image names) and their stratified cut; refused when no image
    is left to test."""
    classes = folder_classes(root, class_names)
    files = stratified_split(classes, test=test, val=val, seed=seed)
    if not files["test"]:
        raise ValueError(f"{root}: a test share of {test:g} leaves no test image (each class keeps one to train); "
                         "add images, or raise the test share")
    return classes, files


def _split_record(name: str, root: Path, settings: dict, folders: Sequence[str], files: dict) -> dict:
    return {"version": SPLIT_RECORD_VERSION, "task": name, "root": str(root), "split": settings,
            "class_folders": list(folders), "files": {k: [list(e) for e in v] for k, v in files.items()}}


def _read_split_record(path: Path, root: Path, folders: Sequence[str]) -> tuple[tuple[str, ...], dict]:
    """A recorded split, checked against the folder it came from."""
    try:
        record = json.loads(path.read_text())
        recorded, files = tuple(record["class_folders"]), {k: [(int(lab), str(f)) for lab, f in v]
                                                           for k, v in record["files"].items()}
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path}: not a split record; remove it to split again, or use a new run folder") from None
    if list(recorded) != list(folders):
        raise ValueError(f"{path}: this run split {root} into the classes {list(recorded)}, but it now has "
                         f"{list(folders)}; restore the class folders, or start a new run folder (--out)")
    missing = [f for entries in files.values() for _, f in entries if not (root / f).is_file()]
    if missing:
        raise ValueError(f"{path}: {len(missing)} images of this run's split are gone from {root} (first: "
                         f"{missing[0]}); restore them, or start a new run folder (--out)")
    return recorded, files


def _write_json_atomically(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def own_split(name: str, source: dict, class_names: Sequence[str] | None,
              record_dir: str | os.PathLike | None = None) -> tuple[tuple[str, ...], dict]:
    """(class folders, {split: [(label, "folder/file")]}) of a folder source with `split`: the record
    in record_dir/<name>.json when there is one, else a new cut (recorded there when given)."""
    root, settings = Path(source["path"]), dict(source["split"])
    record = Path(record_dir) / f"{name}.json" if record_dir is not None else None
    if record is not None and record.exists():
        return _read_split_record(record, root, list(folder_classes(root, class_names)))
    classes, files = cut_folder(root, class_names, test=settings["test"], val=settings.get("val", 0.0),
                                seed=settings.get("seed", 0))
    if record is not None:
        _write_json_atomically(_split_record(name, root, settings, list(classes), files), record)
    return tuple(classes), files


def listed_split(root: str | os.PathLike, entries: Sequence[tuple[int, str]]) -> Split:
    """The images of one part of a recorded split: (label, "folder/file") pairs under root."""
    return _listed([Path(root) / f for _, f in entries], [label for label, _ in entries])


def hf_class_names(source: dict) -> tuple[str, ...]:
    """A saved dataset's class names from its label column's ClassLabel feature, '_' read as spaces."""
    import datasets  # optional dependency: only runs that use hf_disk sources need it

    data = datasets.load_from_disk(source["path"])
    if isinstance(data, datasets.DatasetDict):
        data = data.get(source.get("train_split", "train")) or next(iter(data.values()))
    column = source.get("label_column", "label")
    names = getattr(getattr(data, "features", {}).get(column), "names", None)
    if not names:
        raise ValueError(f"{source['path']}: the label column {column!r} carries no class names; give the task "
                         "class_names")
    return tuple(str(n).replace("_", " ") for n in names)


def hf_disk_split(source: dict, split: str) -> Split:
    """A split of a dataset written by `datasets.save_to_disk` (imported only here)."""
    import datasets  # optional dependency: only runs that use hf_disk sources need it

    data = datasets.load_from_disk(source["path"])
    name = source.get(f"{split}_split", split)
    if isinstance(data, datasets.DatasetDict):
        if name not in data:
            raise ValueError(f"{source['path']}: no split {name!r} (has {list(data)}); set source.{split}_split")
        data = data[name]
    image_col, label_col = source.get("image_column", "image"), source.get("label_column", "label")
    labels = [int(v) for v in data[label_col]]
    return Split(labels, lambda i: data[i][image_col].convert("RGB"))


def builtin_split(source: dict, split: str, *, image_size: int, seed: int = 0, n: int | None = None) -> Split:
    """A built-in task's split, rendered at the model's image size (only `n` images when given)."""
    images, labels = _builtin(source["task"]).render(split, n, image_size=image_size, seed=seed)
    return Split(list(map(int, labels)), lambda i: images[i].convert("RGB"))


def load_split(spec: TaskSpec, split: str, *, image_size: int = 224, seed: int = 0, limit: int | None = None) -> Split:
    """The `train` or `test` split of a task, capped to a seeded subset of `limit` images
    (and of the task's own max_train / max_test: the smaller cap wins)."""
    kind = spec.source["kind"]
    own = spec.max_train if split == "train" else spec.max_test
    limit = min((cap for cap in (limit, own) if cap), default=None)
    if kind == "builtin":  # rendering is the cost: draw only the images asked for
        return builtin_split(spec.source, split, image_size=image_size, seed=seed, n=limit)
    if kind == "folder":
        full = _folder_source_split(spec, split)
    elif kind == "hf_disk":
        full = hf_disk_split(spec.source, split)
    return subset(full, limit, seed=seed)


def _folder_source_split(spec: TaskSpec, split: str) -> Split:
    """A split of a folder source: its recorded cut, or the `split` sub-folder (or the folder
    given as `train` / `test`)."""
    source = spec.source
    if spec.files is not None:
        if not spec.files.get(split):
            raise ValueError(f"task {spec.name!r}: its split has no {split} images; raise split.{split}")
        return listed_split(source["path"], spec.files[split])
    if not (source.get(split) or source.get("path")):
        raise ValueError(f"task {spec.name!r}: no {split} images: the source gives `train` and `test` only")
    if not source.get(split):
        _check_not_unsplit(Path(source["path"]))
    root = source.get(split) or Path(source["path"]) / split
    return folder_split(root, spec.class_names, folders=spec.class_folders)


def subset(split: Split, limit: int | None, *, seed: int = 0) -> Split:
    """A seeded random subset of `limit` images, kept in their original order."""
    if limit is None or limit >= len(split):
        return split
    generator = torch.Generator().manual_seed(seed)
    keep = sorted(torch.randperm(len(split), generator=generator)[:limit].tolist())
    return Split([split.labels[i] for i in keep], lambda j: split.load(keep[j]))


def few_shot(split: Split, shots: int, *, seed: int = 0) -> Split:
    """`shots` images of every class (all of a class that has fewer), a seeded choice, kept in
    their original order."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor(split.labels)
    keep = []
    for label in sorted(set(split.labels)):
        members = (labels == label).nonzero().flatten()  # (n_c,)
        keep += members[torch.randperm(len(members), generator=generator)[:shots]].tolist()
    keep.sort()
    return Split([split.labels[i] for i in keep], lambda j: split.load(keep[j]))


# ---------------------------------------------------------------- pixels


class PixelDataset(torch.utils.data.Dataset):
    """(pixels (3, H, W), label) through the model's image processor, one image at a time."""

    def __init__(self, split: Split, processor):
        self.split, self.processor = split, processor

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        pixels = self.processor(images=[self.split.load(i)], return_tensors="pt")["pixel_values"][0]
        return pixels, self.split.labels[i]


def pixel_tensor(split: Split, processor, *, batch_size: int = 256) -> torch.Tensor:
    """All images of a split as one (N, 3, H, W) float tensor."""
    chunks = []
    for start in range(0, len(split), batch_size):
        images = [split.load(i) for i in range(start, min(start + batch_size, len(split)))]
        chunks.append(processor(images=images, return_tensors="pt")["pixel_values"])
    return torch.cat(chunks)


class _RawPixels(PixelDataset):
    """(3, H, W) uint8 pixels after resize and crop, before rescale and normalization."""

    def __getitem__(self, i: int):
        pixels = self.processor(images=[self.split.load(i)], return_tensors="pt", do_rescale=False,
                                do_normalize=False)["pixel_values"][0]
        return pixels.round().clamp(0, 255).to(torch.uint8), self.split.labels[i]


def write_pixel_cache(split: Split, processor, path: Path, side: int, *, num_workers: int = 0) -> None:
    """Decode, resize and crop every image once into a uint8 (N, 3, side, side) file."""
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(split), 3, side, side))
    loader = torch.utils.data.DataLoader(_RawPixels(split, processor), batch_size=64, num_workers=num_workers)
    start = 0
    for batch, _ in loader:
        pixels[start:start + len(batch)] = batch.numpy()
        start += len(batch)
    pixels.flush()
    del pixels
    os.replace(tmp, path)


class CachedPixels(torch.utils.data.Dataset):
    """A split read from its uint8 pixel cache (a .npy file), rescaled and normalized on the fly.

    Resize and crop of the slow (PIL) and fast (torchvision) CLIP processors both give uint8
    images, so the cache is exact; the normalization matches the processor's to float rounding.
    """

    def __init__(self, path: Path, labels: Sequence[int], processor):
        self.path, self.labels = path, list(labels)
        self.pixels = None  # opened lazily: memory maps do not travel to DataLoader workers
        scale = processor.rescale_factor if processor.do_rescale else 1.0
        mean = processor.image_mean if processor.do_normalize else [0.0, 0.0, 0.0]
        std = processor.image_std if processor.do_normalize else [1.0, 1.0, 1.0]
        self.scale, self.mean, self.std = scale, torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        if self.pixels is None:
            self.pixels = np.load(self.path, mmap_mode="r")
        raw = torch.from_numpy(np.array(self.pixels[i]))  # (3, H, W) uint8
        return (raw.float() * self.scale - self.mean) / self.std, self.labels[i]


def as_dataset(split: Split, processor, side: int, *, cache: str | os.PathLike | None = None,
               num_workers: int = 0) -> torch.utils.data.Dataset:
    """A TensorDataset when the pixels are small enough to keep; else one read from a uint8
    pixel cache at `cache` (written on first use), or else one that decodes every time."""
    if len(split) * 3 * side * side * 4 <= MATERIALIZE_BYTES:
        return torch.utils.data.TensorDataset(pixel_tensor(split, processor), torch.tensor(split.labels))
    if cache is not None:
        cache = Path(cache)
        if not cache.exists():
            write_pixel_cache(split, processor, cache, side, num_workers=num_workers)
        return CachedPixels(cache, split.labels, processor)
    return PixelDataset(split, processor)
