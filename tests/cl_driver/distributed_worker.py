"""One process of a launched run of the continual loop, watched (started by test_processes.py):

    python -m torch.distributed.run --nproc_per_node 2 distributed_worker.py CONFIG OUT TRACE_DIR

It records every write this process makes under OUT and a fingerprint of every training image
it is given, runs the loop, and leaves TRACE_DIR/rank<R>.json with what it saw.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import sys
from pathlib import Path

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def fingerprint(pixels) -> str:
    """A training image by its pixels."""
    return hashlib.sha1(pixels.contiguous().numpy().tobytes()).hexdigest()[:16]


def watch_batches(batches: list) -> None:
    """Record the images of every training batch this process draws."""
    import cl_driver.train as train

    drawn = train._batches

    def recording(loader, iterations):
        for pixels, labels in drawn(loader, iterations):
            batches.append([fingerprint(p) for p in pixels])
            yield pixels, labels

    train._batches = recording


def watch_writes(root: str, writes: list) -> None:
    """Record every file or folder this process creates, changes or renames under `root`."""
    import safetensors.torch

    def note(path) -> None:
        path = os.path.abspath(os.fspath(path))
        if path.startswith(root):
            writes.append(path)

    def wrap(owner, name, written):
        """Replace owner.name by a function that notes the paths `written(args, kwargs)` names."""
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            for path in written(args, kwargs):
                note(path)
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)

    def opened_for_writing(args, kwargs):
        mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
        return args[:1] if isinstance(args[0], (str, os.PathLike)) and any(c in mode for c in "wax+") else []

    wrap(builtins, "open", opened_for_writing)
    wrap(io, "open", opened_for_writing)
    wrap(os, "open", lambda a, k: a[:1] if (a[1] if len(a) > 1 else k.get("flags", 0)) & WRITE_FLAGS else [])
    for name in ("replace", "rename"):
        wrap(os, name, lambda a, k: a[:2])
    for name in ("mkdir", "makedirs", "remove", "unlink", "rmdir"):
        wrap(os, name, lambda a, k: a[:1])
    wrap(safetensors.torch, "save_file", lambda a, k: a[1:2])


def main(config_path: str, out: str, trace_dir: str) -> None:
    import torch

    torch.set_num_threads(1)
    writes, batches = [], []
    watch_writes(str(Path(out).resolve()), writes)
    watch_batches(batches)
    from cl_driver.config import load_config
    from cl_driver.loop import run

    results = run(load_config(config_path), out, progress=False)
    trace = {"rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"]), "writes": writes,
             "batches": batches, "matrices": results and results["matrices"]}
    Path(trace_dir, f"rank{trace['rank']}.json").write_text(json.dumps(trace))


if __name__ == "__main__":
    main(*sys.argv[1:4])
