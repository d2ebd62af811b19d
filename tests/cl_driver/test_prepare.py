import sys
import types

import pytest
from PIL import Image

from cl_driver.config import TaskConfig
from cl_driver.data import load_split, resolve_task
from cl_driver.prepare import class_folder_name, prepare_datasets, prepare_torchvision, split_indices, write_split


def image(value, size=8):
    return Image.new("L", (size, size), value)  # grayscale, as MNIST's: written as RGB


class FakeMNIST:
    """torchvision-like: dataset[i] -> (PIL image, int), train/test by a flag."""

    def __init__(self, root, train=True, download=False):
        self.items = [(image(10 * i), i % 3) for i in range(7 if train else 4)]
        self.root, self.download = root, download

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class FakeEuroSAT(FakeMNIST):
    """A torchvision-like dataset with a single split."""

    def __init__(self, root, download=False):
        self.items = [(image(5 * i, 80), i % 2) for i in range(10)]


@pytest.fixture
def fake_torchvision(monkeypatch):
    datasets = types.SimpleNamespace(MNIST=FakeMNIST, EuroSAT=FakeEuroSAT)
    monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(datasets=datasets))
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)


def folder_task(path, names):
    return resolve_task(TaskConfig(name="t", source={"kind": "folder", "path": str(path)}, class_names=tuple(names),
                                   templates=("{}",)))


def test_prepare_torchvision_writes_folders_the_folder_source_reads(tmp_path, fake_torchvision):
    names = ["zero", "one", "two"]
    counts = prepare_torchvision("mnist", names, tmp_path / "dl", tmp_path / "out", progress=False)
    assert counts == {"train": [3, 2, 2], "test": [2, 1, 1]}
    spec = folder_task(tmp_path / "out" / "mnist", names)
    train, test = load_split(spec, "train"), load_split(spec, "test")
    assert train.labels == [0, 0, 0, 1, 1, 2, 2] and test.labels == [0, 0, 1, 2]
    assert train.load(1).mode == "RGB" and train.load(1).getpixel((0, 0)) == (30, 30, 30)  # PNG: lossless


def test_single_split_datasets_are_cut_with_a_seed(tmp_path, fake_torchvision):
    counts = prepare_torchvision("eurosat", ["a", "b"], tmp_path, tmp_path / "out", test_fraction=0.3, progress=False)
    assert sum(counts["train"]) == 7 and sum(counts["test"]) == 3
    assert split_indices(10, 0.3, 0) == split_indices(10, 0.3, 0)
    train, test = split_indices(10, 0.3, 0)
    assert sorted(train + test) == list(range(10))
    assert any(p.suffix == ".jpg" for p in (tmp_path / "out" / "eurosat").rglob("*"))  # photos as JPEG


def test_unknown_task_is_refused(tmp_path, fake_torchvision):
    with pytest.raises(ValueError, match="no torchvision recipe"):
        prepare_torchvision("imagenet", ["a"], tmp_path, tmp_path)


def test_prepare_datasets_rows(tmp_path):
    data = {"train": [{"image": image(i), "label": i % 2} for i in range(5)],
            "validation": [{"image": image(9), "label": 1}]}
    counts = prepare_datasets(data, ["cat", "dog"], tmp_path / "pets", splits={"train": "train", "test": "validation"},
                              progress=False)
    assert counts == {"train": [3, 2], "test": [0, 1]}
    assert (tmp_path / "pets" / "test" / class_folder_name(0, "cat")).is_dir()  # empty classes keep their folder
    assert load_split(folder_task(tmp_path / "pets", ["cat", "dog"]), "test").labels == [1]
    with pytest.raises(ValueError, match="no split 'test'"):
        prepare_datasets(data, ["cat", "dog"], tmp_path / "x", progress=False)


def test_class_folder_names_sort_in_label_order():
    names = [class_folder_name(i, n) for i, n in enumerate(["F/A-18", "707-320", "Zebra"])]
    assert names == ["000_f-a-18", "001_707-320", "002_zebra"] and sorted(names) == names


# -- one's own folder ------------------------------------------------------------------------------------


def own_folder(root, counts):
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for k in range(n):
            image(10 * c + k).save(root / name / f"{k:02d}.png")
    return root


def test_write_split_cuts_each_class_as_the_config_split_does(tmp_path):
    from cl_driver.data import stratified_split

    own_folder(tmp_path / "mine", {"cat": 10, "dog": 5, "eel": 1})
    counts = write_split(tmp_path / "mine", tmp_path / "out", test=0.2, val=0.2, seed=3)
    assert counts == {"train": [6, 3, 1], "test": [2, 1, 0], "val": [2, 1, 0]}
    expected = stratified_split({c: sorted(p.name for p in (tmp_path / "mine" / c).iterdir())
                                 for c in ("cat", "dog", "eel")}, test=0.2, val=0.2, seed=3)
    for split in ("train", "test", "val"):
        written = sorted(str(p.relative_to(tmp_path / "out" / split)) for p in (tmp_path / "out" / split).rglob("*.png"))
        assert written == sorted(f for _, f in expected[split])
        assert sorted(p.name for p in (tmp_path / "out" / split).iterdir()) == ["cat", "dog", "eel"]  # every class
    spec = resolve_task(TaskConfig(name="t", source={"kind": "folder", "path": str(tmp_path / "out")}))
    assert spec.class_names == ("cat", "dog", "eel") and load_split(spec, "val").labels == [0, 0, 1]
    first = tmp_path / "out" / "train" / "cat" / sorted(p.name for p in (tmp_path / "out" / "train" / "cat").iterdir())[0]
    assert first.stat().st_ino == (tmp_path / "mine" / "cat" / first.name).stat().st_ino  # a hard link


def test_write_split_copies_where_links_are_refused(tmp_path, monkeypatch):
    import os

    own_folder(tmp_path / "mine", {"a": 5, "b": 5})

    def refuse(source, target):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", refuse)
    counts = write_split(tmp_path / "mine", tmp_path / "out", val=0)
    assert counts == {"train": [4, 4], "test": [1, 1]} and not (tmp_path / "out" / "val").exists()
    copied = next((tmp_path / "out" / "train" / "a").iterdir())
    assert copied.stat().st_ino != (tmp_path / "mine" / "a" / copied.name).stat().st_ino
    assert copied.read_bytes() == (tmp_path / "mine" / "a" / copied.name).read_bytes()


@pytest.mark.parametrize("setup, kwargs, message", [
    (lambda t: (t / "out" / "x").mkdir(parents=True), {}, "exists and is not empty; choose a new --out"),
    (lambda t: None, {"out": "mine/split"}, "inside .*mine, where it would read as one more class"),
    (lambda t: None, {"folder": "nowhere"}, "nowhere: no such folder"),
    (lambda t: None, {"test": 0}, "condu-cl prepare split: test: Input should be greater than 0, got 0"),
    (lambda t: None, {"test": 0.6, "val": 0.4}, "test \\+ val is 1; leave a share to train"),
    (lambda t: (t / "mine" / "empty").mkdir(), {}, "empty: no images"),
    (lambda t: None, {"test": 0.05}, "a test share of 0.05 leaves no test image"),
])
def test_write_split_refuses_and_writes_nothing(tmp_path, setup, kwargs, message):
    own_folder(tmp_path / "mine", {"a": 5, "b": 5})
    setup(tmp_path)
    before = sorted(p for p in tmp_path.rglob("*"))
    folder, out = tmp_path / kwargs.pop("folder", "mine"), tmp_path / kwargs.pop("out", "out")
    with pytest.raises(ValueError, match=message) as err:
        write_split(folder, out, **kwargs)
    assert "\n" not in str(err.value) and sorted(p for p in tmp_path.rglob("*")) == before
