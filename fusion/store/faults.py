"""Named points where a store change can be made to fail, for tests of crashes and errors.

A writer calls `hit(point)` at each point; normally nothing happens. A test installs an action
with `inject(point, action)`: raise an exception there, or (in a child process that the test
kills with SIGKILL) signal that the point was reached and wait. The points, in order:

    pass-chunk        after each chunk of a pass has been written (many times)
    files-written     every data file of the new generation is complete and fsynced
    backup-written    condu.backup.json holds the new manifest; condu.json still the old one
    manifest-swapped  condu.json holds the new manifest; old files not yet deleted

and one point of readers:

    manifest-read     a reader has read condu.json and is about to open the generation's files
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from ..errors import InputError

__all__ = ["POINTS", "hit", "inject"]

POINTS = ("pass-chunk", "files-written", "backup-written", "manifest-swapped", "manifest-read")
_actions: dict[str, Callable[[], None]] = {}


def hit(point: str) -> None:
    """Run the action installed at `point`, if any."""
    action = _actions.get(point)
    if action is not None:
        action()


@contextlib.contextmanager
def inject(point: str, action: Callable[[], None]) -> Iterator[None]:
    """Install `action` at `point` for the duration of the block."""
    if point not in POINTS:
        raise InputError(f"unknown fault point {point!r}; use one of {', '.join(POINTS)}")
    previous = _actions.get(point)
    _actions[point] = action
    try:
        yield
    finally:
        if previous is None:
            _actions.pop(point, None)
        else:
            _actions[point] = previous
