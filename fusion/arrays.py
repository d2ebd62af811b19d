"""The two kinds of arrays the library meets, told apart without importing a framework.

numpy arrays always; torch tensors when the caller has torch. A torch tensor is recognised by
its type's module, so code that only ever sees numpy never imports torch; the torch module used
for torch tensors is the one their caller already loaded.

The in-memory API computes a call's arrays in one of two ways, with the same few operations:
`NumpyArrays` (numpy arrays, and CPU torch tensors through zero-copy views) or `TorchArrays`
(tensors on a device, the Triton path). `compute_arrays` picks one for a call's kind and kernel.
"""

from __future__ import annotations

import sys
from typing import Iterable

import numpy as np

from . import reference
from .dtypes import BF16, as_float32, dtype_of, from_float32
from .errors import InputError

__all__ = ["is_torch", "all_finite", "to_host", "device_type", "kind_of", "compute_arrays", "NumpyArrays",
           "TorchArrays"]


def is_torch(x) -> bool:
    """Whether `x` is a torch tensor (checked by its type's module: torch is not imported)."""
    return type(x).__module__.partition(".")[0] == "torch"


def all_finite(x) -> bool:
    """No NaN and no infinity in a float numpy array or torch tensor."""
    return bool(x.isfinite().all()) if is_torch(x) else bool(np.isfinite(x).all())


def to_host(x) -> np.ndarray:
    """A small result (L1 sums, fidelity sums) as a numpy array in host memory."""
    return x.detach().cpu().numpy() if is_torch(x) else np.asarray(x)


def device_type(device) -> str:
    """`cpu` or `cuda` from a device given as text (`cuda:1`) or a torch.device."""
    return str(device).partition(":")[0]


def _kind(x) -> str:
    """`numpy`, or `torch/<device>` for a torch tensor."""
    if isinstance(x, np.ndarray):
        return "numpy"
    if is_torch(x):
        return f"torch/{x.device}"
    raise InputError(f"expected numpy arrays or torch tensors, got {type(x).__name__}; convert it with numpy.asarray")


def kind_of(arrays: Iterable, what: str) -> str:
    """The one kind of every array of a call; mixing numpy and torch, or devices, is refused."""
    kinds = sorted({_kind(x) for x in arrays})
    if len(kinds) > 1:
        raise InputError(f"{what} mixes {' and '.join(kinds)}; pass every tensor as the same kind, on one device")
    return kinds[0] if kinds else "numpy"


class NumpyArrays:
    """Compute in numpy: numpy arrays as they are, CPU torch tensors through zero-copy views."""

    def __init__(self, kind: str):
        self.kind = kind

    def view(self, x) -> np.ndarray:
        if isinstance(x, np.ndarray):
            return x
        x = x.detach()
        return (x.float() if str(x.dtype) == "torch.bfloat16" else x).numpy()  # numpy has no bfloat16

    def float32(self, x) -> np.ndarray:
        return as_float32(self.view(x))

    def to_user(self, x):
        return x if self.kind == "numpy" else sys.modules["torch"].from_numpy(x)

    def like(self, values: np.ndarray, original):
        """float32 values in `original`'s dtype (rounded to nearest even) and kind."""
        if self.kind != "numpy":
            return self.to_user(values).to(original.dtype)
        dtype = dtype_of(original)
        stored = from_float32(values, dtype)
        return stored.view(original.dtype) if dtype is BF16 else stored  # bfloat16 bits as the caller's dtype

    def stack(self, rows: list, n: int) -> np.ndarray:
        return np.stack(rows) if rows else np.zeros((0, n), dtype=np.float32)  # (T, n)

    def empty(self, shape: tuple, dtype: str) -> np.ndarray:
        return np.empty(shape, dtype=dtype)

    unpack_bits = staticmethod(reference.unpack_bits)
    reconstruct = staticmethod(reference.reconstruct)


class TorchArrays:
    """Compute in torch on the tensors' device: the Triton path (CUDA, or its interpreter)."""

    def __init__(self, kind: str):
        from . import reference_torch  # imported only for torch tensors

        self.kind, self.torch = kind, sys.modules["torch"]
        self.device = self.torch.device(kind.removeprefix("torch/"))
        self.unpack_bits, self.reconstruct = reference_torch.unpack_bits, reference_torch.reconstruct

    def view(self, x):
        return x.detach()

    def float32(self, x):
        return x.detach().float()

    def to_user(self, x):
        return self.torch.from_numpy(x) if isinstance(x, np.ndarray) else x  # host tables stay on the host

    def like(self, values, original):
        return values.to(original.dtype)

    def stack(self, rows: list, n: int):
        return self.torch.stack(rows) if rows else self.torch.zeros((0, n), device=self.device)  # (T, n)

    def empty(self, shape: tuple, dtype: str):
        return self.torch.empty(shape, dtype=getattr(self.torch, dtype), device=self.device)


def compute_arrays(kind: str, kernel_name: str | None = None):
    """Where a call of `kind` computes: torch for device tensors and the Triton kernel, numpy otherwise."""
    device = kind.removeprefix("torch/") if kind != "numpy" else "cpu"
    if kernel_name not in (None, "triton") and device != "cpu":
        raise InputError(f"kernel {kernel_name!r} computes on the host and the tensors are on {device}; "
                         "use kernel='triton' (or None) for CUDA tensors, or move them to the CPU")
    if kernel_name == "triton" and kind == "numpy":
        raise InputError("the triton kernel takes torch tensors and these are numpy arrays; pass torch tensors "
                         "(on CUDA), or use kernel='cpu'")
    return TorchArrays(kind) if device != "cpu" or kernel_name == "triton" else NumpyArrays(kind)
