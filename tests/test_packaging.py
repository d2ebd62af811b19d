"""Packaging: requirements.lock agrees with pyproject.toml, and the core installs and runs alone.

The core-only test builds a virtual environment that sees nothing but the core's dependencies
(linked from this one), imports every module of `fusion` there, and runs unify, decouple and
load on bfloat16 checkpoints: a run-time import missing from `[project] dependencies` fails it.
It sees this checkout, so its cpu kernel is the C library built in it (`pip install -e .`), or,
where none was built, the reference (numba is an extra).
"""

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from fusion.kernels import cpu_native
from tests.lockfile import check, digest, header, tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# Modules that need an extra, and the extra their ImportError must name.
NEEDS_EXTRA = {
    "fusion.reference_torch": "torch",
    "fusion.kernels.cpu_numba": "numba",
    "fusion.kernels.triton_kernels": "triton",
    "fusion.testing.strategies": "test",
    "fusion.testing.vectors": "test",
}
NOT_IN_THE_CORE = ("torch", "transformers", "triton", "safetensors", "hypothesis", "pytest", "numba")


# --- the lock ---------------------------------------------------------------------------------

def test_lock_agrees_with_pyproject():
    problems = check(PYPROJECT, (ROOT / "requirements.lock").read_text())
    assert problems == [], "\n".join(problems)


def _toy_pyproject(**extras) -> dict:
    return {"project": {"name": "toy", "requires-python": ">=3.10", "dependencies": ["numpy>=2.0", "click>=8.1"],
                        "optional-dependencies": extras or {"cl": ["torch>=2.2"]}}}


def _toy_lock(pyproject: dict, pins: str, python: str = "3.10") -> str:
    command = f"uv pip compile pyproject.toml --universal --python-version {python} -o requirements.lock"
    return header(pyproject, command, "uv 0.13.9") + pins


GOOD_PINS = """\
click==8.5.1              # via toy (pyproject.toml)
numpy==2.2.6 ; python_full_version < '3.11'  # via toy (pyproject.toml), torch
numpy==2.4.6 ; python_full_version >= '3.11'  # via toy (pyproject.toml), torch
torch==2.13.0             # via toy (pyproject.toml)
"""


def test_the_check_passes_a_lock_that_fits():
    assert check(_toy_pyproject(), _toy_lock(_toy_pyproject(), GOOD_PINS)) == []


def test_the_check_finds_each_disagreement():
    made_from = _toy_pyproject(cl=["torch>=2.2", "tqdm>=4"])  # then tqdm was dropped from pyproject
    pins = """\
numpy==1.26.4 ; python_full_version < '3.11'  # via toy (pyproject.toml)
numpy==2.4.6 ; python_full_version >= '3.11'  # via toy (pyproject.toml)
torch==2.13.0             # via toy (pyproject.toml)
tqdm==4.70.1              # via toy (pyproject.toml)
pillow>=9
"""
    problems = check(_toy_pyproject(), _toy_lock(made_from, pins, python="3.11"))
    expected = [
        "'pillow>=9' is not pinned",
        "made from other pyproject.toml dependency tables",
        "pins numpy==1.26.4 ; python_full_version < '3.11', outside dependencies 'numpy>=2.0'",
        "pins no click (dependencies of pyproject.toml)",
        "has tqdm as a requirement of pyproject.toml, which no longer names it",
        "resolved for Python 3.11, but requires-python is '>=3.10'",
    ]
    assert len(problems) == len(expected), "\n".join(problems)
    for problem, words in zip(problems, expected):
        assert words in problem and problem.endswith("`make lock`") and "\n" not in problem


def test_digest_follows_the_dependency_tables_only():
    pyproject = _toy_pyproject()
    described = {**pyproject, "project": {**pyproject["project"], "description": "another text"}}
    assert digest(described) == digest(pyproject)
    loosened = {**pyproject, "project": {**pyproject["project"], "dependencies": ["numpy>=1.26", "click>=8.1"]}}
    assert digest(loosened) != digest(pyproject)
    pinned = {**pyproject, "tool": {"uv": {"constraint-dependencies": ["torch==2.14.1"]}}}
    assert digest(pinned) != digest(pyproject)


def test_triton_is_only_in_its_own_extra():
    extras = PYPROJECT["project"]["optional-dependencies"]
    holders = {extra for extra, texts in extras.items() for text in texts if Requirement(text).name == "triton"}
    assert holders == {"triton"}


# --- the core alone ---------------------------------------------------------------------------

def _closure(requirements: list[str]) -> dict[str, metadata.Distribution]:
    """The installed distributions `requirements` need, following Requires-Dist with markers evaluated."""
    found: dict[str, metadata.Distribution] = {}
    seen: set[tuple[str, str]] = set()
    pending = [Requirement(text) for text in requirements]
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        for extra in ["", *sorted(requirement.extras)]:
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            if name not in found:
                try:
                    found[name] = metadata.distribution(requirement.name)
                except metadata.PackageNotFoundError:
                    pytest.fail(f"{requirement.name}, which the core needs, is not installed here; run `make test`")
            for text in found[name].requires or []:
                needed = Requirement(text)
                if needed.marker is None or needed.marker.evaluate({"extra": extra}):
                    pending.append(needed)
    return found


def _core_only_env(tmp_path: Path) -> Path:
    """A venv holding only the core's closure (linked from this environment) and this checkout."""
    env = tmp_path / "core-env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    site = env / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    for dist in _closure(PYPROJECT["project"]["dependencies"]).values():
        assert dist.files is not None, f"{dist.metadata['Name']} lists no files (no RECORD); reinstall it"
        for top in sorted({file.parts[0] for file in dist.files} - {"..", "__pycache__"}):
            link = site / top
            if not link.exists():  # a namespace shared by two distributions: the first one's
                link.symlink_to(Path(dist.locate_file(top)).resolve())
    (site / "condu-checkout.pth").write_text(f"{ROOT}\n")
    return env / "bin" / "python"


def _write_bf16(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A bfloat16 safetensors file from float32 arrays whose values bfloat16 holds exactly."""
    meta, blobs, offset = {}, [], 0
    for name, values in tensors.items():
        bits = (np.ascontiguousarray(values, dtype=np.float32).view(np.uint32) >> 16).astype("<u2")
        assert np.array_equal((bits.astype(np.uint32) << 16).view(np.float32), values), name
        meta[name] = {"dtype": "BF16", "shape": list(values.shape), "data_offsets": [offset, offset + bits.nbytes]}
        blobs.append(bits.tobytes())
        offset += bits.nbytes
    head = json.dumps(meta).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))


PROBE = """
import importlib, importlib.util, json, sys
failures = {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except ImportError as error:
        failures[name] = str(error)
print(json.dumps({"failures": failures, "present": [m for m in %r if importlib.util.find_spec(m)]}))
""" % (NOT_IN_THE_CORE,)

LOAD = """
import json, sys
import numpy as np
import fusion
tensors = fusion.load(sys.argv[1])
print(json.dumps({name: [str(t.dtype), t.view(np.uint16).ravel().tolist()] for name, t in tensors.items()}))
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in %r)))
""" % (NOT_IN_THE_CORE,)


BACKEND = """
from fusion.kernels import get_kernel
from fusion.kernels.cpu import load_backend
try:
    print(load_backend().NAME)
except ImportError as error:
    print(error)
print(get_kernel(work=1 << 40).name)
"""


def _modules() -> list[str]:
    """Every module of the fusion package, by its dotted name."""
    names = []
    for path in sorted((ROOT / "fusion").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_the_core_alone_imports_every_module_and_runs_unify_decouple_load(tmp_path):
    python = _core_only_env(tmp_path)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "CONDU_"))}

    def run(*args: str) -> str:
        done = subprocess.run([str(python), "-I", *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                              timeout=120)
        shown = " ".join(arg for arg in args if "\n" not in arg)  # the probe scripts left out
        assert done.returncode == 0, f"python {shown}: {done.stderr[-2000:]}"
        return done.stdout

    probe = json.loads(run("-c", PROBE, *_modules()))
    assert probe["present"] == [], f"the core-only environment can import {probe['present']}"
    assert set(probe["failures"]) == set(NEEDS_EXTRA), probe["failures"]
    for module, message in probe["failures"].items():
        assert f"pip install 'condu[{NEEDS_EXTRA[module]}]'" in message, f"{module}: {message}"
        assert NEEDS_EXTRA[module] in PYPROJECT["project"]["optional-dependencies"]

    # The cpu kernel: the library built in this checkout, or else, without numba, the reference.
    backend, kernel = run("-c", BACKEND).splitlines()
    if (ROOT / "fusion" / "kernels" / cpu_native._PATH.name).is_file():
        assert (backend, kernel) == ("native", "cpu")
    else:
        assert "_cpu_native is not built" in backend and "pip install 'condu[numba]'" in backend and kernel == "reference"

    # Two fine-tunes of one base, the second delta twice the first: the first decouples exactly.
    rng = np.random.default_rng(0)
    base = {"w": rng.integers(-32, 33, (6, 8)) / 64, "b": rng.integers(-32, 33, (8,)) / 64}
    delta = {name: rng.integers(-8, 9, values.shape) / 64 for name, values in base.items()}
    for name, scale in (("base", 0), ("one", 1), ("two", 2)):
        _write_bf16(tmp_path / f"{name}.safetensors", {k: (v + scale * delta[k]).astype(np.float32)
                                                       for k, v in base.items()})
    run("-m", "fusion.cli", "unify", "--base", "base.safetensors", "one.safetensors", "two.safetensors", "-q")
    run("-m", "fusion.cli", "decouple", "--task", "1", "-o", "out.safetensors", "-q")
    loaded, imported = run("-c", LOAD, "out.safetensors").splitlines()
    for name, (dtype, bits) in json.loads(loaded).items():
        expected = (base[name] + delta[name]).astype(np.float32).view(np.uint32) >> 16
        assert dtype == "bfloat16" and bits == expected.ravel().tolist(), name
    assert json.loads(imported) == []
