r"""LoRA factors as a dense delta: delta = scaling * B @ A, the rule PEFT merges an adapter with.

    A (r, in), B (out, r)                  a linear layer's factors; its weight is (out, in)
    delta = scaling * B @ A                (out, in)
    delta = scaling * (B @ A).T            (in, out): a weight stored transposed (GPT-2's
                                           Conv1D, fan_in_fan_out) and every embedding LoRA
    scaling = alpha / r, or alpha / sqrt(r) with rsLoRA

`dense_delta` is the readable rule, for whole tensors. `delta_rows` is the streaming path the
store reads: elements [lo, hi) of the flattened delta, computed a block of whole rows at a
time straight into the caller's buffer, so a pass never holds more of a large weight's delta
than one chunk and one row. Both compute in float32, as PEFT does for float32 factors.

rank_pattern and alpha_pattern are matched as PEFT 0.21 matches them (`get_pattern_key` in
peft.utils.other, then `pattern.get(key, default)`): the first key, in the config's order, for
which `re.match(rf"(.*\.)?({key})$", module)` matches; when none does, the module's own name is
looked up as a key. The keys are outside text, so no backtracking engine ever runs them:
- a plain key (letters, digits, `_`, `-` and `.`, with `^` first or `$` last if wanted) is a
  fixed-length pattern whose dots match any character: it matches the module's last characters
  after a dot (or the whole name), found by a dictionary lookup per key length and dot layout;
- any other key runs on RE2 (google-re2), in time linear in the name, once Python's `re` has
  accepted it too (a key PEFT cannot compile is refused, not guessed at). Keys RE2 cannot run
  in linear time (backreferences, lookaround, possessive and atomic groups) are refused, and so
  are the two spellings the engines read differently (`{,n}` and `[:...:]`).
Module names are PyTorch's dotted paths; on those (ASCII, no line breaks) the answer is PEFT's,
as the tests check against peft's own function. On other names `\d`, `\w` and `\s` keep their
ASCII meaning and `$` does not match before a final line break.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from typing import Mapping, Sequence

import numpy as np

from .errors import InputError

__all__ = ["lora_scaling", "pattern_value", "pattern_problem", "Patterns", "dense_delta", "delta_rows",
           "delta_operands", "MAX_PATTERN_KEY_CHARS", "MAX_REGEX_KEYS"]

MAX_PATTERN_KEY_CHARS = 1024  # a module's dotted name is rarely a tenth of this
MAX_REGEX_KEYS = 256  # each is tried on every module; plain keys cost a lookup, whatever their number
_MAX_GROUPS = 100  # bounds the nesting Python's recursive regex parser meets
_PLAIN = re.compile(r"\^?[A-Za-z0-9_.\-]*\$?")  # one class repeated once: linear on any key


def lora_scaling(alpha: float, rank: int, *, rslora: bool = False) -> float:
    """PEFT's scaling of B @ A: alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _regex_problem(key: str) -> str | None:
    """Why a non-plain key cannot be matched as PEFT matches it in linear time, or None."""
    if key.count("(") > _MAX_GROUPS:
        return f"has more than {_MAX_GROUPS} groups; name the modules with fewer"
    if "{," in key or "[:" in key:
        return "uses {,n} or [:...:], which Python's re and RE2 read differently; write {0,n}, or escape the ["
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FutureWarning on "[[": compiled for its verdict only
            re.compile(rf"(.*\.)?({key})$")
    except (re.error, OverflowError) as err:  # OverflowError: a repetition count past Python's
        return f"is not a regular expression PEFT can use ({getattr(err, 'msg', err)}); fix the key"
    try:
        _re2_compile(key)
    except ValueError as err:
        return (f"cannot be matched in linear time ({err}); backreferences, lookaround and possessive or atomic "
                "groups are not run on outside input, so spell it without them")
    return None


def pattern_problem(keys: Sequence[str]) -> str | None:
    """Why a rank_pattern's or alpha_pattern's keys cannot be matched, naming the key, or None."""
    regexes = 0
    for key in keys:
        if len(key) > MAX_PATTERN_KEY_CHARS:
            return (f"key {key[:40]!r}... is {len(key):,} characters, more than {MAX_PATTERN_KEY_CHARS:,}; "
                    "shorten it")
        if _PLAIN.fullmatch(key):
            continue
        regexes += 1
        if regexes > MAX_REGEX_KEYS:
            return (f"holds more than {MAX_REGEX_KEYS} regular-expression keys (keys of letters, digits, '_', '-' "
                    "and '.' are not counted); name the modules instead")
        problem = _regex_problem(key)
        if problem:
            return f"key {key!r} {problem}"
    return None


def _re2_compile(key: str):
    """PEFT's pattern for `key` on RE2; ValueError with RE2's reason if RE2 cannot run it."""
    try:
        import re2
    except ImportError as err:
        raise ImportError(f"a regular-expression rank_pattern/alpha_pattern key needs google-re2 ({err}): "
                          "pip install google-re2") from err
    options = re2.Options()
    options.log_errors = False  # the reason is in the exception; RE2 would also print it
    options.never_capture = True  # a yes/no answer needs no groups
    try:
        return re2.compile(rf"(.*\.)?({key})$", options)
    except re2.error as err:
        reason = err.args[0] if err.args else ""
        reason = reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason)
        raise InputError(" ".join(reason.split())) from None


class Patterns:
    """The keys of a rank_pattern or alpha_pattern, compiled once: `first(module)` is the key PEFT picks."""

    def __init__(self, keys: Sequence[str]):
        problem = pattern_problem(keys)
        if problem:
            raise InputError(f"rank_pattern/alpha_pattern {problem}")
        self.keys = list(keys)
        # plain keys by (length, anchored, dot positions): {key body: its first index}
        self.plain: dict[tuple[int, bool, tuple[int, ...]], dict[str, int]] = {}
        self.regexes: list[tuple[int, object]] = []  # (index, RE2 pattern), in key order
        for index, key in enumerate(self.keys):
            if _PLAIN.fullmatch(key):
                body = key[1:] if key.startswith("^") else key
                body = body[:-1] if body.endswith("$") else body
                group = (len(body), key.startswith("^"), tuple(i for i, c in enumerate(body) if c == "."))
                self.plain.setdefault(group, {}).setdefault(body, index)
            else:
                self.regexes.append((index, _re2_compile(key)))

    def _first_plain(self, name: str) -> int | None:
        best = None
        for (length, anchored, dots), bodies in self.plain.items():
            start = len(name) - length
            if start < 0 or (start > 0 and (anchored or name[start - 1] != ".")):
                continue  # a key matches the whole name, or the part after a dot
            tail = list(name[start:])
            for i in dots:
                tail[i] = "."  # a dot in the key matches any character
            index = bodies.get("".join(tail))
            if index is not None and (best is None or index < best):
                best = index
        return best

    def first(self, name: str) -> str | None:
        """The first key whose pattern matches `name`, or None."""
        best = self._first_plain(name)
        for index, regex in self.regexes:
            if best is not None and index > best:
                break
            if regex.match(name):
                return self.keys[index]
        return None if best is None else self.keys[best]


@functools.lru_cache(maxsize=16)
def _patterns(keys: tuple[str, ...]) -> Patterns:
    return Patterns(keys)  # a config's keys are matched against each of its modules


def pattern_value(patterns: Mapping[str, float] | None, module: str, default: float) -> float:
    """The value a rank_pattern or alpha_pattern gives `module`, as PEFT picks it (module docstring)."""
    if not patterns:
        return default
    key = _patterns(tuple(patterns)).first(module)
    return patterns[key] if key is not None else patterns.get(module, default)


def dense_delta(a: np.ndarray, b: np.ndarray, scaling: float, *, transpose: bool) -> np.ndarray:
    """The whole delta, readably: scaling * B @ A, transposed for weights stored (in, out)."""
    product = b.astype(np.float32) @ a.astype(np.float32)  # (out, in)
    if transpose:
        product = product.T  # (in, out)
    return np.ascontiguousarray(product * np.float32(scaling))


def delta_operands(a: np.ndarray, b: np.ndarray, *, transpose: bool) -> tuple[np.ndarray, np.ndarray]:
    """(left, right), contiguous float32, with delta = scaling * left @ right row by row:
    left (rows, r) gives one row of the delta per row, right (r, cols) is shared by all."""
    left, right = (a.T, b.T) if transpose else (b, a)
    return np.ascontiguousarray(left, dtype=np.float32), np.ascontiguousarray(right, dtype=np.float32)


def delta_rows(left: np.ndarray, right: np.ndarray, scaling: float, lo: int, hi: int, out: np.ndarray) -> np.ndarray:
    """out (hi - lo,) = elements [lo, hi) of the flattened delta scaling * left @ right.

    Whole rows inside [lo, hi) are one matmul into `out`; a row cut by lo or hi goes through a
    one-row buffer. Nothing larger than a row is allocated besides `out`."""
    cols = right.shape[1]
    pos = lo
    while pos < hi:
        row, start = divmod(pos, cols)
        whole = (hi - pos) // cols if start == 0 else 0
        if whole:
            block = out[pos - lo : pos - lo + whole * cols].reshape(whole, cols)  # (whole, cols)
            np.matmul(left[row : row + whole], right, out=block)
            pos += whole * cols
        else:
            stop = min(cols, hi - row * cols)
            out[pos - lo : pos - lo + stop - start] = (left[row] @ right)[start:stop]  # (cols,) then a slice
            pos += stop - start
    out *= np.float32(scaling)
    return out
