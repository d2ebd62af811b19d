"""A Hugging Face hub cache built by hand in its on-disk layout, for tests that resolve hub ids offline.

    HF_HOME/hub/models--org--name/blobs/<sha256>          file contents
                                 /refs/<branch or tag>     the commit it points at
                                 /snapshots/<commit>/FILE  relative symlinks to the blobs
"""

import hashlib
import os
from pathlib import Path


def add_to_cache(cache: Path, repo: str, commit: str, source: Path, refs: tuple[str, ...] = ()) -> Path:
    """Put `source`'s files into the cache as one snapshot of `repo`, with `refs` pointing at it."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(source.iterdir()):
        data = file.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return snapshot
