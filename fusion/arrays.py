"""The two kinds of arrays the library meets, told apart without importing a framework.

numpy arrays always; torch tensors when the caller has torch. A torch tensor is recognised by
its type's module, so code that only ever sees numpy never imports torch.
"""

from __future__ import annotations

import numpy as np

__all__ = ["is_torch", "all_finite", "to_host", "device_type"]


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
