"""A PEFT LoRA adapter folder: its adapter_config.json, and what each of its tensors is.

    adapter_config.json          peft_type, r, lora_alpha, target_modules, patterns, variants
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight        (r, in)
                                 base_model.model.<module>.lora_B.weight        (out, r)
                                 base_model.model.<module>.lora_embedding_A     (r, num_embeddings)
                                 base_model.model.<module>.lora_embedding_B     (dim, r)
                                 base_model.model.<module>.<param>              a whole tensor
                                                                                 (modules_to_save, biases)

`factor_config` is the part of a config that fixes what the factors mean (their shapes, their
scaling, the layers they adapt): two adapters can be fused in factor space only if theirs agree.
Keys that say how an adapter was trained or where it came from (dropout, initialisation, the base
model's name, the PEFT version) are left out, and a missing key counts as PEFT's default, so
adapters written by different PEFT versions still compare equal.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from ..errors import InputError
from ..lora import pattern_problem
from .bounded_json import JsonLimits, loads
from .checkpoint import ADAPTER_CONFIG
from .files import read_side_file

__all__ = ["FACTOR_FIELDS", "PREFIX", "MAX_CONFIG_BYTES", "read_adapter_config", "factor_config",
           "config_difference", "dense_refusal", "LoraPair", "split_adapter_tensors"]

# A config is a few kB; per-module rank and alpha patterns of a large model reach a few MB.
MAX_CONFIG_BYTES = 16 * 1024 * 1024
_CONFIG_LIMITS = JsonLimits(depth=8, brackets=1 << 20, commas=1 << 20)  # PEFT's configs nest 3 deep
_FIX = "re-save the adapter with PEFT's save_pretrained"

# PEFT's LoraConfig field types (peft/tuners/lora/config.py); lora_alpha is declared int, and PEFT
# computes with a float as well.
_Rank = Annotated[int, msgspec.Meta(gt=0)]
_Alpha = Annotated[int, msgspec.Meta(ge=0)] | Annotated[float, msgspec.Meta(ge=0.0, le=sys.float_info.max)]
_Names = str | list[str] | None  # a list of module names, or one regular expression


class _PeftFields(msgspec.Struct, kw_only=True):
    """The fields any PEFT config spells this way, when it has them; other fields pass unread."""

    peft_type: str | None = None
    target_modules: _Names = None
    exclude_modules: _Names = None
    modules_to_save: list[str] | None = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: _Names = None


class _LoraFields(_PeftFields, kw_only=True):
    """The fields of a LORA config that fix its factors, typed as PEFT's LoraConfig, with its defaults."""

    r: _Rank = 8
    lora_alpha: _Alpha = 8
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, _Rank] | None = None
    alpha_pattern: dict[str, _Alpha] | None = None
    bias: Literal["none", "all", "lora_only"] = "none"
    use_dora: bool = False
    lora_bias: bool = False
    target_parameters: list[str] | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    layer_replication: list[tuple[int, int]] | None = None
    alora_invocation_tokens: list[int] | None = None
    use_qalora: bool = False
    megatron_config: dict | None = None
    velora_config: dict | None = None
    monteclora_config: dict | None = None
    kasa_config: dict | None = None
    arrow_config: dict | None = None
    use_bdlora: dict | None = None
    ensure_weight_tying: bool = False


# The fields that fix the factors' shapes and meaning, with PEFT's defaults.
FACTOR_FIELDS = {f.name: f.default for f in msgspec.structs.fields(_LoraFields)}
# Variants whose merged weight is not base + scaling * B @ A: a dense store cannot take them.
_NOT_PLAIN = ("use_dora", "lora_bias", "alora_invocation_tokens", "use_qalora", "target_parameters",
              "trainable_token_indices", "layer_replication", "megatron_config", "velora_config",
              "monteclora_config", "kasa_config", "arrow_config", "use_bdlora")
_UNORDERED = ("target_modules", "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern")
PREFIX = "base_model.model."  # PEFT's prefix of every saved tensor name

# What each typed field takes, for the line that refuses it.
_TAKES = {"r": "a positive integer (e.g. 8)", "lora_alpha": "a finite number >= 0 (e.g. 16)",
          "rank_pattern": "an object of module patterns to positive integers",
          "alpha_pattern": "an object of module patterns to numbers >= 0",
          "bias": '"none", "all" or "lora_only"', "layer_replication": "a list of [start, end] pairs",
          "layers_to_transform": "an integer or a list of integers", "peft_type": 'a string such as "LORA"',
          "trainable_token_indices": "a list of token ids, or an object of module names to such lists",
          "alora_invocation_tokens": "a list of token ids"}
_TAKES.update({f: "a list of module names, or one regular expression" for f in
               ("target_modules", "exclude_modules", "layers_pattern")})
_TAKES.update({f: "a list of names" for f in ("modules_to_save", "target_parameters")})
_TAKES.update({f: "true or false (a JSON boolean, not a string)" for f, d in FACTOR_FIELDS.items() if d is False})
_TAKES.update({f: "an object or null" for f, d in FACTOR_FIELDS.items() if f.endswith("_config") or f == "use_bdlora"})


def _shown(value) -> str:
    """A value as JSON, cut short: what a refusal says it got."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _typed(content: dict, path: Path) -> dict:
    """The fields fusion reads, typed (PEFT's LoraConfig for LORA configs) with defaults filled in."""
    schema = _LoraFields if content.get("peft_type") == "LORA" else _PeftFields
    try:
        fields = msgspec.structs.asdict(msgspec.convert(content, schema))
    except msgspec.ValidationError as err:
        found = re.search(r"at `\$\.(\w+)", str(err))
        field = found.group(1) if found else "a field"
        detail = str(err).split(" - at `")[0].replace("Expected", "expected")
        raise InputError(f"{path}: {field} is {_shown(content.get(field))} ({detail}); PEFT's config takes "
                         f"{_TAKES.get(field, 'another type')} there: fix it, or {_FIX}") from None
    if schema is _PeftFields:  # another PEFT type: its other fields are compared as they are
        return {**{f: content.get(f, d) for f, d in FACTOR_FIELDS.items()}, **fields}
    if fields["target_modules"] is None and not fields["target_parameters"]:
        raise InputError(f"{path}: target_modules is {_shown(content.get('target_modules'))}, but PEFT saves a "
                         "LoRA adapter with the modules it adapts (null only beside target_parameters); list them, "
                         f'e.g. ["q_proj", "v_proj"], or {_FIX}')
    for field in ("rank_pattern", "alpha_pattern"):
        problem = pattern_problem(list(fields[field] or ()))
        if problem:
            raise InputError(f"{path}: {field} {problem}")
    return fields


def read_adapter_config(folder: str | os.PathLike) -> dict:
    """The fields of adapter_config.json that fusion reads (FACTOR_FIELDS), typed; one line if not readable.

    The file is read within bounds (MAX_CONFIG_BYTES, and the JSON's depth and counts) and its
    fields typed as PEFT types them; fields fusion does not read are allowed, whatever they hold."""
    path = Path(folder) / ADAPTER_CONFIG
    try:
        data = read_side_file(path, limit=MAX_CONFIG_BYTES).data  # a link out, a FIFO, a huge file: refused
    except OSError as err:
        raise InputError(f"{path}: not a readable adapter config ({err.strerror}); {_FIX}") from None
    content = loads(data, _CONFIG_LIMITS, where=str(path), what="adapter config", fix=_FIX)
    if not isinstance(content, dict):
        raise InputError(f"{path}: not a JSON object; {_FIX}")
    return _typed(content, path)


def _normal(field: str, value):
    """One spelling per meaning: empty containers as None, unordered lists sorted and unique."""
    if value in ([], {}, ""):
        value = None
    if field in _UNORDERED:
        if isinstance(value, (int, str)) and field == "layers_to_transform":
            value = [value]
        if isinstance(value, list):
            value = sorted(set(map(str, value))) if field != "layers_to_transform" else sorted(set(value))
    return value


def factor_config(config: dict) -> dict:
    """The fields of FACTOR_FIELDS, defaults filled in and spelled one way (JSON-able)."""
    return {field: _normal(field, config.get(field, default)) for field, default in FACTOR_FIELDS.items()}


def config_difference(expected: dict, found: dict) -> tuple[str, object, object] | None:
    """The first factor field where two factor_config()s differ: (field, expected, found)."""
    for field in FACTOR_FIELDS:
        if expected.get(field) != found.get(field):
            return field, expected.get(field), found.get(field)
    return None


def dense_refusal(config: dict) -> str | None:
    """Why an adapter cannot count as base + scaling * B @ A (one phrase), or None."""
    if config.get("peft_type") != "LORA":
        return f"peft_type is {config.get('peft_type')!r}, and only LORA adapters are read"
    for field in _NOT_PLAIN:
        if config.get(field) not in (None, False, [], {}, ""):
            return f"{field} is set ({config[field]!r}), a LoRA variant whose weights are not base + scaling * B @ A"
    return None


@dataclass(frozen=True)
class LoraPair:
    """The two factors of one adapted module (tensor names in the adapter file)."""

    module: str  # the module's dotted name in the model PEFT wrapped
    a: str
    b: str
    embedding: bool  # lora_embedding_A/B: the delta is (B @ A).T


_FACTOR_SUFFIXES = {".lora_A.weight": ("a", False), ".lora_B.weight": ("b", False),
                    ".lora_embedding_A": ("a", True), ".lora_embedding_B": ("b", True)}


def _factor_role(name: str) -> tuple[str, str, bool] | None:
    """(module, "a" or "b", embedding) for a factor's tensor name, else None."""
    for suffix, (role, embedding) in _FACTOR_SUFFIXES.items():
        if name.endswith(suffix):
            return name[len(PREFIX) : -len(suffix)], role, embedding
    return None


def split_adapter_tensors(names: list[str], where: str) -> tuple[list[LoraPair], dict[str, str]]:
    """The adapter's LoRA pairs, and its whole tensors as {name in the model: name in the file}.

    Refuses, in one line naming the tensor, what is neither: DoRA magnitudes, LoRA biases, a
    factor without its partner, names without PEFT's prefix."""
    halves: dict[tuple[str, bool], dict[str, str]] = {}
    whole: dict[str, str] = {}
    for name in names:
        if not name.startswith(PREFIX):
            raise InputError(f"{where}: tensor {name!r} is not named as PEFT names adapter tensors ({PREFIX}...); "
                             "save the adapter with PEFT's save_pretrained")
        role = _factor_role(name)
        if role is not None:
            module, ab, embedding = role
            halves.setdefault((module, embedding), {})[ab] = name
        elif ".lora_" in name:
            raise InputError(f"{where}: tensor {name!r} is a LoRA part that is not an A or B factor (DoRA magnitude, "
                             "LoRA bias, ...); a dense store takes plain LoRA only")
        else:
            whole[name[len(PREFIX):]] = name
    pairs = []
    for (module, embedding), found in sorted(halves.items()):
        if set(found) != {"a", "b"}:
            missing = "B" if "a" in found else "A"
            raise InputError(f"{where}: module {module!r} has no LoRA {missing} factor; re-save the adapter")
        pairs.append(LoraPair(module, found["a"], found["b"], embedding))
    return pairs, whole
