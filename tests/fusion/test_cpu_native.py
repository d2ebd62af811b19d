"""The native backend of the cpu kernel: built once per machine, never loaded from a folder others can
write to, and replaced by the numba backend where it cannot be built. Its results are tested in
test_cpu_kernel.py (every test there runs on both backends)."""

import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler here")

PROBE = """
import numpy as np
from fusion.kernels import cpu_native
from fusion.kernels.cpu import CpuKernel
from fusion.reference import elect
deltas = np.random.default_rng(0).standard_normal((3, 100_000), dtype=np.float32)  # blocks for two threads
kernel = CpuKernel()
result = kernel.elect(deltas)
assert np.array_equal(result.unified, elect(deltas).unified)
print(kernel.backend.NAME)
print(cpu_native._state.get("error", ""))
"""


def _probe(cache, code: str = PROBE, **env: str) -> list[str]:
    """The probe's lines, run in a new interpreter with its cache folder at `cache`."""
    environment = {**os.environ, "CONDU_CACHE_DIR": str(cache), **env}
    environment.pop("CONDU_CPU_BACKEND", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def _built(cache) -> list[str]:
    return sorted(p.name for p in (cache / "kernels").glob("*.so"))


def test_built_once_then_loaded(tmp_path):
    assert _probe(tmp_path)[0] == "native"
    library = _built(tmp_path)
    assert len(library) == 1
    stamp = (tmp_path / "kernels" / library[0]).stat().st_mtime_ns
    assert _probe(tmp_path)[0] == "native"
    assert _built(tmp_path) == library and (tmp_path / "kernels" / library[0]).stat().st_mtime_ns == stamp
    assert not list((tmp_path / "kernels").glob(".build-*")), "a build left its temporary file"


def test_a_damaged_library_is_built_again(tmp_path):
    _probe(tmp_path)
    [library] = _built(tmp_path)
    (tmp_path / "kernels" / library).write_bytes(b"not a shared library")
    assert _probe(tmp_path)[0] == "native"
    assert _built(tmp_path) == [library] and (tmp_path / "kernels" / library).stat().st_size > 1000


def test_without_a_compiler_the_numba_backend_runs(tmp_path):
    backend, why = _probe(tmp_path, CC="condu-no-such-compiler")
    assert backend == "numba" and "no C compiler" in why
    assert _built(tmp_path) == []


def test_a_failing_build_falls_back_and_names_the_compiler(tmp_path):
    backend, why = _probe(tmp_path, CC="false")
    assert backend == "numba" and "failed" in why and "false" in why
    assert _built(tmp_path) == [] and not list((tmp_path / "kernels").glob(".build-*"))


def test_a_cache_folder_others_can_write_is_never_used(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels").chmod(0o777)
    backend, why = _probe(tmp_path)
    assert backend == "numba" and "writable by others" in why
    assert _built(tmp_path) == []


def test_asking_for_native_by_name_says_why_it_is_missing(tmp_path):
    code = "from fusion.kernels.cpu import CpuKernel\nCpuKernel(backend='native').backend"
    environment = {**os.environ, "CONDU_CACHE_DIR": str(tmp_path), "CC": "condu-no-such-compiler"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment)
    assert done.returncode != 0 and "native backend is not available: no C compiler found" in done.stderr


def test_a_forked_child_runs_the_kernel(tmp_path):
    """Threads do not survive a fork: a child makes a pool of its own instead of waiting forever."""
    code = PROBE + """
import multiprocessing
with multiprocessing.get_context("fork").Pool(1) as pool:
    child = pool.apply_async(CpuKernel().elect, (deltas,)).get(timeout=60)
print(np.array_equal(child.unified, result.unified))
"""
    lines = _probe(tmp_path, code)
    assert lines[0] == "native" and lines[-1] == "True"
