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
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import ADAPTER_CONFIG

__all__ = ["FACTOR_FIELDS", "PREFIX", "read_adapter_config", "factor_config", "config_difference",
           "dense_refusal", "LoraPair", "split_adapter_tensors"]

# The fields that fix the factors' shapes and meaning, with PEFT's defaults.
FACTOR_FIELDS = {
    "peft_type": None, "r": 8, "lora_alpha": 8, "use_rslora": False, "fan_in_fan_out": False,
    "target_modules": None, "exclude_modules": None, "rank_pattern": None, "alpha_pattern": None,
    "layers_to_transform": None, "layers_pattern": None, "modules_to_save": None, "bias": "none",
    "use_dora": False, "lora_bias": False, "target_parameters": None, "trainable_token_indices": None,
    "layer_replication": None, "alora_invocation_tokens": None, "use_qalora": False, "megatron_config": None,
    "velora_config": None, "monteclora_config": None, "kasa_config": None, "arrow_config": None,
    "use_bdlora": None, "ensure_weight_tying": False,
}
# Variants whose merged weight is not base + scaling * B @ A: a dense store cannot take them.
_NOT_PLAIN = ("use_dora", "lora_bias", "alora_invocation_tokens", "use_qalora", "target_parameters",
              "trainable_token_indices", "layer_replication", "megatron_config", "velora_config",
              "monteclora_config", "kasa_config", "arrow_config", "use_bdlora")
_UNORDERED = ("target_modules", "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern")
PREFIX = "base_model.model."  # PEFT's prefix of every saved tensor name


def read_adapter_config(folder: str | os.PathLike) -> dict:
    """adapter_config.json of an adapter folder, as a dict; one line if it is not readable."""
    path = Path(folder) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path}: not a readable adapter config ({err.__class__.__name__}); re-save the adapter "
                         "with PEFT's save_pretrained") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object; re-save the adapter with PEFT's save_pretrained")
    return config


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
            raise ValueError(f"{where}: tensor {name!r} is not named as PEFT names adapter tensors ({PREFIX}...); "
                             "save the adapter with PEFT's save_pretrained")
        role = _factor_role(name)
        if role is not None:
            module, ab, embedding = role
            halves.setdefault((module, embedding), {})[ab] = name
        elif ".lora_" in name:
            raise ValueError(f"{where}: tensor {name!r} is a LoRA part that is not an A or B factor (DoRA magnitude, "
                             "LoRA bias, ...); a dense store takes plain LoRA only")
        else:
            whole[name[len(PREFIX):]] = name
    pairs = []
    for (module, embedding), found in sorted(halves.items()):
        if set(found) != {"a", "b"}:
            missing = "B" if "a" in found else "A"
            raise ValueError(f"{where}: module {module!r} has no LoRA {missing} factor; re-save the adapter")
        pairs.append(LoraPair(module, found["a"], found["b"], embedding))
    return pairs, whole
