"""The field's continual baselines in the loop (continual TIES, OPCM, ZSCL): a tiny run of each to a
full accuracy matrix, and their config."""

import pytest
import torch
from safetensors.torch import load_file

from cl_driver.config import parse_config
from cl_driver.finetunes import weights_file
from cl_driver.loop import run

from tests.cl_driver.helpers import TASKS, tiny_config_dict

T = len(TASKS)
NEW = ("continual_ties", "opcm", "zscl")
ZSCL = {"kind": "zscl", "zscl": {"reference": {"kind": "folder", "path": "stripes/train", "images": 6},
                                 "ensemble_interval": 2}}


@pytest.fixture(scope="module")
def baselines_run(tiny_model, tiny_data, tmp_path_factory):
    methods = ["individual", "continual_ties", {"kind": "opcm", "opcm": {"alpha": 0.5}}, ZSCL]
    config = parse_config(tiny_config_dict(tiny_data, tiny_model, methods=methods, iterations=4), where="tiny.yaml")
    out = tmp_path_factory.mktemp("run-baselines")
    return config, out, run(config, out, progress=False)


def test_each_new_method_runs_to_a_full_matrix_with_its_name(baselines_run, tiny_data):
    config, out, results = baselines_run
    for name in NEW:
        matrix = torch.tensor(results["matrices"][name])
        assert matrix.shape == (T, T) and ((0 <= matrix) & (matrix <= 100)).all()
        assert (out / f"heatmap-{name}.png").stat().st_size > 1000
    markdown = (out / "results.md").read_text()
    assert all(f"| {label} |" in markdown for label in ("continual TIES", "OPCM", "ZSCL"))
    reference = config.methods[3].zscl.reference
    assert reference.path == str((tiny_data / "stripes" / "train").resolve())  # from data_root, as task sources
    assert [p.name for p in sorted((out / "checkpoints" / "zscl").iterdir())] == \
        [f"{i + 1:02d}-{t}" for i, t in enumerate(TASKS)]


def test_merges_start_from_the_first_fine_tune_and_zscl_trains_its_own_chain(baselines_run):
    _, out, results = baselines_run
    m = results["matrices"]
    assert m["opcm"][0][0] == m["individual"][0][0]  # OPCM's first model is the first fine-tune itself
    first, zscl_first = (load_file(str(weights_file(out / "checkpoints" / chain / f"01-{next(iter(TASKS))}")))
                         for chain in ("individual", "zscl"))
    # the same start (theta0) and seed; ZSCL's own terms and its weight ensemble make another model
    assert any(not torch.equal(first[k], zscl_first[k]) for k in first)


def test_zscl_config_mistakes_are_one_line(tiny_model, tiny_data):
    def parse(methods, **training):
        raw = tiny_config_dict(tiny_data, tiny_model, methods=methods)
        raw["training"].update(training)
        return parse_config(raw, where="my.yaml")

    with pytest.raises(ValueError, match=r"^my.yaml: methods\[1\]: a second zscl method; .*another config$"):
        parse(["zscl", {"kind": "zscl", "name": "zscl-2"}])
    with pytest.raises(ValueError, match=r"^my.yaml: methods\[0\]: zscl fine-tunes the whole model or one tower"):
        parse(["zscl"], train_part="lora")
    with pytest.raises(ValueError, match=r"^my.yaml: methods\[0\]: `zscl` is for kind zscl, not opcm; remove it$"):
        parse([{"kind": "opcm", "zscl": {}}])
    with pytest.raises(ValueError, match=r"^my.yaml: methods\[0\].zscl.reference: .*needs `path`"):
        parse([{"kind": "zscl", "zscl": {"reference": {"kind": "folder"}}}])
    with pytest.raises(ValueError, match=r"^my.yaml: methods\[0\].ties.keep: Input should be less than or equal"):
        parse([{"kind": "continual_ties", "ties": {"keep": 1.5}}])
    defaults = parse(["continual_ties", "opcm", "zscl"]).methods
    assert [m.name for m in defaults] == list(NEW) and all(m.ties is m.opcm is m.zscl is None for m in defaults)
