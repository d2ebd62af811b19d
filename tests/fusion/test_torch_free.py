"""The CPU path of fusion imports no framework: numpy arrays in and out, torch only for torch tensors."""

import os
import shutil
import subprocess
import sys

import pytest

MATH_MODULES = ["fusion", "fusion.reference", "fusion.kernels", "fusion.kernels.cpu", "fusion.kernels.reference",
                "fusion.engine", "fusion.fuse", "fusion.rescale", "fusion.fidelity", "fusion.dtypes",
                "fusion.lora", "fusion.io.adapter", "fusion.store.adapters", "fusion.store.inputs"]


def _fresh(code: str, **env: str) -> str:
    """stdout of `code` run in a new interpreter (nothing imported yet), with `env` added."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, **env}).stdout.strip()


def test_math_modules_do_not_import_torch():
    probe = f"import sys; import {', '.join(MATH_MODULES)}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    assert _fresh(probe) == "[]"


@pytest.mark.parametrize("backend", ["native", "numba"])
def test_a_whole_unify_add_decouple_runs_without_torch(backend):
    """Both CPU kernels (the cpu kernel on each backend), end to end on numpy arrays, and torch never
    loaded; numba only when its backend runs."""
    if backend == "native" and shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler here: the native backend cannot be built")
    probe = """
import sys
import numpy as np
from fusion import add, get_kernel, unify
deltas = [{"w": np.arange(24, dtype=np.float32).reshape(4, 6) - 11.5 * k} for k in range(3)]
for kernel in ("reference", "cpu"):
    state = add(unify(deltas[:2], kernel=kernel, chunk=8), deltas[2], kernel=kernel)
    get_kernel(kernel).fidelity_sums(state.unified["w"], state.masks["w"][0], deltas[0]["w"].reshape(-1))
    assert state.decouple(2)["w"].dtype == np.float32 and type(state.rescalers) is np.ndarray
print("torch" in sys.modules, "numba" in sys.modules, get_kernel("cpu").backend.NAME)
"""
    assert _fresh(probe, CONDU_CPU_BACKEND=backend) == f"False {backend == 'numba'} {backend}"


def test_tiny_work_never_loads_numba():
    """The default kernel for small work is the reference: a tiny unify pays no JIT start-up."""
    probe = """
import sys
import numpy as np
from fusion import add, unify
deltas = [{"w": np.full(1000, k - 1.0, dtype=np.float32)} for k in range(3)]
state = add(unify(deltas[:2]), deltas[2])
print(state.num_tasks, "numba" in sys.modules, "torch" in sys.modules)
"""
    assert _fresh(probe) == "3 False False"
