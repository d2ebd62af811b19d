import pytest
import yaml

from cl_driver.config import load_config, parse_config


def base(**extra):
    data = {"model": "some/clip", "methods": ["zero_shot"],
            "tasks": [{"name": "shapes", "source": {"kind": "builtin", "task": "shapes"}}]}
    data.update(extra)
    return data


def test_defaults_follow_the_mtil_protocol():
    cfg = parse_config(base())
    t = cfg.training
    assert (t.iterations, t.batch_size, t.lr, t.weight_decay, t.warmup_steps, t.label_smoothing, t.train_part) == \
        (1000, 64, 1e-5, 0.0, 100, 0.2, "whole")
    assert (cfg.evaluation.top_k, cfg.evaluation.aggregate) == (4, "mean")


def test_builtin_tasks_need_no_class_names_and_methods_get_names():
    cfg = parse_config(base(methods=["sequential", {"kind": "condu", "rescaler": "tensor-mean"},
                                     {"kind": "condu", "agnostic": True}, {"kind": "magmax", "scale": "0.5"}]))
    assert cfg.tasks[0].source_dict == {"kind": "builtin", "task": "shapes"}
    assert [m.name for m in cfg.methods] == ["sequential", "condu-tensor-mean", "condu-model-agnostic", "magmax"]
    assert cfg.methods[3].scale == 0.5


def test_per_task_overrides_apply_to_that_task_only():
    cfg = parse_config(base(tasks=[{"name": "a", "source": {"kind": "builtin", "task": "a"}, "lr": 5e-5},
                                   {"name": "b", "source": {"kind": "builtin", "task": "b"}}]))
    assert cfg.task_training(cfg.tasks[0]).lr == 5e-5
    assert cfg.task_training(cfg.tasks[1]).lr == 1e-5


@pytest.mark.parametrize("change, message", [
    ({"model": None}, "model"),
    ({"methods": ["fancy"]}, r"methods\[0\].kind"),
    ({"methods": ["zero_shot", "zero_shot"]}, "duplicate"),
    ({"training": {"train_part": "head"}}, "training.train_part"),
    ({"training": {"lr": "fast"}}, "training.lr"),
    ({"training": {"iterations": 0}}, "training.iterations"),
    ({"evaluation": {"aggregate": "max"}}, "evaluation.aggregate"),
    ({"tasks": [{"name": "x", "source": {"kind": "folder", "split": {"test": 0.2}}}]}, r"tasks\[0\].source: .*`path`"),
    ({"tasks": [{"name": "x", "source": {"kind": "folder", "path": "d", "train": "t", "split": {"test": 0.2}}}]},
     "no `train` or `test`"),
    ({"tasks": [{"name": "x", "source": {"kind": "folder", "path": "d", "split": {"val": 0.1}}}]},
     r"tasks\[0\].source.split.test: missing"),
    ({"tasks": [{"name": "x", "source": {"kind": "folder", "path": "d", "split": {"test": 1.5}}}]},
     r"source.split.test: Input should be less than 1, got 1.5"),
    ({"tasks": [{"name": "x", "source": {"kind": "folder", "path": "d", "split": {"test": 0.5, "val": 0.5}}}]},
     r"source.split: test \+ val is 1; leave a share to train"),
    ({"tasks": [{"name": "x", "source": {"kind": "folder", "path": "d", "split": {"test": 0.2, "train": 0.8}}}]},
     r"source.split: unknown keys \['train'\]"),
    ({"tasks": [{"name": "x", "source": {"kind": "builtin"}}]}, r"tasks\[0\].source.task"),
    ({"tasks": [{"name": "x", "source": {"kind": "builtin", "task": "x"}, "templates": ["no slot"]}]}, "'{}'"),
    ({"tasks": [{"name": "bad name", "source": {"kind": "builtin", "task": "x"}}]}, r"tasks\[0\].name"),
    ({"surprise": 1}, "unknown keys"),
])
def test_bad_input_names_the_file_and_the_field(change, message):
    with pytest.raises(ValueError, match=message) as err:
        parse_config(base(**change), where="run.yaml")
    assert str(err.value).startswith("run.yaml: ")


def test_paths_resolve_against_data_root_or_the_config(tmp_path):
    folder_task = {"name": "f", "class_names": ["a"], "templates": ["{}"], "source": {"kind": "folder", "path": "f"}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(base(tasks=[folder_task])))
    assert load_config(path).tasks[0].source.path == str(tmp_path / "f")
    assert load_config(path, data_root=tmp_path / "data").tasks[0].source.path == str(tmp_path / "data" / "f")


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")


def test_the_shipped_mtil_spec():
    cfg = load_config("mtil")
    names = [t.name for t in cfg.tasks]
    assert names == ["aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers", "food", "mnist",
                     "oxford_pet", "cars", "sun397"]
    sizes = [len(t.class_names) for t in cfg.tasks]
    assert sizes == [100, 101, 100, 47, 10, 102, 101, 10, 37, 196, 397]
    assert all(len(set(t.class_names)) == len(t.class_names) for t in cfg.tasks)
    lrs = {t.name: cfg.task_training(t).lr for t in cfg.tasks}
    assert lrs["aircraft"] == lrs["mnist"] == 5e-5 and lrs["dtd"] == 1e-5
    assert (cfg.training.iterations, cfg.training.batch_size, cfg.training.warmup_steps) == (1000, 64, 100)
    assert cfg.model == "openai/clip-vit-base-patch16"


def test_command_line_overrides_of_the_evaluation():
    cfg = parse_config(base()).with_evaluation(aggregate="weighted", top_k=None)
    assert (cfg.evaluation.aggregate, cfg.evaluation.top_k) == ("weighted", 4)
    assert parse_config(base()).with_evaluation(top_k=None) == parse_config(base())


def test_lora_and_few_shot_settings():
    cfg = parse_config(base(training={"train_part": "lora", "shots": 5, "lora": {"rank": 8}}))
    assert (cfg.training.train_part, cfg.training.shots) == ("lora", 5)
    assert (cfg.training.lora.rank, cfg.training.lora.init_std) == (8, 0.01)
    assert parse_config(base()).training.lora.rank == 64 and parse_config(base()).training.shots is None


@pytest.mark.parametrize("change, message", [
    ({"training": {"shots": 0}}, "training.shots: Input should be greater than or equal to 1"),
    ({"training": {"lora": {"rank": 64, "alpha": 2}}}, r"training.lora: unknown keys \['alpha'\]"),
    ({"training": {"iterations": True}}, "training.iterations: expected a number"),
    ({"task_order": ["shapes", "nope"]}, r"task_order\[1\]: no task 'nope'"),
    ({"task_overrides": {"nope": {"lr": 1e-3}}}, "task_overrides.nope: no such task"),
    ({"task_overrides": {"shapes": {"momentum": 1}}}, r"task_overrides.shapes: unknown keys \['momentum'\]"),
    ({"tasks": [{"name": "x", "source": {"kind": "tape"}}]}, r"tasks\[0\].source: 'tape' is not one of"),
    ({"methods": []}, "methods: "),
])
def test_new_fields_are_checked_with_one_line(change, message):
    with pytest.raises(ValueError, match=message) as err:
        parse_config(base(**change), where="run.yaml")
    assert str(err.value).startswith("run.yaml: ") and "\n" not in str(err.value)


def test_yaml_no_is_no_mixed_precision(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(base()).replace("methods:", "training: {mixed_precision: no}\nmethods:"))
    assert load_config(path).training.mixed_precision == "no"


def test_task_order_and_overrides_pick_from_a_tasks_file(tmp_path):
    tasks = [{"name": n, "source": {"kind": "builtin", "task": n}} for n in ("a", "b", "c")]
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump({"tasks": tasks}))
    raw = {"model": "m", "methods": ["zero_shot"], "tasks_file": "tasks.yaml", "task_order": ["c", "a"],
           "task_overrides": {"a": {"lr": 3e-4, "iterations": 7}}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "run.yaml")
    assert [t.name for t in cfg.tasks] == ["c", "a"]
    assert (cfg.task_training(cfg.tasks[1]).lr, cfg.task_training(cfg.tasks[1]).iterations) == (3e-4, 7)
    assert cfg.task_training(cfg.tasks[0]) == cfg.training


MTIL_ORDER_I = ["aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers", "food", "mnist", "oxford_pet",
                "cars", "sun397"]


def lrs(cfg):
    return {t.name: cfg.task_training(t).lr for t in cfg.tasks}


def test_the_shipped_mtil_order_ii():
    cfg = load_config("mtil_order2")  # ZSCL's mtil/scripts/ZSCL_minus.sh
    assert [t.name for t in cfg.tasks] == ["cars", "food", "mnist", "oxford_pet", "flowers", "sun397", "aircraft",
                                           "caltech101", "dtd", "eurosat", "cifar100"]
    assert lrs(cfg) == {**{n: 1e-5 for n in MTIL_ORDER_I}, "mnist": 5e-5, "aircraft": 5e-5}
    assert {t.name: t.class_names for t in cfg.tasks} == {t.name: t.class_names for t in load_config("mtil").tasks}


def test_the_shipped_mtil_lora_and_few_shot_settings():
    lora = load_config("mtil_lora")
    assert [t.name for t in lora.tasks] == MTIL_ORDER_I
    assert (lora.training.train_part, lora.training.lora.rank, lora.training.iterations) == ("lora", 64, 1000)
    assert list(lrs(lora).values()) == [1e-3, 5e-4, 2e-3, 2e-3, 1.5e-4, 1e-5, 2e-3, 1e-3, 1.5e-4, 2e-3, 1.5e-3]
    few = load_config("mtil_fewshot")
    assert [t.name for t in few.tasks] == MTIL_ORDER_I
    assert (few.training.shots, few.training.iterations, few.training.train_part) == (5, 500, "whole")
    assert lrs(few) == {**{n: 1e-5 for n in MTIL_ORDER_I}, "aircraft": 5e-5, "oxford_pet": 5e-5}
    for cfg in (lora, few):
        assert (cfg.training.batch_size, cfg.training.label_smoothing) == (64, 0.2)


def test_the_mini_settings_differ_from_the_full_mini_benchmark_only_where_they_say():
    full, lora, few = (load_config(n) for n in ("mini_mtil", "mini_mtil_lora", "mini_mtil_fewshot"))
    assert [t.name for t in lora.tasks] == [t.name for t in few.tasks] == [t.name for t in full.tasks]
    assert lora.training == full.training.replace(train_part="lora", lr=1e-3)
    assert few.training == full.training.replace(shots=5, iterations=100, warmup_steps=10)
    assert lora.evaluation == few.evaluation == full.evaluation


def test_folder_tasks_need_no_class_names_or_templates_and_may_split():
    cfg = parse_config(base(tasks=[{"name": "mine", "source": {"kind": "folder", "path": "mine",
                                                               "split": {"test": 0.2, "val": 0.1}}}]))
    task = cfg.tasks[0]
    assert task.class_names is None and task.templates is None  # filled from the folders (data.resolve_task)
    assert task.source.split.model_dump() == {"test": 0.2, "val": 0.1, "seed": 0}
    assert parse_config(base(tasks=[{"name": "f", "source": {"kind": "folder", "path": "f"}}])).tasks[0].source.split \
        is None


def test_default_templates_each_have_one_slot():
    from cl_driver.config import DEFAULT_TEMPLATES

    assert DEFAULT_TEMPLATES[0] == "a photo of a {}." and all(t.count("{}") == 1 for t in DEFAULT_TEMPLATES)


def test_a_copied_config_finds_its_tasks_file_beside_it_or_shipped(tmp_path):
    from cl_driver.config import packaged_config

    copy = tmp_path / "mtil.yaml"
    copy.write_text(packaged_config("mtil.yaml").read_text())  # alone: no mtil_tasks.yaml beside it
    assert [t.name for t in load_config(copy).tasks] == [t.name for t in load_config("mtil").tasks]
    beside = [{"name": "aircraft", "source": {"kind": "builtin", "task": "shapes"}}]
    (tmp_path / "mtil_tasks.yaml").write_text(yaml.safe_dump({"tasks": beside}))
    copy.write_text(packaged_config("mtil.yaml").read_text().replace("mnist: {lr: 5.0e-05}", ""))
    assert [t.name for t in load_config(copy).tasks] == ["aircraft"]  # the one beside the config wins


def test_a_tasks_file_found_nowhere_says_where_it_looked(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(base(tasks_file="nope_tasks.yaml")))
    with pytest.raises(ValueError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: tasks_file: nope_tasks.yaml is neither beside the config "
                              f"({tmp_path / 'nope_tasks.yaml'}) nor shipped in cl_driver/configs/")
    assert "list the tasks under `tasks:`" in message and "\n" not in message


def test_the_config_reference_is_current():
    from pathlib import Path

    from cl_driver.config_doc import config_reference

    committed = Path(__file__).resolve().parents[2] / "docs" / "config.md"
    assert committed.read_text() == config_reference(), "run: python -m cl_driver.config_doc > docs/config.md"


def test_the_config_reference_names_every_key_of_every_section():
    from cl_driver.config_doc import SECTIONS, config_reference

    text = config_reference()
    for heading, model in SECTIONS:
        section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
        assert [line.split("`")[1] for line in section.splitlines() if line.startswith("| `")] == \
            list(model.model_fields), heading
    assert "| `test` | number > 0 and < 1 | required |" in text
    assert "| `iterations` | integer >= 1 | `1000` |" in text
    assert "| `name` | string matching `^[A-Za-z0-9_.-]+$` | the kind;" in text  # filled in by a validator


def test_reference_links_point_at_sections():
    import re

    from cl_driver.config_doc import SECTIONS, _anchor, config_reference

    anchors = {_anchor(heading) for heading, _ in SECTIONS}
    assert _anchor("training: lora") == "training-lora" and _anchor("source: hf_disk") == "source-hf_disk"
    assert set(re.findall(r"\]\(#([^)]+)\)", config_reference())) <= anchors
