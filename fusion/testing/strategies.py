"""Hypothesis strategies for ConDU tests, in one place, with keyword-only knobs.

They shrink toward few tasks, short tensors and small integers, so a failure prints a case a
person can read. Values are drawn from a small integer grid times a scale, which makes exact
zeros and exact sign ties common (the cases the rules are most particular about). With the
default power-of-two scale, float32 sums of a few such values are exact, so results do not
depend on the order in which tasks are summed.

Arrays are numpy arrays. Their dtype is a `fusion.dtypes.DType` (or its name); bfloat16 comes
as an `ml_dtypes.bfloat16` array, the way a user hands one to the library (and the way
`fusion.load` and `Store.load_task` return one).
"""

from __future__ import annotations

import json
import struct
import copy
from typing import Mapping, Sequence

import numpy as np

try:
    import hypothesis.strategies as st
except ImportError as error:
    raise ImportError(f"{__name__} needs hypothesis ({error}): pip install 'condu[test]'") from error

from ..constants import RESCALER_MODES
from ..dtypes import BF16, F16, F32, DType, float_dtype, from_float32

__all__ = [
    "deltas",
    "delta_sequences",
    "state_dicts",
    "continual_schedules",
    "rescaler_modes",
    "chunk_sizes",
    "lora_factors",
    "with_private_tensors",
    "checkpoint_sets",
    "FLOAT_DTYPES",
    "as_dtype",
    "HEADER_MUTATIONS",
    "safetensors_files",
    "CONFIG_MUTATIONS",
    "adapter_configs",
    "MANIFEST_MUTATIONS",
    "v1_manifests",
]

FLOAT_DTYPES = (F32, F16, BF16)

# Shapes a drawn tensor may take besides 1-D ones: a few 2-D, some not a multiple of 8.
_MATRIX_SHAPES = [(2, 3), (3, 5), (4, 4)]


def _draw(draw, value):
    """A knob is either a fixed value or a strategy to draw it from."""
    return draw(value) if isinstance(value, st.SearchStrategy) else value


def as_dtype(values: np.ndarray, dtype: DType | str = F32) -> np.ndarray:
    """float32 values as a numpy array of `dtype`, rounded to nearest even; bfloat16 as ml_dtypes'."""
    dtype = float_dtype(dtype)
    stored = from_float32(np.asarray(values, dtype=np.float32), dtype)
    if dtype is BF16:
        import ml_dtypes  # a test dependency, for the bfloat16 arrays users pass

        return stored.view(ml_dtypes.bfloat16)
    return stored


@st.composite
def deltas(
    draw,
    *,
    num_tasks: st.SearchStrategy[int] | int = st.integers(1, 4),
    length: st.SearchStrategy[int] | int = st.integers(1, 40),
    dtype: DType | str = F32,
    zero_fraction: float = 0.3,
    scale: float = 2.0**-6,
    disjoint: bool = False,
) -> np.ndarray:
    """Stacked deltas `(T, n)`; entries are small integers times `scale`, often exactly 0.

    `disjoint=True` keeps one task's entry per position (the others are 0), so no two tasks
    ever share a position.
    """
    t, n = _draw(draw, num_tasks), _draw(draw, length)
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    values = rng.integers(-8, 9, (t, n)).astype(np.float32)  # (T, n)
    zeros = rng.random((t, n)) < zero_fraction  # (T, n)
    if disjoint:
        owner = rng.integers(0, t, n)  # (n,)
        zeros |= np.arange(t)[:, None] != owner[None, :]
    values = np.where(zeros, np.float32(0.0), values) * np.float32(scale)  # (T, n) float32
    return as_dtype(values, dtype)


@st.composite
def state_dicts(
    draw,
    *,
    num_tasks: st.SearchStrategy[int] | int = st.integers(1, 4),
    num_tensors: st.SearchStrategy[int] | int = st.integers(1, 3),
    max_numel: int = 30,
    dtype: DType | str = F32,
    zero_fraction: float = 0.3,
    scale: float = 2.0**-6,
    disjoint: bool = False,
) -> list[dict[str, np.ndarray]]:
    """T deltas as state dicts over the same named tensors of random shapes."""
    t, k = _draw(draw, num_tasks), _draw(draw, num_tensors)
    choices = [(n,) for n in range(1, max_numel + 1)] + [s for s in _MATRIX_SHAPES if int(np.prod(s)) <= max_numel]
    shapes = {f"t{j}.weight": draw(st.sampled_from(choices)) for j in range(k)}
    tables = {
        name: draw(deltas(num_tasks=t, length=int(np.prod(s)), dtype=dtype, zero_fraction=zero_fraction,
                          scale=scale, disjoint=disjoint))
        for name, s in shapes.items()
    }
    return [{name: tables[name][i].reshape(shapes[name]) for name in shapes} for i in range(t)]


@st.composite
def delta_sequences(
    draw,
    *,
    steps: st.SearchStrategy[int] | int = st.integers(2, 6),
    num_tensors: st.SearchStrategy[int] | int = st.integers(1, 3),
    max_numel: int = 30,
    dtype: DType | str = F32,
    zero_fraction: float = 0.3,
    scale: float = 2.0**-6,
) -> list[dict[str, np.ndarray]]:
    """A sequence of task deltas for continual runs: unify the first, add the rest one by one."""
    return draw(state_dicts(num_tasks=_draw(draw, steps), num_tensors=num_tensors, max_numel=max_numel,
                            dtype=dtype, zero_fraction=zero_fraction, scale=scale))


@st.composite
def continual_schedules(
    draw,
    *,
    steps: st.SearchStrategy[int] | int = st.integers(2, 6),
    max_reunify: int = 2,
    num_tensors: st.SearchStrategy[int] | int = st.integers(1, 3),
    max_numel: int = 30,
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray] | None]]:
    """A continual run: `(first, later)`; unify the deltas in `first`, then apply `later` in order.

    Each item of `later` is one new task's delta (`add(state, delta)`) or None, a re-unification
    with no new task (`add(state, ())`). At most `max_reunify` Nones are inserted.
    """
    sequence = draw(delta_sequences(steps=steps, num_tensors=num_tensors, max_numel=max_numel))
    num_first = draw(st.integers(1, len(sequence) - 1)) if len(sequence) > 1 else 1
    later: list[dict[str, np.ndarray] | None] = list(sequence[num_first:])
    for _ in range(draw(st.integers(0, max_reunify))):
        later.insert(draw(st.integers(0, len(later))), None)
    return sequence[:num_first], later


# Names and shapes of tensors a fine-tune may add (a new head, a new bias): drawn per task, so two
# tasks may share one in one shape, in two shapes, or not at all.
_EXTRA_NAMES = ("head.weight", "extra.bias")
_EXTRA_SHAPES = [(2,), (3,), (2, 3)]


def _grid(rng: np.random.Generator, shape: tuple, scale: float) -> np.ndarray:
    return (rng.integers(-8, 9, shape) * scale).astype(np.float32)  # small integers times scale


@st.composite
def with_private_tensors(
    draw,
    deltas_list: list[dict[str, np.ndarray]],
    *,
    max_extra: int = 2,
    dtype: DType | str = F32,
    scale: float = 2.0**-6,
) -> list[dict[str, np.ndarray]]:
    """The deltas, each with up to `max_extra` tensors of its own (names of _EXTRA_NAMES, shapes drawn
    per task): what the in-memory API keeps private unless every delta has it in one shape."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    out = []
    for delta in deltas_list:
        names = draw(st.lists(st.sampled_from(_EXTRA_NAMES), max_size=max_extra, unique=True))
        extra = {name: as_dtype(_grid(rng, draw(st.sampled_from(_EXTRA_SHAPES)), scale), dtype) for name in names}
        out.append({**delta, **extra})
    return out


@st.composite
def checkpoint_sets(
    draw,
    *,
    num_tasks: st.SearchStrategy[int] | int = st.integers(1, 4),
    num_tensors: st.SearchStrategy[int] | int = st.integers(1, 3),
    max_numel: int = 30,
    private: bool = True,
    dtype: DType | str = F32,
    zero_fraction: float = 0.3,
    scale: float = 2.0**-6,
) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """`(base, finetunes)`: a base state dict (float tensors and an int64 `position_ids` buffer) and
    T fine-tunes of it, every value a small integer times `scale`, so deltas are exact.

    With `private`, a fine-tune may also carry what a store keeps private to it: tensors the base
    lacks (drawn per task, so some share a name and a shape) and, when the base has two tensors
    or more, its first tensor in another shape (then counted as unchanged there).
    """
    t = _draw(draw, num_tasks)
    shapes = draw(state_dicts(num_tasks=1, num_tensors=num_tensors, max_numel=max_numel))[0]
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    base = {name: as_dtype(_grid(rng, a.shape, scale), dtype) for name, a in shapes.items()}
    tables = {name: draw(deltas(num_tasks=t, length=a.size, zero_fraction=zero_fraction, scale=scale))
              for name, a in base.items()}  # (T, n) float32
    finetunes = [{name: as_dtype(a.astype(np.float32) + tables[name][i].reshape(a.shape), dtype)
                  for name, a in base.items()} for i in range(t)]
    base["position_ids"] = np.arange(4, dtype=np.int64)
    for ft in finetunes:
        ft["position_ids"] = base["position_ids"].copy()
    if not private:
        return base, finetunes
    finetunes = draw(with_private_tensors(finetunes, dtype=dtype, scale=scale))
    first = next(iter(shapes))
    for ft in finetunes:
        if len(shapes) > 1 and draw(st.booleans()):
            ft[first] = as_dtype(_grid(rng, (base[first].size + 1,), scale), dtype)  # another shape
    return base, finetunes


def rescaler_modes() -> st.SearchStrategy[str]:
    """One of the rescaler modes (`model`, `tensor-mean`, `tensor`)."""
    return st.sampled_from(RESCALER_MODES)


def chunk_sizes(*, max_chunk: int = 64) -> st.SearchStrategy[int]:
    """Chunk sizes the engine accepts: positive multiples of 8, shrinking toward 8."""
    return st.integers(1, max(1, max_chunk // 8)).map(lambda m: 8 * m)


@st.composite
def lora_factors(
    draw,
    *,
    rank: st.SearchStrategy[int] | int = st.integers(1, 8),
    rows: st.SearchStrategy[int] | int = st.integers(1, 12),
    cols: st.SearchStrategy[int] | int = st.integers(1, 12),
    transpose: st.SearchStrategy[bool] | bool = st.booleans(),
    scale: float = 2.0**-3,
) -> tuple[np.ndarray, np.ndarray, float, bool]:
    """LoRA factors `(A (r, in), B (out, r), scaling, transpose)` whose delta is `(rows, cols)`.

    Entries are small integers times `scale` and the scaling a power of two, so every float32
    product and sum of a delta entry is exact, whatever order a matmul adds them in.
    """
    r, n_rows, n_cols, flip = _draw(draw, rank), _draw(draw, rows), _draw(draw, cols), _draw(draw, transpose)
    n_out, n_in = (n_cols, n_rows) if flip else (n_rows, n_cols)  # a transposed weight is stored (in, out)
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    a = (rng.integers(-8, 9, (r, n_in)) * scale).astype(np.float32)  # (r, in)
    b = (rng.integers(-8, 9, (n_out, r)) * scale).astype(np.float32)  # (out, r)
    scaling = draw(st.sampled_from([0.25, 0.5, 1.0, 2.0]))
    return a, b, scaling, flip



# ---- Hostile inputs (the fuzz suite): safetensors files and adapter configs, valid or mutated ----
#
# Each strategy builds a valid input, then applies at most one mutation from its list, so a failure
# shrinks toward the valid input and names the one rule it broke. Inputs are built as JSON text,
# never as nested Python objects, so nesting thousands of levels deep costs nothing to make.

HEADER_MUTATIONS = ("none", "names", "zero-size", "offsets", "dtype", "shape", "huge-dim", "many-dims", "deep",
                    "metadata", "long-metadata", "repeat-key", "not-object", "garbage", "length", "truncate")
_FILE_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "U8": np.uint8, "BOOL": np.bool_}
# Names with the characters a header scan must get right: quotes, backslashes, brackets, non-ASCII.
_NAME_CHARS = st.sampled_from(list('ab.0_"\\[]{},:é '))
_DEPTHS = st.one_of(st.integers(2, 8), st.sampled_from([100, 1000, 5000]))


def _nested(depth: int, *, objects: bool = False) -> str:
    """A JSON value `depth` containers deep, as text."""
    return ('{"k":' * depth + "0" + "}" * depth) if objects else ("[" * depth + "0" + "]" * depth)


def _framed(text: bytes) -> bytes:
    """A header's JSON with its 8-byte length, padded with spaces as writers do."""
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


@st.composite
def _file_tensors(draw, layout: Mapping[str, tuple] | None, max_tensors: int) -> list[tuple[str, str, tuple, bytes]]:
    """(name, dtype code, shape, bytes): `layout`'s float32 tensors, or up to `max_tensors` drawn ones."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    if layout is not None:
        return [(n, "F32", tuple(s), _grid(rng, tuple(s), 2.0**-6).tobytes()) for n, s in layout.items()]
    names = draw(st.lists(st.text(_NAME_CHARS, min_size=1, max_size=6), max_size=max_tensors, unique=True))
    out = []
    for name in names:
        code = draw(st.sampled_from(sorted(_FILE_DTYPES)))
        shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
        out.append((name, code, shape, rng.integers(0, 2, shape).astype(_FILE_DTYPES[code]).tobytes()))
    return out


@st.composite
def _mutated_entry(draw, entry: dict, mutation: str) -> str:
    """One tensor entry, broken by `mutation`, as JSON text."""
    entry = dict(entry)
    if mutation == "offsets":
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = draw(st.sampled_from([[begin, end + 1], [begin + 1, end], [end, begin], [begin],
                                                      [begin, end, end], [begin, 2**64], [-1, end], [0.0, end]]))
    elif mutation == "dtype":
        entry["dtype"] = draw(st.sampled_from(["F16", "I64", "BF16", "F8_E4M3", "Q7", "", 5, None, ["F32"]]))
    elif mutation == "shape":
        shape = entry["shape"]
        entry["shape"] = draw(st.sampled_from([shape + [1], shape + [2], shape[1:], [-1], [1.5], [True], "2", None]))
    elif mutation == "many-dims":
        ones = draw(st.sampled_from([64, 65, 80])) - len(entry["shape"])  # numpy's limit is 64 dimensions
        entry["shape"] = [1] * max(0, ones) + entry["shape"]
    elif mutation == "deep":
        field = draw(st.sampled_from(["shape", "data_offsets", "dtype", "extra"]))
        text = json.dumps({k: v for k, v in entry.items() if k != field})[:-1]
        sep = ", " if text != "{" else ""
        return f'{text}{sep}"{field}": {_nested(draw(_DEPTHS), objects=draw(st.booleans()))}}}'
    return json.dumps(entry)


@st.composite
def safetensors_files(
    draw,
    *,
    layout: Mapping[str, tuple] | None = None,
    max_tensors: int = 3,
    mutation: st.SearchStrategy[str] | str = st.sampled_from(HEADER_MUTATIONS),
) -> bytes:
    """The bytes of a safetensors file: valid, or broken by one of HEADER_MUTATIONS.

    `layout` ({name: shape}) makes float32 tensors of those shapes (a fine-tune of a base of that
    layout); otherwise up to `max_tensors` tensors of several dtypes, with names that hold quotes,
    backslashes, brackets and non-ASCII characters. Whether the reference implementation reads
    the result is for the caller to ask: some mutations still leave a valid file."""
    mutation = _draw(draw, mutation)
    tensors = draw(_file_tensors(layout, max_tensors))
    entries, data = {}, b""
    for name, code, shape, raw in tensors:
        entries[name] = {"dtype": code, "shape": list(shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    metadata = {"format": "pt"}
    if mutation == "names":  # one more tensor, named with the characters a scan must get right
        name = draw(st.text(_NAME_CHARS, min_size=1, max_size=8))
        entries[name] = {"dtype": "F32", "shape": [1], "data_offsets": [len(data), len(data) + 4]}
        data += np.float32(1.0).tobytes()
    if mutation in ("zero-size", "huge-dim"):  # tensors of no elements: valid, or too large for numpy to describe
        shapes = [[0], [0, 5], [2**40, 0], [0, 2**60]] if mutation == "zero-size" else \
            [[0, 2**64], [2**64, 0], [0, 2**63], [2**62, 2**62, 0], [0, 2**61], [2**40, 0, 2**40]]
        for k, shape in enumerate(draw(st.lists(st.sampled_from(shapes), min_size=1, max_size=2))):
            entries[f"empty.{k}"] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data)] * 2}
    if mutation == "metadata":
        metadata[draw(st.sampled_from(["format", "n"]))] = draw(st.sampled_from([1, None, ["pt"], {"a": "b"}, True]))
    if mutation == "long-metadata":  # around the 1 MiB limit
        metadata["notes"] = "x" * draw(st.sampled_from([2**20 - 16, 2**20 + 1, 2**21]))
    pairs = [("__metadata__", json.dumps(metadata))] + [(n, json.dumps(e, ensure_ascii=draw(st.booleans())))
                                                        for n, e in entries.items()]
    if mutation in ("offsets", "dtype", "shape", "many-dims", "deep") and entries:
        index = draw(st.integers(1, len(pairs) - 1))
        pairs[index] = (pairs[index][0], draw(_mutated_entry(json.loads(pairs[index][1]), mutation)))
    elif mutation == "deep":
        pairs[0] = (pairs[0][0], _nested(draw(_DEPTHS), objects=draw(st.booleans())))
    if mutation == "repeat-key" and entries:
        pairs.append(draw(st.sampled_from(pairs[1:])))
    text = "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in pairs) + "}"
    if mutation == "not-object":
        text = draw(st.sampled_from(["[]", '"x"', "1", "null", "[" + text + "]"]))
    raw = text.encode()
    if mutation == "garbage":  # one token or byte where it does not belong (0xff: not UTF-8)
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from([b"{", b"}", b"[", b'"', b"\\", b",", b"NaN", b"\x00", b"\xff"])) + raw[at:]
    file = _framed(raw) + data
    if mutation == "length":
        (length,) = struct.unpack("<Q", file[:8])
        new = draw(st.sampled_from([0, 1, length - 1, length + 1, len(file), 2**63, 2**64 - 1]))
        file = struct.pack("<Q", max(0, new)) + file[8:]
    if mutation == "truncate":
        file = file[: draw(st.integers(0, len(file) - 1))]
    return file


CONFIG_MUTATIONS = ("none", "patterns", "wrong-type", "missing", "bad-value", "deep", "unknown-fields", "not-json",
                    "not-object")
# Keys of the kinds PEFT users write, and the hostile and the broken ones.
PATTERN_KEYS = ("layer.0", "0", "layer\\.0", "layer.\\d+", "^layer.0$", "(layer|block).0", "lay.r.0", "x",
                "(a+)+b", "(a|aa)*c", "(", "[", "a{,2}", "[[:alpha:]]", "(?<=a)b", "(a)\\1", "a*+", "(?i)a",
                "a" * 2000, "\\")
# Values of the wrong type for a field, and values of the right type but out of range.
_WRONG = ("8", "16", "true", "false", None, [1], {"a": 1}, 1.5, True, False, -1, 0, 2**70)


@st.composite
def adapter_configs(
    draw,
    *,
    modules: Sequence[str] = ("layer.0",),
    rank: int = 2,
    mutation: st.SearchStrategy[str] | str = st.sampled_from(CONFIG_MUTATIONS),
) -> bytes:
    """The bytes of a LoRA adapter_config.json for factors of `rank` on `modules`: valid, or broken
    by one of CONFIG_MUTATIONS (a wrong type, a missing field, a value out of range, hostile or
    broken patterns, deep nesting, unknown fields). Some mutations still leave a valid config."""
    mutation = _draw(draw, mutation)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": draw(st.sampled_from([1, 4, 2.5, 0])),
              "target_modules": list(modules), "use_rslora": draw(st.booleans()),
              "fan_in_fan_out": draw(st.booleans()), "bias": "none", "rank_pattern": {}, "alpha_pattern": {},
              "lora_dropout": 0.0, "task_type": None, "base_model_name_or_path": None}
    if mutation == "patterns":
        for field in ("rank_pattern", "alpha_pattern"):
            keys = draw(st.lists(st.sampled_from(PATTERN_KEYS), max_size=3, unique=True))
            value = st.sampled_from([rank, rank + 1]) if field == "rank_pattern" else st.sampled_from([1, 8, 0.5])
            config[field] = {key: draw(value) for key in keys}
        config[draw(st.sampled_from(["rank_pattern", "alpha_pattern"]))] = draw(st.sampled_from(
            [config["rank_pattern"], [], "layer.0", None, {"layer.0": "2"}, {"layer.0": None}]))
    typed = ["r", "lora_alpha", "target_modules", "use_rslora", "fan_in_fan_out", "bias", "rank_pattern",
             "alpha_pattern", "peft_type", "use_dora", "layer_replication", "modules_to_save"]
    if mutation == "wrong-type":
        config[draw(st.sampled_from(typed))] = draw(st.sampled_from(_WRONG))
    if mutation == "missing":
        config.pop(draw(st.sampled_from(["r", "lora_alpha", "target_modules", "peft_type", "bias"])))
    if mutation == "unknown-fields":
        for _ in range(draw(st.integers(1, 3))):
            config[draw(st.text("abxyz_", min_size=1, max_size=5))] = draw(st.sampled_from(_WRONG))
    text = json.dumps(config)
    if mutation == "bad-value":
        field = draw(st.sampled_from(["r", "lora_alpha"]))
        text = text.replace(f'"{field}": {json.dumps(config[field])}',
                            f'"{field}": {draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-0.5"]))}')
    if mutation == "deep":
        field = draw(st.sampled_from(typed + ["megatron_config", "notes"]))
        text = text[:-1] + f', "{field}": {_nested(draw(_DEPTHS), objects=draw(st.booleans()))}}}'
    if mutation == "not-json":
        text = text[: draw(st.integers(0, len(text) - 1))]
    if mutation == "not-object":
        text = draw(st.sampled_from(["[]", "1", '"LORA"', "null", f"[{text}]"]))
    return text.encode()


MANIFEST_MUTATIONS = ("none", "drop", "wrong-type", "path", "number", "version", "deep", "duplicate-task", "not-json",
                      "not-object")
# File names a manifest might point anywhere: out of the store, at another task's file, at nothing.
_HOSTILE_PATHS = ("../x.safetensors", "/etc/passwd", "triggers/../../x.safetensors", "", "triggers/..",
                  "private/t0002.safetensors\x00", "a" * 5000, "triggers/t0003-g000004.safetensors",
                  "prototypes/t0002-g000001.safetensors", "unified-g000004.safetensors")
_DEEP = "\x00deep\x00"  # a leaf replaced by deep nesting once the rest is JSON text


def _places(value) -> list[tuple]:
    """Every path (keys and indexes) to a value inside `value`, in a fixed order."""
    out, todo = [], [(value, ())]
    while todo:
        item, path = todo.pop()
        if path:
            out.append(path)
        if isinstance(item, dict):
            todo += [(v, path + (k,)) for k, v in item.items()]
        elif isinstance(item, list):
            todo += [(v, path + (i,)) for i, v in enumerate(item)]
    return sorted(out, key=repr)


def _at(document, path: tuple):
    for step in path[:-1]:
        document = document[step]
    return document


@st.composite
def v1_manifests(
    draw,
    *,
    manifest: Mapping,
    mutation: st.SearchStrategy[str] | str = st.sampled_from(MANIFEST_MUTATIONS),
) -> bytes:
    """A version 1 condu.json (`manifest`, a valid one) as bytes, valid or broken by one of
    MANIFEST_MUTATIONS: a field dropped or of the wrong type, a file name that leaves the store or
    names another task's file, numbers out of range, another version, deep nesting, two tasks of
    one uid, text that is no JSON object."""
    mutation = _draw(draw, mutation)
    document = copy.deepcopy(dict(manifest))
    places = _places(document)
    if mutation == "drop":
        path = draw(st.sampled_from(places))
        container = _at(document, path)
        del container[path[-1]]
    elif mutation == "wrong-type":
        path = draw(st.sampled_from(places))
        _at(document, path)[path[-1]] = draw(st.sampled_from(["1", 1, -1, 1.5, None, True, [], {}, "x" * 300, 2**70]))
    elif mutation == "path":
        named = [p for p in places if isinstance(_at(document, p)[p[-1]], str) and "/" in _at(document, p)[p[-1]]]
        hostile = draw(st.sampled_from(_HOSTILE_PATHS))
        if named and draw(st.booleans()):
            path = draw(st.sampled_from(named))
            _at(document, path)[path[-1]] = hostile
        else:  # a listed file renamed
            files = document["files"]
            old = draw(st.sampled_from(sorted(files)))
            files[hostile] = files.pop(old)
    elif mutation == "number":
        numbers = [p for p in places if type(_at(document, p)[p[-1]]) in (int, float)]
        path = draw(st.sampled_from(numbers))
        _at(document, path)[path[-1]] = draw(st.sampled_from([-1, 0, 2**63, 2**64, 2**70, 1e308, float("nan")]))
    elif mutation == "version":
        field, values = draw(st.sampled_from([("version", [0, 2, 3, "1", None]), ("format", ["condu", None, 1])]))
        document[field] = draw(st.sampled_from(values))
    elif mutation == "deep":
        path = draw(st.sampled_from(places))
        _at(document, path)[path[-1]] = _DEEP
    elif mutation == "duplicate-task" and document.get("tasks"):
        twin = copy.deepcopy(document["tasks"][0])
        twin["name"] = "twin"
        document["tasks"].append(twin)
    text = json.dumps(document)
    if mutation == "deep":
        text = text.replace(json.dumps(_DEEP), _nested(draw(_DEPTHS), objects=draw(st.booleans())))
    if mutation == "not-json":
        text = text[: draw(st.integers(0, len(text) - 1))]
    if mutation == "not-object":
        text = draw(st.sampled_from(["[]", "1", '"condu-store"', "null"]))
    return text.encode()
