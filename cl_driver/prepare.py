"""Turn torchvision's or Hugging Face `datasets`' copies of a dataset into image folders.

Output layout (what a `folder` source reads)::

    OUT/<task>/train/000_<class>/000000.png
    OUT/<task>/test/...

Class folders are numbered in label order, so their sorted order is the label order; every
class gets a folder, even one without images in a split. torchvision and datasets are imported
only here, only when a command needs them: the rest of the project runs without them.

`write_split` cuts one's own folder of class folders into OUT/{train,test,val}/<class>/ with the
same seeded per-class cut as a folder source's `split` (data.stratified_split), as hard links
where the filesystem allows, else copies.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from tqdm.auto import tqdm

# task -> (torchvision class, train kwargs, test kwargs); None: the dataset has one split,
# cut here into train and test with a seeded random permutation.
MTIL_TORCHVISION: dict[str, tuple[str, dict | None, dict | None]] = {
    "aircraft": ("FGVCAircraft", {"split": "trainval", "annotation_level": "variant"},
                 {"split": "test", "annotation_level": "variant"}),
    "caltech101": ("Caltech101", None, None),
    "cifar100": ("CIFAR100", {"train": True}, {"train": False}),
    "dtd": ("DTD", {"split": "train"}, {"split": "test"}),
    "eurosat": ("EuroSAT", None, None),
    "flowers": ("Flowers102", {"split": "train"}, {"split": "test"}),
    "food": ("Food101", {"split": "train"}, {"split": "test"}),
    "mnist": ("MNIST", {"train": True}, {"train": False}),
    "oxford_pet": ("OxfordIIITPet", {"split": "trainval"}, {"split": "test"}),
    "cars": ("StanfordCars", {"split": "train"}, {"split": "test"}),
    "sun397": ("SUN397", None, None),
}


def class_folder_name(label: int, name: str) -> str:
    """'012_f-a-18': the label first (so sorting keeps label order), then a file-safe name."""
    return f"{label:03d}_{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-').lower() or 'class'}"


def save_image(image, path_without_suffix: Path) -> Path:
    """Small images as PNG (lossless), photos as JPEG; always RGB."""
    image = image.convert("RGB")
    small = max(image.size) <= 64
    path = path_without_suffix.with_suffix(".png" if small else ".jpg")
    image.save(path, **({} if small else {"quality": 95}))
    return path


def export_split(samples: Iterable[tuple[Any, int]], class_names: Sequence[str], out: str | os.PathLike,
                 *, desc: str | None = None, total: int | None = None) -> list[int]:
    """Write (PIL image, label) pairs into OUT/<NNN_class>/; return the count per class."""
    out = Path(out)
    folders = [out / class_folder_name(i, name) for i, name in enumerate(class_names)]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    counts = [0] * len(class_names)
    for n, (image, label) in enumerate(tqdm(samples, desc=desc, total=total, disable=desc is None)):
        label = int(label)
        if not 0 <= label < len(class_names):
            raise ValueError(f"{out}: label {label} out of range for {len(class_names)} class_names")
        save_image(image, folders[label] / f"{n:06d}")
        counts[label] += 1
    return counts


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded random train/test cut of range(n), each part in increasing order."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = int(round(n * test_fraction))
    return sorted(order[n_test:]), sorted(order[:n_test])


def _pairs(dataset, indices: Sequence[int] | None = None):
    """(image, label) pairs of a torchvision-style dataset (dataset[i] -> (image, label))."""
    for i in range(len(dataset)) if indices is None else indices:
        image, label = dataset[i]
        yield image, label


def prepare_torchvision(task: str, class_names: Sequence[str], root: str | os.PathLike, out: str | os.PathLike, *,
                        download: bool = False, test_fraction: float = 0.2, seed: int = 0,
                        progress: bool = True) -> dict[str, list[int]]:
    """Write one MTIL task from torchvision's dataset into OUT/<task>/{train,test}/."""
    import torchvision.datasets as tv  # only on a machine that has torchvision

    if task not in MTIL_TORCHVISION:
        raise ValueError(f"prepare: no torchvision recipe for {task!r}; choose one of {', '.join(MTIL_TORCHVISION)}")
    cls_name, train_kw, test_kw = MTIL_TORCHVISION[task]
    cls = getattr(tv, cls_name)
    root, out = str(Path(root) / task), Path(out) / task
    counts = {}
    if train_kw is None:
        full = cls(root, download=download)
        train_idx, test_idx = split_indices(len(full), test_fraction, seed)
        parts = {"train": (full, train_idx), "test": (full, test_idx)}
    else:
        parts = {"train": (cls(root, download=download, **train_kw), None),
                 "test": (cls(root, download=download, **test_kw), None)}
    for split, (dataset, indices) in parts.items():
        total = len(dataset) if indices is None else len(indices)
        counts[split] = export_split(_pairs(dataset, indices), class_names, out / split, total=total,
                                     desc=f"{task} {split}" if progress else None)
    return counts


def _rows(dataset, image_column: str, label_column: str):
    for row in dataset:
        yield row[image_column], row[label_column]


def prepare_datasets(dataset_dict, class_names: Sequence[str], out: str | os.PathLike, *, image_column: str = "image",
                     label_column: str = "label", splits: dict[str, str] | None = None,
                     progress: bool = True) -> dict[str, list[int]]:
    """Write a `datasets`-style mapping of splits (rows of {image, label}) as image folders."""
    splits = splits or {"train": "train", "test": "test"}
    counts = {}
    for split, source_split in splits.items():
        if source_split not in dataset_dict:
            raise ValueError(f"prepare: the dataset has no split {source_split!r} (has {list(dataset_dict)}); "
                             f"pass --{split}-split")
        data = dataset_dict[source_split]
        counts[split] = export_split(_rows(data, image_column, label_column), class_names, Path(out) / split,
                                     total=len(data), desc=f"{split}" if progress else None)
    return counts


def load_datasets_source(source: str):
    """A dataset saved with `save_to_disk` (a folder), else a hub name for `load_dataset`."""
    import datasets  # only on a machine that has it

    return datasets.load_from_disk(source) if Path(source).exists() else datasets.load_dataset(source)


def dataset_class_names(dataset_dict, label_column: str) -> list[str]:
    """Class names from a ClassLabel feature, for datasets that carry them."""
    first = next(iter(dataset_dict.values()))
    feature = getattr(first, "features", {}).get(label_column)
    names = getattr(feature, "names", None)
    if not names:
        raise ValueError(f"prepare: the label column {label_column!r} has no class names; pass --class-names FILE")
    return [n.replace("_", " ") for n in names]


# ---------------------------------------------------------------- one's own folder


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link to `source` at `target`, or a copy where links are refused (another filesystem)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _check_split_paths(root: Path, out: Path) -> None:
    if not root.is_dir():
        raise ValueError(f"{root}: no such folder; give a folder of class folders (FOLDER/<class>/*.png)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not empty; choose a new --out (nothing is overwritten)")
    if out.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"{out}: inside {root}, where it would read as one more class; choose --out outside it")


def write_split(folder: str | os.PathLike, out: str | os.PathLike, *, test: float = 0.2, val: float = 0.1,
                seed: int = 0) -> dict[str, list[int]]:
    """Cut FOLDER/<class>/* into OUT/{train,test[,val]}/<class>/ (per class, seeded; every class
    keeps at least one training image and a folder in every split); return the count per class of
    each split. OUT is written whole under a temporary name, then renamed: an error leaves nothing."""
    from .config import SplitSettings, validated
    from .data import cut_folder

    root, out = Path(folder), Path(out)
    settings = validated(SplitSettings, {"test": test, "val": val, "seed": seed}, "condu-cl prepare split")
    _check_split_paths(root, out)
    classes, files = cut_folder(root, None, test=settings.test, val=settings.val, seed=settings.seed)
    splits = [s for s in ("train", "test", "val") if s != "val" or settings.val > 0]
    tmp = out.resolve().with_name(f".{out.resolve().name}.{os.getpid()}.tmp")
    try:
        for split in splits:
            for name in classes:
                (tmp / split / name).mkdir(parents=True)
            for _, file in files[split]:
                _link_or_copy(root / file, tmp / split / file)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return {split: [sum(1 for label, _ in files[split] if label == i) for i in range(len(classes))]
            for split in splits}
