"""Kernels: the chunk operations of ConDU behind one contract, implemented three ways.

- `reference`: the readable numpy rules (fusion.reference); starts at once.
- `cpu`: fused block-chunked passes on CPU threads, in C (built when the package is installed)
  or, where that library was not built, numba (the `numba` extra); proven equal to the reference.
- `triton`: Triton and torch on CUDA; torch tensors in, torch tensors out on their device.

Equality with the reference: masks, signs, unified values and rebuilt weights bit for bit; L1
and fidelity sums to a float tolerance. `get_kernel` picks one by name, or the best for a device
and an amount of work; `preload` loads one on a background thread.
"""

from __future__ import annotations

import importlib
import threading
from concurrent.futures import Future
from typing import Any, Protocol, runtime_checkable

from ..arrays import device_type
from ..constants import KERNELS
from ..dtypes import F32, DType
from ..errors import InputError
from ..reference import ChunkResult, Originals

__all__ = ["Kernel", "KERNELS", "SMALL_WORK", "get_kernel", "default_kernel_name", "preload"]

# Below this many elements of work (every task's elements of a whole pass together) the numpy
# reference is picked over the cpu kernel, which needs neither a build nor threads. The reference
# runs at about 40M elements/s (elect) and 25M/s (continual step) on the 2-core development
# machine: at 4M elements it takes 0.1-0.17 s, which keeps a tiny `condu-fuse unify` under 0.5 s.
# The cpu kernel's first use in a process costs, on its native backend, the load of the library
# built with the package (milliseconds), and on its numba backend the
# import of numba and the load of its cached machine code: 0.7-1.0 s at a load average of 2,
# 1.2-1.6 s at 8. Measured there on 2 tasks of 1M elements (2M of work), whole `condu-fuse
# unify` processes: reference 0.54 s, native 0.41-0.44 s, numba 1.20 s.
SMALL_WORK = 4 << 20

_MODULES = {"reference": "reference", "cpu": "cpu", "triton": "triton_kernels"}


@runtime_checkable
class Kernel(Protocol):
    """The contract of every kernel; see `fusion.reference` for the meaning of each operation.

    Arrays are numpy arrays for `reference` and `cpu` (float32, float16, float64 or
    `ml_dtypes.bfloat16` inputs) and torch tensors for `triton`; results come back in the
    inputs' kind, on their device. `unified_dtype` is a `fusion.dtypes.DType` (or its name).
    """

    name: str

    def elect(self, deltas: Any, *, unified_dtype: DType = F32, base: Any = None,
              originals: Originals | None = None) -> ChunkResult:
        """Stacked deltas (T, n) -> unified (n,) float32, packed masks (T, ceil(n/8)), L1 sums (T,).

        With `base` (n,), the rows are fine-tuned weights and the deltas `rows - base`; with
        `originals`, the result's `fidelity` (T, 5) holds the measured tasks' fidelity sums.
        """

    def continual(self, unified: Any, packed_masks: Any, rescalers: Any, new_deltas: Any, *,
                  unified_dtype: DType = F32, base: Any = None, originals: Originals | None = None) -> ChunkResult:
        """Rebuild the T_old stored tasks of a chunk, then elect them with the (T_new, n) new rows."""

    def rebuild(self, base: Any, unified: Any, packed: Any, rescaler: float, *, out: Any = None) -> Any:
        """theta0 + lambda * M * u over one chunk of one task: float32 (n,), in `out` if given."""

    def fidelity_sums(self, unified: Any, packed: Any, original: Any) -> Any:
        """(5,) float64 sums A, E, D, Z, C of one chunk of one task (fusion.fidelity)."""


# Preloads under way, by kernel name: a kernel is handed out only once its warm-up is over, so no
# two threads run its parallel regions at once (numba's workqueue layer aborts the process on that).
_PRELOADS: dict[str, Future] = {}


def _load(name: str) -> Kernel:
    pending = _PRELOADS.get(name)
    if pending is not None and threading.current_thread().name != f"preload-{name}-kernel":
        pending.exception()  # wait; a failed preload leaves the import below to raise the error itself
    kernel = importlib.import_module(f"{__name__}.{_MODULES[name]}").KERNEL
    ready = getattr(kernel, "ready", None)  # the cpu kernel finds its backend here, or raises ImportError
    return kernel if ready is None else ready()


def default_kernel_name(device: Any = "cpu", work: int | None = None) -> str:
    """The best kernel for `device` (text or torch.device) and `work` elements: see SMALL_WORK."""
    if device_type(device) == "cuda":
        return "triton"
    return "reference" if work is not None and work < SMALL_WORK else "cpu"


def get_kernel(name: str | None = None, *, device: Any = "cpu", work: int | None = None) -> Kernel:
    """A kernel by name (`reference`, `cpu`, `triton`), or the best one for `device` and `work`.

    Without a name: Triton on CUDA; on CPU the reference for small work (fewer than SMALL_WORK
    elements, or neither the built C library nor numba at hand) and the cpu kernel otherwise.
    """
    if name is not None and name not in KERNELS:
        raise InputError(f"unknown kernel {name!r}; use one of {', '.join(KERNELS)}")
    if name is not None:
        return _load(name)
    name = default_kernel_name(device, work)
    try:
        return _load(name)
    except ImportError as error:
        if name == "cpu":  # neither the C library nor numba: the reference does the same work
            return _load("reference")
        raise ImportError(f"the CUDA path needs triton ({error}); pip install 'condu[triton]', "
                          "or move the tensors to the CPU") from error


def preload(name: str = "cpu") -> Future:
    """Import and warm kernel `name` on a background thread; the Future gives the kernel.

    The cpu kernel's first use costs milliseconds (native backend) to about a second (numba's
    import and cached code); a caller that starts this before its first reads hides that behind
    them. `get_kernel(name)` later
    waits for the warm-up to end rather than running the kernel beside it. Preloading a kernel
    twice starts it once.
    """
    if name not in KERNELS:
        raise InputError(f"unknown kernel {name!r}; use one of {', '.join(KERNELS)}")
    if name in _PRELOADS:
        return _PRELOADS[name]
    future: Future = Future()
    _PRELOADS[name] = future

    def load() -> None:
        try:
            kernel = _load(name)
            warm = getattr(kernel, "warm", None)
            if warm is not None:
                warm()
            future.set_result(kernel)
        except BaseException as error:  # handed to whoever asks the Future
            future.set_exception(error)

    threading.Thread(target=load, name=f"preload-{name}-kernel", daemon=True).start()
    return future
