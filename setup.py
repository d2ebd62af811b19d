"""The cpu kernel's C library, the one part of the build that pyproject.toml does not declare.

fusion/kernels/cpu_native.c is compiled into a shared library beside its loader,
fusion/kernels/cpu_native.py, which opens it with ctypes (it is no Python module). Every float32
operation rounds as written: no fast-math, no fused multiply-adds. The CPU's vector width is chosen
when the library loads (target_clones in the source), not by a flag here, so one build serves every
x86-64 machine. Optional: without a C compiler the install still succeeds, and the cpu kernel runs
on numba (the `numba` extra) or the reference. (setuptools' `ext-modules` table in pyproject.toml
would do the same, but it is marked experimental and warns at every install.)
"""

import hashlib
from pathlib import Path

from setuptools import Extension, setup

SOURCE = "fusion/kernels/cpu_native.c"
# The source's sha256, compiled in: the loader refuses the library beside a cpu_native.c edited since.
SOURCE_SHA256 = hashlib.sha256((Path(__file__).resolve().parent / SOURCE).read_bytes()).hexdigest()

setup(ext_modules=[Extension("fusion.kernels._cpu_native", sources=[SOURCE], optional=True,
                             define_macros=[("CONDU_SOURCE_SHA256", f'"{SOURCE_SHA256}"')],
                             extra_compile_args=["-O3", "-std=c11", "-ffp-contract=off"])])
