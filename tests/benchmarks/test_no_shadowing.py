"""No file in benchmarks/ hides an installed module: benchmarks/ is a package, so its files are
imported as `benchmarks.<name>`, never as top-level names, and no file puts a folder on sys.path.

Run as a script (`python benchmarks/kernels.py`), a file's folder is sys.path[0] and every file in
it is a top-level module: benchmarks/kernels.py then hid the installed `kernels` package that
transformers imports. The check below names what the environment alone already provides, in a
child process whose sys.path has neither the repository root nor benchmarks/.
"""

import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"

# What the environment imports without the checkout: the paths named as arguments are dropped,
# and so is the current folder ('' or the child's cwd).
FIND_SPECS = """
import importlib.util, json, os, sys
hidden = {os.path.realpath(p) for p in [os.getcwd(), *sys.argv[1:]]}
sys.path[:] = [p for p in sys.path if p and os.path.realpath(p) not in hidden]
names = json.loads(sys.stdin.read())
print(json.dumps([n for n in names if importlib.util.find_spec(n) is not None]))
"""
EDITS_SYS_PATH = re.compile(r"sys\.path\s*(\.\s*(insert|append|extend)\b|\[|\+?=)")


def import_names(folder: Path) -> set[str]:
    """The names the modules of `folder` are imported under: `<folder>.<name>` in a package; a
    plain folder's files are top-level modules (the folder of a script is sys.path[0])."""
    prefix = folder.name + "." if (folder / "__init__.py").exists() else ""
    modules = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    modules |= {p.name for p in folder.iterdir() if (p / "__init__.py").exists()}
    return {prefix + m for m in modules}


def taken(names: set[str], *, hidden: tuple[Path, ...] = (ROOT, BENCHMARKS)) -> set[str]:
    """The names whose top-level module the environment already has: the standard library, an
    installed distribution's top-level names, or anything importable with `hidden` off sys.path."""
    tops = {name: name.split(".")[0] for name in names}
    known = set(sys.stdlib_module_names) | set(importlib.metadata.packages_distributions())
    done = subprocess.run([sys.executable, "-c", FIND_SPECS, *map(str, hidden)], capture_output=True, text=True,
                          input=json.dumps(sorted(set(tops.values()))), check=True, cwd=BENCHMARKS)
    importable = set(json.loads(done.stdout))
    return {name for name, top in tops.items() if top in known | importable}


def test_the_check_flags_a_script_folder_with_an_installed_name(tmp_path):
    """benchmarks/ as it was (a plain folder of scripts): kernels.py and json.py would be flagged;
    the same files in a package are not."""
    scripts = tmp_path / "condu_planted_scripts"
    scripts.mkdir()
    for name in ("kernels", "json", "adapter_storage"):
        (scripts / f"{name}.py").write_text("")
    assert import_names(scripts) == {"kernels", "json", "adapter_storage"}
    assert taken(import_names(scripts), hidden=(ROOT, BENCHMARKS, scripts)) == {"kernels", "json"}
    (scripts / "__init__.py").write_text("")
    assert taken(import_names(scripts), hidden=(ROOT, BENCHMARKS, scripts)) == set()


def test_the_check_finds_modules_that_no_distribution_declares(tmp_path, monkeypatch):
    """A module the environment reaches some other way (here PYTHONPATH) is taken too."""
    (tmp_path / "condu_planted_elsewhere.py").write_text("")
    assert taken({"condu_planted_elsewhere"}) == set()
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    assert taken({"condu_planted_elsewhere", "benchmarks.condu_planted_elsewhere"}) == {"condu_planted_elsewhere"}
    assert "kernels" in taken({"kernels"})  # installed: transformers 5 imports it


def test_benchmarks_is_a_package_and_none_of_its_names_is_taken():
    assert (BENCHMARKS / "__init__.py").exists(), "benchmarks/__init__.py: benchmarks/ must stay a package"
    names = import_names(BENCHMARKS)
    assert {"benchmarks.kernels", "benchmarks._common", "benchmarks.official_baseline"} <= names
    assert taken(names) == set()


def test_no_benchmark_puts_a_folder_on_sys_path():
    edits = [f"{p.relative_to(ROOT)}:{n}" for p in BENCHMARKS.rglob("*.py")
             for n, line in enumerate(p.read_text().splitlines(), start=1) if EDITS_SYS_PATH.search(line)]
    assert edits == [], f"{edits}: import siblings from `benchmarks.<name>`, run `python -m benchmarks.<name>`"
