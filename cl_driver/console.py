"""What `condu-cl` shows on the terminal: progress bars only where a person watches them.

A bar redraws itself with carriage returns and cursor escapes; in a log file those are noise, so
bars are drawn only when stderr is a terminal, and the loop writes one plain line a task instead.
"""

from __future__ import annotations

import sys


def bars_on_terminal() -> bool:
    """Whether progress bars may be drawn: stderr is a terminal."""
    return sys.stderr.isatty()


def quiet_library_bars() -> None:
    """Turn off the bars transformers and huggingface_hub draw while loading and downloading."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging

    disable_progress_bars()
    logging.disable_progress_bar()
