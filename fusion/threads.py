"""OpenMP threads that sleep while they wait, for processes that share their CPU.

torch's intra-op threads and numba's parallel regions run on libgomp, whose threads spin for a
while at every barrier before they sleep. On a machine that other work also uses, a spinning
thread burns the time slice the thread it waits for needs: measured on this project's 2-core
machine beside two busy processes, a training step of the mini CLIP took 2.5x the wall time and
2.8x the CPU time with spinning threads than with sleeping ones (`benchmarks/load.py`); idle,
sleeping threads cost nothing measurable and save a third of the CPU time. libgomp reads
OMP_WAIT_POLICY once, when it starts, so this must run before torch or numba is imported;
a value the user set is kept.
"""

from __future__ import annotations

import os

__all__ = ["passive_waiting"]


def passive_waiting() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
