"""Task specs and their images: image folders, `datasets` saved on disk, the built-in tasks.

A split is a list of labels and a way to fetch image i as a PIL image; pixels are made by the
model's own image processor. Small splits are turned into one pixel tensor once (the mini
benchmark); large ones stream through a DataLoader (MTIL).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .config import TaskConfig

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


@dataclass
class Split:
    """Labels plus a loader of image i (a PIL RGB image)."""

    labels: list[int]
    load: Callable[[int], "object"]

    def __len__(self) -> int:
        return len(self.labels)


def resolve_task(task: TaskConfig) -> TaskSpec:
    """Fill class names and templates of builtin tasks from the task's own definition."""
    class_names, templates, source = task.class_names, task.templates, task.source_dict
    if source["kind"] == "builtin":
        builtin = _builtin(source["task"])
        class_names = class_names or tuple(builtin.class_names)
        templates = templates or tuple(builtin.templates)
    return TaskSpec(task.name, tuple(class_names), tuple(templates), source, task.max_train, task.max_test)


def _builtin(name: str):
    from .mini.tasks import BUILTIN_TASKS, get_task

    if name not in BUILTIN_TASKS:
        raise ValueError(f"source.task: no builtin task {name!r}; choose one of {', '.join(BUILTIN_TASKS)}")
    return get_task(name)


# ---------------------------------------------------------------- sources


def _class_folders(root: Path, class_names: Sequence[str]) -> list[Path]:
    """Sub-folders of `root` in class order: by name when they match, else in sorted order."""
    if not root.is_dir():
        raise ValueError(f"{root}: no such image folder; run `condu-cl prepare` or fix source.path")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    by_name = {p.name: p for p in folders}
    if all(name in by_name for name in class_names):
        return [by_name[name] for name in class_names]
    if len(folders) != len(class_names):
        raise ValueError(f"{root}: {len(folders)} class folders but {len(class_names)} class_names; "
                         "name the folders after the classes or list one class per folder")
    return folders


def folder_split(root: str | os.PathLike, class_names: Sequence[str]) -> Split:
    """One sub-folder per class; files with an image suffix, in sorted order."""
    from PIL import Image

    paths, labels = [], []
    for label, folder in enumerate(_class_folders(Path(root), class_names)):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [label] * len(files)
    return Split(labels, lambda i: Image.open(paths[i]).convert("RGB"))


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
        root = spec.source.get(split) or Path(spec.source["path"]) / split
        full = folder_split(root, spec.class_names)
    elif kind == "hf_disk":
        full = hf_disk_split(spec.source, split)
    return subset(full, limit, seed=seed)


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
