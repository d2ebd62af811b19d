"""The cpu kernel's backend chosen for a test module: native (where its library is built) or numba."""

from __future__ import annotations

import contextlib
from typing import Iterator

import pytest

from fusion.kernels.cpu import KERNEL

BACKENDS = ["native", "numba"]


@contextlib.contextmanager
def using_backend(name: str) -> Iterator[str]:
    """Every cpu kernel, the shared KERNEL included, runs on backend `name` inside the block."""
    if name == "native":
        from fusion.kernels import cpu_native

        if not cpu_native.available():
            pytest.skip(f"no native backend on this machine: {cpu_native._state['error']}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CONDU_CPU_BACKEND", name)
        patch.setattr(KERNEL, "_backend", None)
        yield name
