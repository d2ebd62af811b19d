"""The errors fusion raises on purpose, one hierarchy (as safetensors has one SafetensorError).

    ConduError                  anything the library refuses or reports on purpose
    ├── InputError              a bad input: a checkpoint, a config, an argument (also a ValueError)
    ├── StoreDamaged            a store file fails its checks (also a ValueError)
    │   ├── IntegrityError      bytes that do not match their recorded checksums
    │   └── ManifestError       condu.json missing, damaged, of another version, or inconsistent
    ├── StoreLocked             another process is writing the store (also an OSError)
    └── Interrupted             Ctrl-C during a change; the change was rolled back

    InvariantError              a broken internal invariant: a bug, never bad input (a RuntimeError)

The command lines print a ConduError (and an OSError, which names its file) as one line and exit
with status 1 (130 for Interrupted). Anything else is a bug: it shows its traceback. The extra
built-in bases keep older `except ValueError` / `except OSError` callers working. Invariants that
guard written bytes raise InvariantError, never `assert`: `python -O` must not change what is written.
"""

from __future__ import annotations

__all__ = ["ConduError", "InputError", "StoreDamaged", "IntegrityError", "ManifestError", "StoreLocked",
           "Interrupted", "InvariantError"]


class ConduError(Exception):
    """An error the library raises on purpose; its message is one line that names the file and the fix."""


class InputError(ConduError, ValueError):
    """A bad input (a checkpoint, a config, an argument); nothing was changed on disk."""


class StoreDamaged(ConduError, ValueError):
    """A store file fails its checks; `condu-fuse verify` says what is whole."""


class IntegrityError(StoreDamaged):
    """Bytes read from a file do not match the checksums recorded for it."""


class ManifestError(StoreDamaged):
    """The manifest is missing, damaged, of another version, or inconsistent."""


class StoreLocked(ConduError, OSError):
    """Another process is writing the store."""


class Interrupted(ConduError):
    """Ctrl-C arrived during a change; the change was rolled back and the store is unchanged."""


class InvariantError(RuntimeError):
    """An internal invariant does not hold: a bug in fusion, never a bad input; the CLI shows its traceback."""
