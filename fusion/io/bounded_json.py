"""JSON from outside, parsed only once its shape is known to be bounded.

Python's parser recurses once per nesting level and builds an object per value, so a hostile
text can exhaust the stack or the memory before it is found wrong. `loads` first measures the
raw bytes, in a few linear passes that never recurse, and refuses what exceeds its `JsonLimits`:

    brackets   the characters [ ] { } (those inside strings too: a safe over-count)
    commas     the character , (bounds the values a parse creates)
    depth      objects and lists nested outside strings; the outermost counts 1

Only then does it parse. The depth scan: escapes are removed (a pair of backslashes, then a
backslash before a quote), so every quote left opens or closes a string; the quotes and
brackets are kept in order; a bracket at an odd count of quotes is inside a string. Its work is
linear in the text, and its arrays are bounded by the bracket count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import InputError

__all__ = ["JsonLimits", "loads", "nesting"]

_MARKS = b'"[]{}'
_NOT_MARKS = bytes(c for c in range(256) if c not in _MARKS)
_QUOTE, _OPENS, _CLOSES = ord('"'), np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8)


@dataclass(frozen=True)
class JsonLimits:
    """The most a text may hold before it is parsed (see the module docstring)."""

    depth: int
    brackets: int
    commas: int


def nesting(raw: bytes) -> int:
    """How deeply objects and lists nest outside strings in a JSON text (0 for a scalar).

    Text after an unterminated string counts as inside it (the parser refuses such a text)."""
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"")  # every quote left opens or closes a string
    marks = text.translate(None, _NOT_MARKS).replace(b'""', b"")  # two adjacent quotes enclose no bracket
    marks = np.frombuffer(marks, np.uint8)
    quote = marks == _QUOTE
    outside = (np.cumsum(quote, dtype=np.uint8) & 1) == 0  # parity survives uint8 wrap-around
    steps = (np.isin(marks, _OPENS) & outside).astype(np.int32) - (np.isin(marks, _CLOSES) & outside)
    return int(steps.cumsum().max(initial=0))


def _count(raw: bytes, chars: bytes) -> int:
    return sum(raw.count(bytes([c])) for c in chars)


def loads(raw: bytes, limits: JsonLimits, *, where: str, what: str, fix: str,
          object_pairs_hook: Callable | None = None):
    """The JSON value of `raw` (UTF-8), refused in one line (InputError) past `limits` or if invalid.

    `where` names the file, `what` the text ("header", "adapter config"), `fix` the remedy."""
    brackets = _count(raw, b"[]{}")
    if brackets > limits.brackets:
        raise InputError(f"{where}: {what} holds {brackets:,} brackets, more than the {limits.brackets:,} it may "
                         f"have; {fix}")
    commas = raw.count(b",")
    if commas > limits.commas:
        raise InputError(f"{where}: {what} holds {commas:,} commas (values), more than the {limits.commas:,} it "
                         f"may have; {fix}")
    depth = nesting(raw)
    if depth > limits.depth:
        raise InputError(f"{where}: {what} nests objects and lists {depth} deep, more than the {limits.depth} it "
                         f"may have; {fix}")
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=object_pairs_hook)
    except UnicodeDecodeError:
        raise InputError(f"{where}: {what} is not UTF-8; {fix}") from None
    except ValueError as err:  # json.JSONDecodeError, a repeated key, a number of too many digits
        raise InputError(f"{where}: {what} is not valid JSON ({' '.join(str(err).split())}); {fix}") from None
