"""Progress bars on stderr for long passes, and none where they would only add noise.

A bar appears only when asked for, for work of at least `MIN_ELEMENTS` elements, and only on a
terminal: tqdm's `disable=None` turns it off when stderr is a file or a pipe, so a log holds no
escape codes. tqdm is imported only when a bar is made (it costs about 0.15 s to import).
"""

from __future__ import annotations

import sys

__all__ = ["progress_bar", "MIN_ELEMENTS"]

MIN_ELEMENTS = 1 << 24  # below this a pass takes well under a second


def progress_bar(enabled: bool, total: int, desc: str):
    """A tqdm bar counting elements, or None."""
    if not enabled or total < MIN_ELEMENTS:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="el", unit_scale=True, file=sys.stderr, leave=False, disable=None)
