"""Smoke test of benchmarks/fusion_store.py: a --quick run at a tiny size writes all its results."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "fusion_store.py"


def _run_quick(tmp_path: Path) -> dict:
    results = tmp_path / "results"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--params", "64K", "--bf16-tasks", "0",
           "--workdir", str(tmp_path / "work"), "--results-dir", str(results)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    for suffix in ("json", "md", "png"):
        assert (results / f"fusion_store.{suffix}").stat().st_size > 0, suffix
    return json.loads((results / "fusion_store.json").read_text())


def _runs(res: dict) -> list[dict]:
    """Every measured run of both sides, wherever it sits in the results."""
    speed, decouple = res["unify_speed"], res["decouple"]
    sides = [speed["store"], speed["official"], *decouple.values()]
    sides += [row[op][side] for row in res["memory"] for op in ("unify", "add") for side in ("store", "official")]
    return [run for side in sides for run in side.get("runs", [side])]


def test_quick_run_measures_both_sides_and_they_agree(tmp_path):
    res = _run_quick(tmp_path)
    assert [(row["tasks"], row["add"]["tasks"]) for row in res["memory"]] == [(2, 3), (4, 5)]
    runs = _runs(res)
    assert not [r["error"] for r in runs if "error" in r]
    assert all(r["peak_rss"] > 0 and r["seconds"] >= 0 for r in runs if "skipped" not in r)
    assert res["equality"]["unified_bit_equal"] is True
    assert res["equality"]["task1_max_rel_error"] < 1e-6
    assert res["speedup"] > 0 and res["decouple_vs_copy"] > 0
    store_unify = res["unify_speed"]["store"]
    assert store_unify["cpu_user"] > 0 and store_unify["cpu_system"] >= 0  # the command's own CPU, from the launcher
    assert "cores busy on average" in (tmp_path / "results" / "fusion_store.md").read_text()
    assert all(row["store_bytes"] > 0 and row["bound_bytes"] > 0 for row in res["storage"])
    checks = res["checks"]
    assert all(checks[op]["seconds"] > 0 and checks[op + "_unchecked"]["seconds"] > 0 for op in ("decouple", "add"))
    assert all(res["startup"][k]["seconds"] > 0 for k in ("help", "tiny_unify"))
    assert res["bounds"]["read_gbps"] > 0 and res["bounds"]["fsync_write_gbps"] > 0
