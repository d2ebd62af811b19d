"""Every benchmark's quick mode, run as a user runs it: `python -m benchmarks.<name> --quick
--results-dir DIR` from the repository root, in a child process, beside the installed `kernels`
package (which benchmarks/kernels.py once hid from transformers). Each writes <name>.json and
<name>.md to DIR, with the figures its report is made of.

The benchmarks are the modules found in benchmarks/ (libraries and private modules aside), so a
new benchmark without a quick mode fails here.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
LIBRARIES = {"official_baseline"}  # imported by the benchmarks, not run
BENCHMARKS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py")
                    if not p.stem.startswith("_") and p.stem not in LIBRARIES)


def run_quick(name: str, results: Path, *extra: str) -> dict:
    """`python -m benchmarks.<name> --quick --results-dir results ...`; its <name>.json."""
    env = dict(os.environ)
    if name == "gpu_kernels" and not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"  # the Triton kernels on CPU tensors
    command = [sys.executable, "-m", f"benchmarks.{name}", "--quick", "--results-dir", str(results), *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (results / f"{name}.md").stat().st_size > 0
    text = (results / f"{name}.json").read_text()
    assert f"python -m benchmarks.{name}" in text  # the command it records is the module's
    return json.loads(text)


# ---- what each benchmark's results hold ------------------------------------------------------------


def check_adapter_storage(res: dict, results: Path, tmp_path: Path) -> None:
    assert "| factors | 3 |" in (results / "adapter_storage.md").read_text()
    rows = {(r["mode"], r["tasks"]): r for r in res["rows"]}
    assert set(rows) == {(mode, t) for mode in ("factors", "dense") for t in (2, 3)}
    adapter, model = res["adapter"]["adapter_bytes"], res["model"]["model_bytes"]
    for (mode, t), row in rows.items():
        assert row["adapter_files_bytes"] == t * adapter
        assert row["separate_bytes"] == t * (adapter if mode == "factors" else model)
        assert row["store_bytes"] > (adapter if mode == "factors" else model)  # one unified copy, at least
    assert rows["dense", 3]["store_bytes"] < rows["dense", 3]["separate_bytes"]
    assert not (tmp_path / "work").exists()


def _fusion_store_runs(res: dict) -> list[dict]:
    """Every measured run of both sides, wherever it sits in the results."""
    speed, decouple = res["unify_speed"], res["decouple"]
    sides = [speed["store"], speed["official"], *decouple.values()]
    sides += [row[op][side] for row in res["memory"] for op in ("unify", "add") for side in ("store", "official")]
    return [run for side in sides for run in side.get("runs", [side])]


def check_fidelity_per_bit(res: dict, results: Path, tmp_path: Path) -> None:
    from fusion.dtypes import Q4, Q8

    assert res["quick"] is True and (results / "fidelity_per_bit.png").stat().st_size > 1000
    markdown = (results / "fidelity_per_bit.md").read_text()
    assert "| ConDU model / int4 |" in markdown and "best T-Switch-style in as many bytes" in markdown
    assert res["sources"]["clip"]["config"] == "benchmarks/configs/mini_mtil_tiny.yaml"
    for name, tasks in (("clip", 2), ("gpt2", 3)):
        family = res["families"][name]
        assert len(family["tasks"]) == tasks and all(len(r["per_task"]) == tasks for r in family["rows"])
        methods = {r["method"] for r in family["rows"]}
        assert methods == {"ConDU", "EMR (one-shot)", "T-Switch-style", "BitDelta-style", "TALL-masks-style",
                           "fine-tunes", "base"}
        condu = {(r["rescaler"], r["dtype"]): r for r in family["rows"] if r["method"] == "ConDU"}
        assert set(condu) == {(m, d) for m in ("model", "tensor-mean", "tensor")
                              for d in ("float32", "bfloat16", "int8", "int4")}
        size = [condu["model", d]["bytes_per_param_per_task"] for d in ("float32", "bfloat16", "int8", "int4")]
        assert size == sorted(size, reverse=True) and size[-1] > 0
        n = family["fused_parameters"]  # the compact unified files hold 8.5 and 4.5 bits a parameter, plus a header
        for dtype, form in (("int8", Q8), ("int4", Q4)):
            assert form.record * n / 64 <= condu["model", dtype]["unified_bytes"] < form.record * n / 64 + (1 << 16)
        assert all(r["decouple_s_median"] > 0 for r in condu.values())
        primary = family["primary"]
        fine_tunes = next(r for r in family["rows"] if r["method"] == "fine-tunes")
        assert all(0 <= r["mean"][primary] <= 100 for r in family["rows"])
        if name == "gpt2":
            assert fine_tunes["mean"]["agreement"] == 100.0  # a fine-tune agrees with itself
        analysis = family["analysis"]
        assert analysis["pareto"] and len(analysis["condu_vs_tswitch"]) == 12 and len(analysis["compact"]) == 9
        assert all(c["bytes_ratio"] > 1 for c in analysis["compact"])  # every compact dtype is smaller than float32
        assert 0 < family["condu_masks"]["xz_over_packed_mean"]


def check_fusion_store(res: dict, results: Path, tmp_path: Path) -> None:
    assert (results / "fusion_store.png").stat().st_size > 0
    assert [(row["tasks"], row["add"]["tasks"]) for row in res["memory"]] == [(2, 3), (4, 5)]
    runs = _fusion_store_runs(res)
    assert not [r["error"] for r in runs if "error" in r]
    assert all(r["peak_rss"] > 0 and r["seconds"] >= 0 for r in runs if "skipped" not in r)
    assert res["equality"]["unified_bit_equal"] is True
    assert res["equality"]["task1_max_rel_error"] < 1e-6
    assert res["speedup"] > 0 and res["decouple_vs_copy"] > 0
    store_unify = res["unify_speed"]["store"]
    assert store_unify["cpu_user"] > 0 and store_unify["cpu_system"] >= 0  # the command's own CPU, from the launcher
    assert "cores busy on average" in (results / "fusion_store.md").read_text()
    assert all(row["store_bytes"] > 0 and row["bound_bytes"] > 0 for row in res["storage"])
    assert "bfloat16" in {row["dtype"] for row in res["storage"]}  # the quick mode keeps the bf16 store
    checks = res["checks"]
    assert all(checks[op]["seconds"] > 0 and checks[op + "_unchecked"]["seconds"] > 0 for op in ("decouple", "add"))
    assert all(res["startup"][k]["seconds"] > 0 for k in ("help", "tiny_unify"))
    assert res["bounds"]["read_gbps"] > 0 and res["bounds"]["fsync_write_gbps"] > 0
    (row,) = res["decouple_sizes"]["rows"]  # decouple vs cp + sync of its output, file and folder
    assert all(row[kind][side]["seconds"] > 0 and row[kind][side]["cpu"] > 0 and row[kind]["ratio"] > 0
               for kind in ("file", "folder") for side in ("decouple", "copy"))
    assert "cp + sync" in (results / "fusion_store.md").read_text()


def check_gpu_kernels(res: dict, results: Path, tmp_path: Path) -> None:
    assert res["checks"] and all(c["ok"] for c in res["checks"]), [c["problems"] for c in res["checks"]]
    assert {c["kernel"] for c in res["checks"]} == {"elect", "continual"}
    assert [r["tasks"] for r in res["throughput"]] == [2, 8, 16]
    assert all(r["gbps"]["elect"] > 0 and r["gbps"]["copy"] > 0 for r in res["throughput"])
    assert res["sweep"]


def check_kernels(res: dict, results: Path, tmp_path: Path) -> None:
    assert [r["tasks"] for r in res["records"]] == [2, 4]
    for record in res["records"]:
        assert record["numel"] == 1 << 20
        for op in ("elect", "continual"):
            assert record["cpu"][op]["gbps"] > 0 and record["naive"][op]["gbps"] > 0
            assert record["ratios"][op]["cpu_over_naive"] > 0
        assert record["cpu"]["copy"]["gbps"] > 0
    # the peak-RSS children, started as `-m benchmarks.kernels --child-fuse-pass`
    assert [(r["mode"], r["numel"]) for r in res["rss"]] == [(m, n << 20) for m in ("unify", "add") for n in (2, 8)]
    assert all(r["self_peak_rss_bytes"] >= r["rss_before_pass_bytes"] > 0 for r in res["rss"])
    md = (results / "kernels.md").read_text()
    assert "| T | op | cpu GB/s" in md and "cpu / copy" in md
    assert (results / "kernels.png").stat().st_size > 1000


def check_load(res: dict, results: Path, tmp_path: Path) -> None:
    assert res["busy"] == 1 and res["config"].endswith("mini_mtil_tiny.yaml")
    assert set(res["cases"]) == {"idle", "loaded"}
    assert all(c["wall_s"] > 0 and c["user_s"] > 0 for c in res["cases"].values())
    assert "| beside 1 busy processes |" in (results / "load.md").read_text()


def check_mini_mtil(res: dict, results: Path, tmp_path: Path) -> None:
    methods = {"zero_shot", "sequential", "task_arithmetic", "magmax", "individual", "condu-model",
               "condu-tensor-mean", "condu-tensor", "condu-model-agnostic", "continual_ties", "opcm", "zscl"}
    assert res["config"] == "benchmarks/configs/mini_mtil_tiny.yaml"
    assert set(res["results"]["summary"]) == methods
    assert all(len(row) == 2 for m in methods for row in res["results"]["matrices"][m])
    assert res["timing"]["processes"] == 2  # the two method groups, side by side, as in a full run
    assert {"model", "tensor"} <= set(res["results"]["fidelity"])
    assert all(isinstance(c["holds"], bool) and c["numbers"] for c in res["claims"])
    assert len(res["claims"]) >= 7
    markdown = (results / "mini_mtil.md").read_text()
    assert "| condu-model |" in markdown and "separate / store" in markdown
    assert all((results / f"mini_mtil-heatmap-{m}.png").exists() for m in methods)


def check_mini_mtil_study(res: dict, results: Path, tmp_path: Path) -> None:
    from benchmarks.mini_mtil_study import AGGREGATIONS, NAME

    assert res["quick"] is True and set(res["runs"]) == {"S-lr1e-04"} and res["not_run"] == []
    assert res["runs"]["S-lr1e-04"]["tasks"] == ["shapes", "colors"]
    condu = sorted((r["aggregation"], r["K"]) for r in res["rows"] if r["method"] == "ConDU")
    assert condu == sorted(AGGREGATIONS)
    assert "A quick run" in (results / f"{NAME}.md").read_text()
    for plot in ("transfer-vs-last", "fidelity", "gap-vs-k"):
        assert (results / f"{NAME}-{plot}.png").stat().st_size > 0


def check_predict(res: dict, results: Path, tmp_path: Path) -> None:
    assert res["quick"] is True and res["run"]["tasks"] == ["shapes", "colors"] and res["run"]["top_k"] == 1
    assert set(res["modes"]) == {"task", "agnostic", "labels"}
    for m in res["modes"].values():
        (child,) = m["children"]
        assert child["batch"] == 8 and len(child["warm_s"]) == 3 and m["warm_median_s"] > 0 and m["cold_s"] > 0
        assert m["self_peak_rss_bytes"] >= m["rss_after_load_bytes"] > m["rss_after_imports_bytes"] > 0
        assert 1 <= m["experts_built"] <= 2  # two learned tasks; an expert is rebuilt once, then cached
    assert res["modes"]["task"]["experts_built"] == 1
    assert res["modes"]["labels"]["children"][0]["kwargs"]["candidate_labels"]  # a task the run did not learn
    assert "| agnostic | 8 |" in (results / "predict.md").read_text()


CHECKS = {name[len("check_"):]: check for name, check in globals().items() if name.startswith("check_")}


def test_every_benchmark_in_the_folder_is_checked():
    assert set(CHECKS) == set(BENCHMARKS), "add a check_<name> of its results here"


@pytest.mark.parametrize("name", BENCHMARKS)
def test_quick_mode_runs_as_a_module_and_writes_its_results(name, tmp_path):
    assert importlib.util.find_spec("kernels") is not None, "the installed `kernels` package: the case it once hid"
    if name == "gpu_kernels":
        pytest.importorskip("triton")
    results = tmp_path / "results"
    # adapter_storage is given its work folder, so that its check sees the folder removed after the run
    extra = ["--workdir", str(tmp_path / "work")] if name == "adapter_storage" else []
    res = run_quick(name, results, *extra)
    CHECKS[name](res, results, tmp_path)


def test_quick_mode_never_writes_to_the_results_of_record(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.adapter_storage", "--quick"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2
    assert "--quick writes only to a folder you name: add --results-dir FOLDER" in done.stderr
