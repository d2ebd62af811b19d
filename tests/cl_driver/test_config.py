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
    ({"tasks": [{"name": "x", "source": {"kind": "folder", "path": "d"}}]}, "class_names and templates"),
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
