"""numpy and torch, both ways, for the torch side of the API. torch is imported only when one
of these is called, and only callers that hold torch tensors (or ask for them) call them."""

from __future__ import annotations

import numpy as np

from .arrays import is_torch
from .dtypes import DType, dtype_of

__all__ = ["is_torch", "from_torch", "to_torch"]


def from_torch(tensor) -> tuple[np.ndarray, DType]:
    """A tensor's values on the host as numpy storage (bfloat16 as uint16 bits) and its dtype."""
    import torch

    dtype = dtype_of(tensor)
    host = tensor.detach().to("cpu").contiguous()
    if dtype.storage == np.uint16 and dtype.is_float:  # bfloat16: numpy has no such type
        return host.view(torch.int16).numpy().view(np.uint16), dtype
    return host.numpy(), dtype


def to_torch(array: np.ndarray, dtype: DType, device="cpu"):
    """numpy storage of `dtype` as a torch tensor on `device` (sharing memory on the CPU)."""
    import torch

    if dtype.storage == np.uint16 and dtype.is_float:
        tensor = torch.from_numpy(np.require(array, requirements="C").view(np.int16)).view(getattr(torch, dtype.name))
    else:
        tensor = torch.from_numpy(np.require(array, requirements="C"))  # keeps a 0-d shape
    return tensor.to(device)
