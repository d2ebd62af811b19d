"""What is on disk under some folders, for tests that a refused command changed nothing."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path


def disk_state(*roots: str | os.PathLike) -> dict[str, tuple]:
    """{path: what it is} of every entry under `roots` (and the roots): folders, links and their
    targets, files with their permission bits and the sha256 of their bytes."""
    state = {}
    for root in map(Path, roots):
        for path in [root, *sorted(root.rglob("*"))] if root.exists() or root.is_symlink() else []:
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                state[str(path)] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                state[str(path)] = ("folder",)
            elif stat.S_ISREG(st.st_mode):
                state[str(path)] = ("file", stat.S_IMODE(st.st_mode), hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                state[str(path)] = ("special", stat.S_IFMT(st.st_mode))
    return state
