"""Where a pass runs: on the host (numpy, the cpu kernel), or on a CUDA device through torch and Triton.

A device pass is the host pass with two more steps in its pipeline (fusion.pipeline):

    reader thread   read a chunk into pinned host buffers, copy it up on a copy stream
    caller thread   launch the kernel on the chunk (Triton), copy its results down, asynchronously
    writer thread   wait for the results, write them

so reading, copying up, computing and writing overlap; device memory holds a few chunks' inputs
and results, whatever the model's size (`peak_bytes` reports what it reached). The same code
runs with torch CPU tensors (no streams, no pinning), which is how the tests check its order
and its results on a machine without a GPU: with the Triton interpreter, or a host kernel.

Choosing the device: `auto` takes CUDA when a driver is there and torch sees a device, and
never imports torch (seconds) on a machine with no driver at all.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import NamedTuple

import numpy as np

from .dtypes import DType
from .engine import ChunkInputs, StoredChunk
from .errors import InputError
from .pipeline import RESULTS_IN_FLIGHT
from .reference import ChunkResult, Originals

__all__ = ["resolve_device", "DeviceStage", "Pending"]

_DRIVER_FILES = ("/proc/driver/nvidia/version", "/dev/nvidia0", "/dev/nvidiactl")


def _driver_present() -> bool:
    return any(os.path.exists(path) for path in _DRIVER_FILES)


def _no_cuda_reason() -> str | None:
    """Why there is no CUDA device here, or None when there is one."""
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    if not _driver_present():
        return "no NVIDIA driver is loaded"
    import torch

    return None if torch.cuda.is_available() else "torch.cuda.is_available() is False"


def _cuda_available() -> bool:
    return _no_cuda_reason() is None


def _spelled(option: str, value: str) -> str:
    """An option as its caller writes it: `--device cpu` on the command line, `device='cpu'` in Python."""
    return f"{option} {value}" if option.startswith("-") else f"{option}={value!r}"


def resolve_device(device: str | None, *, option: str = "device") -> str:
    """`cpu`, or a CUDA device (`cuda`, `cuda:1`): `auto` (or None) picks CUDA when there is one.

    Errors name the setting as the caller wrote it: `option` is the keyword (`device`, the
    default) or the command line's flag (`--device`)."""
    text = "auto" if device is None else str(device)
    if text == "auto":
        return "cuda" if _cuda_available() else "cpu"
    if text == "cpu":
        return "cpu"
    if text == "cuda" or text.startswith("cuda:") and text[5:].isdigit():
        reason = _no_cuda_reason()
        if reason is not None:
            fix = "use" if option.startswith("-") else "pass"
            raise InputError(f"{_spelled(option, text)}: no CUDA device is available ({reason}); "
                             f"{fix} {_spelled(option, 'cpu')}")
        return text
    raise InputError(f"{_spelled(option, text)}: unknown device; use auto, cpu, cuda or cuda:N")


class Pending(NamedTuple):
    """A chunk's results on their way to the host: `wait()` gives the ChunkResult of numpy arrays."""

    host: ChunkResult  # numpy views of pinned buffers, filled once `event` has happened
    event: object  # a torch.cuda.Event, or None on the CPU

    def wait(self) -> ChunkResult:
        if self.event is not None:
            self.event.synchronize()
        return self.host


class DeviceStage:
    """Moves a pass's chunks onto a torch device and its results back; runs a kernel of torch tensors."""

    def __init__(self, device: str, kernel):
        import torch

        self.torch, self.device, self.kernel = torch, torch.device(device), kernel
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._ring = [dict() for _ in range(RESULTS_IN_FLIGHT)]  # pinned result buffers, by field, in turn
        self._turn = 0
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    # -- host buffers --------------------------------------------------------------------------

    def host_buffer(self, count: int, dtype) -> np.ndarray:
        """An empty host array of `count` elements; pinned (page-locked) on CUDA, so that copies to and
        from it run asynchronously."""
        nbytes = count * np.dtype(dtype).itemsize
        return self.torch.empty(nbytes, dtype=self.torch.uint8, pin_memory=self.cuda).numpy().view(dtype)

    # -- up -------------------------------------------------------------------------------------

    def _up(self, array):
        if array is None:
            return None
        array = np.require(array, requirements="C")  # keeps a 0-d shape
        if not array.flags.writeable:  # a reader's checked view: torch takes only arrays it may write
            array = array.copy()
        tensor = self.torch.from_numpy(array)
        return tensor.to(self.device, non_blocking=True) if self.cuda else tensor

    def upload(self, inputs: ChunkInputs) -> ChunkInputs:
        """The chunk's arrays as device tensors; the host buffers are free again when this returns."""
        stored = inputs.stored
        with self._on_copy_stream():
            moved = ChunkInputs(
                self._up(inputs.new), self._up(inputs.base),
                None if stored is None else StoredChunk(self._up(stored.unified), self._up(stored.packed_masks),
                                                        self._up(np.asarray(stored.rescalers, dtype=np.float64))),
                None if inputs.originals is None else Originals(self._up(inputs.originals.rows),
                                                                np.asarray(inputs.originals.index),
                                                                inputs.originals.drift))
        if self.cuda:
            self.copy_stream.synchronize()  # the pinned slot may be refilled as soon as this returns
        return moved

    def upload_arrays(self, arrays: tuple) -> tuple:
        """Host arrays as device tensors, copied on the copy stream; the host buffers are free on return."""
        with self._on_copy_stream():
            moved = tuple(self._up(a) for a in arrays)
        if self.cuda:
            self.copy_stream.synchronize()
        return moved

    def _on_copy_stream(self):
        return self.torch.cuda.stream(self.copy_stream) if self.cuda else contextlib.nullcontext()

    # -- compute and down ------------------------------------------------------------------------

    def compute(self, inputs: ChunkInputs, unified_dtype: DType) -> Pending:
        """Launch the kernel on uploaded inputs; start copying its results down."""
        options = dict(unified_dtype=unified_dtype, base=inputs.base, originals=inputs.originals)
        if inputs.stored is None:
            result = self.kernel.elect(inputs.new, **options)
        else:
            old = inputs.stored
            result = self.kernel.continual(old.unified, old.packed_masks, old.rescalers, inputs.new, **options)
        return self._down(result)

    def _down(self, result: ChunkResult) -> Pending:
        buffers, self._turn = self._ring[self._turn], (self._turn + 1) % len(self._ring)
        host = {}
        for field, tensor in result._asdict().items():
            if tensor is None:
                host[field] = None
                continue
            pinned = buffers.get(field)
            if pinned is None or pinned.numel() < tensor.numel() or pinned.dtype != tensor.dtype:
                pinned = buffers[field] = self.torch.empty(tensor.numel(), dtype=tensor.dtype, pin_memory=self.cuda)
            view = pinned[: tensor.numel()].view(tensor.shape)
            view.copy_(tensor, non_blocking=self.cuda)
            host[field] = view.numpy()
        event = None
        if self.cuda:
            event = self.torch.cuda.Event()
            event.record()
        return Pending(ChunkResult(**host), event)

    @property
    def peak_bytes(self) -> int | None:
        """The most device memory the pass held (CUDA), or None on the CPU."""
        return int(self.torch.cuda.max_memory_allocated(self.device)) if self.cuda else None
