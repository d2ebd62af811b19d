import sys
import types

import pytest
import torch
from PIL import Image

from cl_driver.config import TaskConfig
from cl_driver.data import Split, as_dataset, few_shot, folder_split, load_split, resolve_task, subset

from tests.cl_driver.helpers import SIDE, TASKS, TEMPLATES, write_task_folder


def test_folder_split_maps_folders_to_class_names(tmp_path):
    write_task_folder(tmp_path, "stripes", n_train=3, n_test=2)
    split = folder_split(tmp_path / "stripes" / "train", ["vertical", "horizontal"])  # by name, in this order
    assert split.labels == [0, 0, 0, 1, 1, 1]
    assert split.load(0).size == (SIDE, SIDE)


def test_folders_named_otherwise_are_taken_in_sorted_order(tmp_path):
    for name in ["001_b", "000_a"]:
        (tmp_path / name).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / name / "x.png")
    assert folder_split(tmp_path, ["first", "second"]).labels == [0, 1]
    with pytest.raises(ValueError, match="2 class folders but 3 class_names"):
        folder_split(tmp_path, ["a", "b", "c"])


def test_subset_is_seeded_and_keeps_order(tmp_path):
    write_task_folder(tmp_path, "colors", n_train=6, n_test=1)
    spec = resolve_task(TaskConfig(name="colors", source={"kind": "folder", "path": str(tmp_path / "colors")},
                                   class_names=TASKS["colors"], templates=TEMPLATES, max_train=5))
    a, b = load_split(spec, "train", seed=3), load_split(spec, "train", seed=3)
    assert len(a) == 5 and a.labels == b.labels == sorted(a.labels)
    assert subset(a, None) is a


def test_few_shot_keeps_n_images_of_each_class_seeded_and_in_order():
    split = Split([0] * 6 + [1] * 3 + [2], lambda i: f"image {i}")
    chosen = few_shot(split, 2, seed=0)
    assert sorted(chosen.labels) == [0, 0, 1, 1, 2]  # a class with fewer images keeps them all
    picked = [int(chosen.load(j).split()[1]) for j in range(len(chosen))]
    assert picked == sorted(picked) and [split.labels[i] for i in picked] == chosen.labels
    assert [chosen.load(j) for j in range(len(chosen))] == [few_shot(split, 2, seed=0).load(j) for j in range(5)]
    draws = {tuple(few_shot(split, 2, seed=seed).load(j) for j in range(5)) for seed in range(8)}
    assert len(draws) > 1  # the seed chooses


def test_small_splits_become_one_pixel_tensor(tmp_path, tiny_model):
    from transformers import AutoImageProcessor

    write_task_folder(tmp_path, "light", n_train=2, n_test=1)
    processor = AutoImageProcessor.from_pretrained(tiny_model)
    dataset = as_dataset(folder_split(tmp_path / "light" / "train", TASKS["light"]), processor, SIDE)
    pixels, labels = dataset[:]
    assert pixels.shape == (4, 3, SIDE, SIDE) and labels.tolist() == [0, 0, 1, 1]


def test_hf_disk_source_reads_splits_through_load_from_disk(tmp_path, monkeypatch):
    class FakeDatasetDict(dict):
        pass

    rows = [{"img": Image.new("RGB", (4, 4), (i * 40, 0, 0)), "y": i % 2} for i in range(4)]

    class FakeSplit(list):
        def __getitem__(self, key):
            return [r[key] for r in self] if isinstance(key, str) else list.__getitem__(self, key)

    fake = types.SimpleNamespace(DatasetDict=FakeDatasetDict, Dataset=FakeSplit,
                                 load_from_disk=lambda path: FakeDatasetDict(train=FakeSplit(rows), valid=FakeSplit(rows[:2])))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    source = {"kind": "hf_disk", "path": str(tmp_path), "image_column": "img", "label_column": "y", "test_split": "valid"}
    spec = resolve_task(TaskConfig(name="t", source=source, class_names=("even", "odd"), templates=("{}",)))
    train, test = load_split(spec, "train"), load_split(spec, "test")
    assert train.labels == [0, 1, 0, 1] and test.labels == [0, 1]
    assert train.load(2).getpixel((0, 0)) == (80, 0, 0)


def test_builtin_source_uses_the_task_own_names_and_templates():
    from cl_driver.mini.tasks import BUILTIN_TASKS, get_task

    name = BUILTIN_TASKS[0]
    spec = resolve_task(TaskConfig(name=name, source={"kind": "builtin", "task": name}))
    assert list(spec.class_names) == list(get_task(name).class_names)
    split = load_split(spec, "test", image_size=SIDE, limit=6)
    assert len(split) == 6 and split.load(0).size == (SIDE, SIDE)
    with pytest.raises(ValueError, match="no builtin task"):
        resolve_task(TaskConfig(name="x", source={"kind": "builtin", "task": "no-such-task"}))


def test_pixel_cache_gives_the_processor_pixels(tmp_path, tiny_model, monkeypatch):
    from transformers import AutoImageProcessor

    import cl_driver.data as data

    write_task_folder(tmp_path, "colors", n_train=3, n_test=1)
    processor = AutoImageProcessor.from_pretrained(tiny_model)
    split = folder_split(tmp_path / "colors" / "train", TASKS["colors"])
    monkeypatch.setattr(data, "MATERIALIZE_BYTES", 0)  # as if the split were too large to keep
    cache = tmp_path / "pixels" / "colors.npy"
    cached = as_dataset(split, processor, SIDE, cache=cache)
    streamed = as_dataset(split, processor, SIDE)
    assert isinstance(cached, data.CachedPixels) and isinstance(streamed, data.PixelDataset)
    assert cache.stat().st_size >= len(split) * 3 * SIDE * SIDE
    for i in range(len(split)):
        (a, la), (b, lb) = cached[i], streamed[i]
        assert la == lb and torch.allclose(a, b, atol=1e-6)
    loader = torch.utils.data.DataLoader(cached, batch_size=4, num_workers=1)  # workers open their own map
    assert sum(len(x) for x, _ in loader) == len(split)
    assert len(as_dataset(split, processor, SIDE, cache=cache)) == len(split)  # reused, not rewritten


def test_image_size_comes_from_the_processor_crop(tiny_model):
    from transformers import AutoImageProcessor

    from cl_driver.models import image_size

    assert image_size(AutoImageProcessor.from_pretrained(tiny_model)) == SIDE
    assert image_size(type("P", (), {"crop_size": {"height": 48, "width": 48}})()) == 48
