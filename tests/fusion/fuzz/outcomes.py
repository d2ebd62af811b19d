"""What every entry point must do with a hostile input: a correct result, or one line and no change.

`call` runs a library entry point: it returns ("ok", value) or ("refused", message), where a
refusal is a ConduError or ValueError whose message is one line naming something; any other
exception propagates (a bug: the test fails with its traceback); the readers this suite owns must
raise ConduError itself. `cli` runs `condu-fuse` in
process: exit 0, or exit 1 with exactly one `condu-fuse: error:` line on stderr. Both bound the
time an input may take. A refusal must leave every file as it was: the tests compare
`fusion.testing.checkpoints.snapshot` (every file's bytes) before and after.
"""

from __future__ import annotations

import os
import time
import tracemalloc
from pathlib import Path

from click.testing import CliRunner

from fusion.cli import main
from fusion.errors import ConduError

SECONDS = 2.0  # per entry point and input: the inputs are small, so only a blow-up gets near this
MEMORY = 64 * 1024 * 1024  # peak Python-tracked bytes while one input is read (inputs are a few MB at most)


def _one_line(message: str) -> str:
    assert message and "\n" not in message, f"not one line: {message!r}"
    return message


def call(fn, *args, traced: bool = False, only_condu: bool = False, **kwargs) -> tuple[str, object]:
    """("ok", fn's result) or ("refused", its one-line message); `traced` also bounds its memory.

    A refusal is a ConduError, or (`only_condu=False`, for code that still raises it) a ValueError."""
    refusals = ConduError if only_condu else (ConduError, ValueError)
    if traced:
        tracemalloc.start()
    start = time.perf_counter()
    try:
        outcome = ("ok", fn(*args, **kwargs))
    except refusals as err:
        outcome = ("refused", _one_line(str(err)))
    finally:
        elapsed = time.perf_counter() - start
        if traced:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert peak < MEMORY, f"{fn.__name__} held {peak} bytes"
    assert elapsed < SECONDS, f"{fn.__name__} took {elapsed:.2f} s"
    return outcome


def cli(args, cwd: Path) -> bool:
    """`condu-fuse ARGS` in `cwd`: True on exit 0, False on exit 1 with one error line; nothing else."""
    old = os.getcwd()
    os.chdir(cwd)
    start = time.perf_counter()
    try:
        result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    finally:
        os.chdir(old)
    assert time.perf_counter() - start < SECONDS, f"condu-fuse {args[0]} took too long"
    if result.exit_code == 0:
        return True
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("condu-fuse: error: "), \
        (result.exit_code, result.stderr)
    return False
