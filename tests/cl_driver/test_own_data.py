"""One's own data: class folders named after their classes, cut into splits by the config or by
`condu-cl prepare split`, and the README's "Your own data" example run end to end."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from PIL import Image

from cl_driver.config import DEFAULT_TEMPLATES, TaskConfig, parse_config
from cl_driver.data import (load_split, readable_class_name, readable_class_names, resolve_task, split_counts,
                            stratified_split)


def write_classes(root: Path, counts: dict[str, int]) -> Path:
    """root/<class>/NN.png, `counts[class]` images each, every image its own grey."""
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            Image.new("RGB", (4, 4), (c * 60, k, 0)).save(root / name / f"{k:02d}.png")
    return root


def split_task(path: Path, *, test=0.2, val=0.1, seed=0, **task) -> TaskConfig:
    return TaskConfig(name="mine", source={"kind": "folder", "path": str(path),
                                           "split": {"test": test, "val": val, "seed": seed}}, **task)


def images_of(spec, split: str) -> list[tuple[int, tuple]]:
    loaded = load_split(spec, split)
    return [(loaded.labels[i], loaded.load(i).getpixel((0, 0))) for i in range(len(loaded))]


# -- class names ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("folder, name", [("circle", "circle"), ("sea_lion", "sea lion"), ("012_sea_lion", "sea lion"),
                                          ("001_707-320", "707 320"), ("f-a-18", "f a 18"), ("2023", "2023"),
                                          ("big__red_", "big red")])
def test_folder_names_read_as_class_names(folder, name):
    assert readable_class_name(folder) == name


def test_two_folders_that_read_the_same_are_refused():
    with pytest.raises(ValueError, match="'sea_lion' and 'sea-lion' both read as 'sea lion'; .*give the task class_names"):
        readable_class_names(["sea_lion", "sea-lion"])


def test_a_split_task_takes_its_classes_from_the_folders_with_default_templates(tmp_path):
    write_classes(tmp_path / "shapes", {"square": 10, "001_big_circle": 10, ".hidden": 3})
    spec = resolve_task(split_task(tmp_path / "shapes"))
    assert spec.class_names == ("big circle", "square") and spec.templates == DEFAULT_TEMPLATES
    assert spec.class_folders == ("001_big_circle", "square")
    named = resolve_task(split_task(tmp_path / "shapes", class_names=("square", "001_big_circle")))
    assert named.class_folders == ("square", "001_big_circle")  # class_names that name folders: by name
    other = resolve_task(split_task(tmp_path / "shapes", class_names=("round", "boxy"), templates=("a {}.",)))
    assert other.class_folders == ("001_big_circle", "square") and other.templates == ("a {}.",)  # else sorted
    assert [label for label, _ in images_of(other, "train")] == [0] * 7 + [1] * 7
    assert {pixel[0] for label, pixel in images_of(named, "train") if label == 0} == {0}  # square's own grey


def test_a_train_test_folder_takes_its_classes_from_train(tmp_path):
    write_classes(tmp_path / "t" / "train", {"cat": 2, "dog": 2})
    write_classes(tmp_path / "t" / "test", {"dog": 1})  # a class without test images keeps its label
    spec = resolve_task(TaskConfig(name="t", source={"kind": "folder", "path": str(tmp_path / "t")}))
    assert spec.class_names == ("cat", "dog") and [label for label, _ in images_of(spec, "test")] == [1]
    write_classes(tmp_path / "t" / "test", {"bird": 1})
    with pytest.raises(ValueError, match=r"class folders \['bird'\] are not among the task's classes"):
        load_split(spec, "test")


def test_a_folder_of_class_folders_without_split_says_how_to_split(tmp_path):
    write_classes(tmp_path / "mine", {"a": 2, "b": 2})
    with pytest.raises(ValueError, match=r"no train/ and test/ inside; .*add `split: \{test: 0.2, val: 0.1\}`.*"
                                         r"condu-cl prepare split"):
        resolve_task(TaskConfig(name="mine", source={"kind": "folder", "path": str(tmp_path / "mine")}))
    named = resolve_task(TaskConfig(name="mine", source={"kind": "folder", "path": str(tmp_path / "mine")},
                                    class_names=("a", "b")))
    with pytest.raises(ValueError, match="no train/ and test/ inside"):
        load_split(named, "train")


@pytest.mark.parametrize("layout, message", [
    ({"train": 2, "test": 2}, "split already; drop `split`"),
    ({"a": 3, "b": 0}, r"/b: no images"),
    ({}, "no class folders"),
])
def test_what_cannot_be_split_is_refused(tmp_path, layout, message):
    (tmp_path / "mine").mkdir()
    write_classes(tmp_path / "mine", layout)
    with pytest.raises(ValueError, match=message):
        resolve_task(split_task(tmp_path / "mine"))


def test_hf_disk_class_names_come_from_the_class_label(tmp_path, monkeypatch):
    class DatasetDict(dict):
        pass

    label = types.SimpleNamespace(names=["sea_lion", "cat"])
    split = types.SimpleNamespace(features={"label": label, "image": object()})
    fake = types.SimpleNamespace(DatasetDict=DatasetDict, load_from_disk=lambda path: DatasetDict(train=split))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    spec = resolve_task(TaskConfig(name="t", source={"kind": "hf_disk", "path": str(tmp_path)}))
    assert spec.class_names == ("sea lion", "cat") and spec.templates == DEFAULT_TEMPLATES
    label.names = None
    with pytest.raises(ValueError, match="carries no class names; give the task class_names"):
        resolve_task(TaskConfig(name="t", source={"kind": "hf_disk", "path": str(tmp_path)}))


# -- the split -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, expected", [(1, (0, 0)), (2, (0, 0)), (3, (1, 0)), (5, (1, 1)), (10, (2, 1)),
                                         (100, (20, 10))])
def test_split_counts_round_per_class_and_leave_one_to_train(n, expected):
    assert split_counts(n, 0.2, 0.1) == expected
    assert split_counts(n, 0.6, 0.35)[0] + split_counts(n, 0.6, 0.35)[1] <= n - 1


def test_the_split_is_stratified_complete_disjoint_and_seeded():
    classes = {"a": [f"{k}.png" for k in range(20)], "b": [f"{k}.png" for k in range(5)], "c": ["only.png"]}
    cut = stratified_split(classes, test=0.2, val=0.1, seed=0)
    for label, (folder, files) in enumerate(classes.items()):
        parts = {s: sorted(f for lab, f in cut[s] if lab == label) for s in cut}
        assert sorted(sum(parts.values(), [])) == sorted(f"{folder}/{f}" for f in files)  # each image once
        assert (len(parts["test"]), len(parts["val"])) == split_counts(len(files), 0.2, 0.1) and parts["train"]
    assert cut == stratified_split(classes, test=0.2, val=0.1, seed=0)
    assert any(stratified_split(classes, test=0.2, val=0.1, seed=s)["test"] != cut["test"] for s in range(1, 4))
    grown = {**classes, "b": classes["b"] + ["new.png"]}  # one class's files do not move another's cut
    assert [e for e in stratified_split(grown, test=0.2, val=0.1, seed=0)["test"] if e[0] == 0] == \
        [e for e in cut["test"] if e[0] == 0]


def test_a_split_task_loads_each_part(tmp_path):
    write_classes(tmp_path / "mine", {"a": 10, "b": 10})
    spec = resolve_task(split_task(tmp_path / "mine"))
    parts = {s: images_of(spec, s) for s in ("train", "test", "val")}
    assert [len(p) for p in parts.values()] == [14, 4, 2]
    assert len({pixel for p in parts.values() for _, pixel in p}) == 20
    assert parts == {s: images_of(resolve_task(split_task(tmp_path / "mine")), s) for s in parts}
    no_val = resolve_task(split_task(tmp_path / "mine", val=0.0))
    with pytest.raises(ValueError, match="its split has no val images; raise split.val"):
        load_split(no_val, "val")


def test_too_few_images_to_test_is_refused(tmp_path):
    write_classes(tmp_path / "mine", {"a": 2, "b": 2})
    with pytest.raises(ValueError, match="a test share of 0.2 leaves no test image"):
        resolve_task(split_task(tmp_path / "mine"))


def test_a_recorded_split_is_read_back_whatever_was_added(tmp_path):
    write_classes(tmp_path / "mine", {"a": 10, "b": 10})
    first = resolve_task(split_task(tmp_path / "mine"), record_dir=tmp_path / "run" / "splits")
    record = json.loads((tmp_path / "run" / "splits" / "mine.json").read_text())
    assert record["class_folders"] == ["a", "b"] and len(record["files"]["test"]) == 4
    write_classes(tmp_path / "mine", {"a": 15})  # five more images of `a`
    again = resolve_task(split_task(tmp_path / "mine"), record_dir=tmp_path / "run" / "splits")
    assert again.files == first.files
    assert resolve_task(split_task(tmp_path / "mine")).files != first.files  # unrecorded: cut anew


def test_a_recorded_split_whose_images_or_classes_changed_is_refused(tmp_path):
    write_classes(tmp_path / "mine", {"a": 10, "b": 10})
    splits = tmp_path / "run" / "splits"
    spec = resolve_task(split_task(tmp_path / "mine"), record_dir=splits)
    (tmp_path / "mine" / spec.files["test"][0][1]).unlink()
    with pytest.raises(ValueError, match=r"mine.json: 1 images of this run's split are gone .*new run folder"):
        resolve_task(split_task(tmp_path / "mine"), record_dir=splits)
    write_classes(tmp_path / "mine", {"a": 10, "b": 10, "c": 3})
    with pytest.raises(ValueError, match=r"into the classes \['a', 'b'\], but it now has \['a', 'b', 'c'\]"):
        resolve_task(split_task(tmp_path / "mine"), record_dir=splits)


def test_a_split_source_passes_through_the_config_with_its_path_resolved(tmp_path):
    raw = {"model": "m", "methods": ["zero_shot"], "data_root": str(tmp_path),
           "tasks": [{"name": "mine", "source": {"kind": "folder", "path": "mine", "split": {"test": 0.3}}}]}
    task = parse_config(raw).tasks[0]
    assert task.source_dict == {"kind": "folder", "path": str(tmp_path / "mine"), "train": None, "test": None,
                                "split": {"test": 0.3, "val": 0.0, "seed": 0}}


# -- the README's example, end to end -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_data_run(tmp_path_factory):
    """The README's "Your own data" blocks, run in order as printed on its folders: (workspace, [Ran])."""
    from tests.readme_fixtures import OWN_DATA_SECTION, own_data
    from tests.test_readme import BLOCKS, example_env, run_block

    blocks = [b for b in BLOCKS if b.heading == OWN_DATA_SECTION and b.runs]
    workspace, scratch = tmp_path_factory.mktemp("own-data"), tmp_path_factory.mktemp("own-data-blocks")
    own_data(workspace, workspace / "hf" / "hub")
    env = example_env({"HF_HOME": str(workspace / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    return workspace, [run_block(block, workspace, scratch, env) for block in blocks]


def _predicts(ran) -> bool:
    return "condu-cl predict" in ran.block.source


def test_the_readme_own_data_example_runs(own_data_run):
    """Class folders -> run -> report, and the split written to disk, as the README prints them."""
    from tests.readme_fixtures import OWN_DATA

    workspace, runs = own_data_run
    assert [ran.block.lang for ran in runs] == ["bash", "bash", "bash"]  # run and report; predict; prepare split
    for ran in runs:
        assert _predicts(ran) or ran.finished, ran.report()
    results = json.loads((workspace / "runs" / "mine" / "results.json").read_text())
    assert results["tasks"] == list(OWN_DATA)
    assert {"zero_shot", "individual", "condu-model"} <= set(results["methods"])
    assert "| ConDU, model rescaler |" in runs[0].stdout and (workspace / "runs" / "mine" / "results.md").is_file()
    assert sorted(p.name for p in (workspace / "myshapes-split").iterdir()) == ["test", "train", "val"]
    assert sorted(p.name for p in (workspace / "myshapes-split" / "train").iterdir()) == sorted(OWN_DATA["myshapes"])


def test_the_readme_predict_example_runs(own_data_run):
    """`condu-cl predict` on the run folder, by task and by labels, as the README prints it."""
    _, runs = own_data_run
    predicts = [ran for ran in runs if _predicts(ran)]
    assert len(predicts) == 1
    assert predicts[0].finished, predicts[0].report()
    assert "circle" in predicts[0].stdout and "red" in predicts[0].stdout
