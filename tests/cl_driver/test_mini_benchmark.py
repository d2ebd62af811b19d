"""The mini-MTIL benchmark's shipped configs, its merging of method groups and its page of the other
settings. Its tiny run end to end (claims, reports, heat maps) is its quick mode, in
tests/benchmarks/test_quick_runs.py."""
import json
from pathlib import Path

import benchmarks.mini_mtil as bench

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "cl_driver" / "assets" / "mini-clip"


def test_shipped_configs_name_the_shipped_model_and_every_method():
    from cl_driver.config import load_config
    from cl_driver.mini.tasks import BUILTIN_TASKS

    full, quick = load_config("mini_mtil"), load_config("mini_mtil_quick")
    assert Path(full.model) == SHIPPED.resolve() == Path(quick.model)
    assert [t.name for t in full.tasks] == list(BUILTIN_TASKS)
    kinds = {m.kind for m in quick.methods}
    assert kinds == {"zero_shot", "sequential", "task_arithmetic", "magmax", "individual", "condu", "continual_ties",
                     "opcm", "zscl"}
    assert {m.kind for m in full.methods} == kinds
    assert {m.rescaler for m in quick.methods if m.kind == "condu"} == {"model", "tensor-mean", "tensor"}
    assert any(m.agnostic for m in full.methods) and any(m.agnostic for m in quick.methods)


def test_merging_method_groups_keeps_the_config_order():
    part_a = {"tasks": ["a", "b"], "methods": {"condu-model": {"kind": "condu"}}, "matrices": {"condu-model": [[1]]},
              "summary": {"condu-model": {"last": 1}}, "fidelity": {"model": []}, "stores": {"model": {}},
              "seconds": {"x": 1}}
    part_b = {"tasks": ["a", "b"], "methods": {"zero_shot": {"kind": "zero_shot"}}, "matrices": {"zero_shot": [[2]]},
              "summary": {"zero_shot": {"last": 2}}, "fidelity": {}, "stores": {}, "seconds": {"y": 2}}
    merged = bench.merge_results([part_a, part_b], ["zero_shot", "condu-model"])
    assert list(merged["matrices"]) == list(merged["summary"]) == ["zero_shot", "condu-model"]
    assert merged["fidelity"] == {"model": []} and merged["seconds"] == {"x": 1, "y": 2}


def test_the_full_page_shows_the_other_settings_rows_and_their_commands(tmp_path):
    summary = {m: {"transfer": 50.0 + i, "average": 60.0 + i, "last": 70.0 + i}
               for i, m in enumerate(("zero_shot", "sequential", "individual", "condu-model"))}
    record = {"name": "mini_mtil_lora", "command": "python -m benchmarks.mini_mtil --config mini_mtil_lora "
              "--name mini_mtil_lora", "results": {"summary": summary}}
    (tmp_path / "mini_mtil_lora.json").write_text(json.dumps(record))
    section = bench.settings_section(tmp_path)
    assert "| LoRA: rank 64 on the MLP linears of both towers, fused in factor space, lr 1e-3 | condu-model | "\
           "53.0 | 63.0 | 73.0 |" in section
    assert "| sequential |" not in section and "| 5-shot" not in section  # only the runs that exist, their key rows
    assert "`python -m benchmarks.mini_mtil --config mini_mtil_lora --name mini_mtil_lora`" in section
    assert bench.settings_section(tmp_path / "nothing-here") == ""
