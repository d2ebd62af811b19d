"""Smoke test of benchmarks/adapter_storage.py: a --quick run writes its results, in both modes."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "adapter_storage.py"


def test_quick_run_measures_both_modes(tmp_path):
    results = tmp_path / "results"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--results-dir", str(results),
                           "--workdir", str(tmp_path / "work")], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads((results / "adapter_storage.json").read_text())
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
