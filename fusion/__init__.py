"""ConDU model fusion: one unified delta plus a bit mask and a rescaler per task.

Layers, inside out: `reference` (the rules on flat numpy arrays), `kernels` (the same, fast:
C or numba on CPU, Triton on CUDA), `engine` (one streaming pass over many tensors), `fuse`
(in-memory state dicts of numpy arrays or torch tensors), `io` (checkpoints), `store` (the
store on disk) and `cli`. The CPU path imports no framework. The names below are what a user
calls; everything else stays importable from its module. They load on first use, so the
command line starts without importing numpy for `--help`.
"""

from importlib import import_module

from .constants import KERNELS, MISSING_MODES, RESCALER_MODES

__version__ = "0.2.0"

_HOMES = {
    "FusedDeltas": "fuse", "add": "fuse", "apply_delta": "fuse", "is_fusable": "fuse", "remove": "fuse",
    "task_delta": "fuse", "unify": "fuse",
    "get_kernel": "kernels", "preload": "kernels",
    "Store": "store", "TaskRecord": "store", "StoreLockedError": "store",
    "load": "io", "save": "io", "atomic_write": "io.files",
    "passive_waiting": "threads",
    "ConduError": "errors", "InputError": "errors", "StoreDamaged": "errors", "IntegrityError": "errors",
    "ManifestError": "errors", "StoreLocked": "errors", "Interrupted": "errors",
}

__all__ = ["KERNELS", "MISSING_MODES", "RESCALER_MODES", "hub", *sorted(_HOMES)]  # hub: ids the driver resolves too


_MODULES = ("cli", "constants", "dtypes", "engine", "errors", "fidelity", "fuse", "hub", "io", "kernels", "lora", "reference",
            "rescale", "store", "testing", "threads", "torch_compat")


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(import_module(f".{_HOMES[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _MODULES:
        return import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fusion' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
