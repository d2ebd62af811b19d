"""PEFT LoRA adapters in a store: the base decides the space, and what an adapter contributes in it.

    factor space   the base is an adapter: the shared initialisation of every task's adapter (the
                   official LoRA variant). Every task is an adapter with the base adapter's
                   configuration and tensors; its factor deltas are fused like any tensors, and a
                   decoupled task is an adapter folder again.
    dense          the base is a model. A full fine-tune counts as ever; an adapter, of any rank or
                   initialisation, counts as scaling * B @ A on its target weights, a whole tensor
                   it saved (modules_to_save) minus the base's, and zero elsewhere. A decoupled
                   task is a full model folder.

Everything is checked here, before a pass writes anything, so a refused adapter changes nothing.
"""

from __future__ import annotations

from typing import Mapping

from ..errors import InputError
from ..io import Checkpoint
from ..io.adapter import (LoraPair, config_difference, dense_refusal, factor_config, read_adapter_config,
                          split_adapter_tensors)
from ..io.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from ..lora import lora_scaling, pattern_value
from . import layout
from .manifest import HubRef
from .plan import FusedTensor, NewTask, plan_task
from .sources import AdapterDeltas, LoraTarget

__all__ = ["SPACES", "space_of", "base_adapter_config", "plan_input", "dense_adapter_deltas"]

SPACES = ("dense", "factors")


def space_of(base: Checkpoint) -> str:
    return "factors" if base.is_adapter else "dense"


def base_adapter_config(base: Checkpoint) -> dict | None:
    """The base adapter's factor configuration (what every task must share), or None for a model."""
    return factor_config(read_adapter_config(base.path)) if base.is_adapter else None


def plan_input(ckpt: Checkpoint, base: Checkpoint, fused: list[FusedTensor], *, space: str,
               base_config: dict | None, name: str, number: int, missing: str, source: str,
               hub: HubRef | None = None) -> NewTask:
    """What a new checkpoint contributes to a store of `space`; refuses what does not belong."""
    if space == "factors":
        _check_factor_task(ckpt, base, base_config)
        task = plan_task(ckpt, base, fused, name=name, number=number, missing="error", source=source)
        task.kind = "adapter"
    elif ckpt.is_adapter:
        deltas, zero = dense_adapter_deltas(ckpt, fused)
        task = NewTask(ckpt, layout.check_task_name(name), number, source, deltas, zero=zero, kind="adapter")
    else:
        task = plan_task(ckpt, base, fused, name=name, number=number, missing=missing, source=source)
    task.hub = hub
    return task


# ---- factor space ---------------------------------------------------------------------------


def _check_factor_task(ckpt: Checkpoint, base: Checkpoint, base_config: dict) -> None:
    """The same configuration as the base adapter, and exactly its tensors in its shapes."""
    if not ckpt.is_adapter:
        raise InputError(f"{ckpt.path}: not a PEFT adapter folder ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}), but the "
                         "store's base is an adapter (factor space); add adapters trained from that base adapter, or "
                         "make a dense store with the model as --base")
    difference = config_difference(base_config, factor_config(read_adapter_config(ckpt.path)))
    if difference is not None:
        field, expected, found = difference
        raise InputError(f"{ckpt.path / ADAPTER_CONFIG}: {field} is {found!r}, the base adapter's is {expected!r}; a "
                         "factor-space store fuses adapters of the base adapter's configuration only (train it from "
                         "the base adapter, or make a dense store with the model as --base)")
    where = ckpt.path / ADAPTER_WEIGHTS
    for name in base.keys():
        if name not in ckpt:
            raise InputError(f"{where}: lacks tensor {name!r} of the base adapter; it is not an adapter of the same "
                             "layers: re-save it, or check --base")
        if ckpt.info(name).shape != base.info(name).shape:
            raise InputError(f"{where}: tensor {name!r} is {list(ckpt.info(name).shape)}, "
                             f"{list(base.info(name).shape)} in the base adapter; it adapts another model: check --base")
    extra = [n for n in ckpt.keys() if n not in base]
    if extra:
        raise InputError(f"{where}: tensor {extra[0]!r} is not in the base adapter; it adapts other layers: check --base")


# ---- dense ----------------------------------------------------------------------------------


def _base_name(model_name: str, fused: Mapping[str, FusedTensor]) -> str | None:
    """The base tensor a name in the adapted model stands for. The same name, or the same name
    but for one leading module, unique: an adapter trained on a model with a task head (`bert.`)
    applied to the bare model's folder, or the reverse."""
    if model_name in fused:
        return model_name
    stripped = model_name.partition(".")[2]
    depth = model_name.count(".") + 1
    found = [stripped] if stripped in fused else []
    found += [n for n in fused if n.endswith("." + model_name) and n.count(".") == depth]
    return found[0] if len(found) == 1 else None


def _orientation(pair: LoraPair, rows_cols: tuple[int, int], a_shape, b_shape, fan_in_fan_out: bool) -> bool | None:
    """Whether the weight holds (B @ A).T (True) or B @ A (False); None if neither fits its shape.
    Embeddings are always transposed; a linear weight by its shape, and a square one by
    fan_in_fan_out, as PEFT decides per layer (Conv1D is (in, out))."""
    plain = rows_cols == (b_shape[0], a_shape[1])
    flipped = rows_cols == (a_shape[1], b_shape[0])
    if pair.embedding:
        return True if flipped else None
    if plain and flipped:
        return fan_in_fan_out
    return flipped if plain or flipped else None


def _lora_target(pair: LoraPair, adapter: Checkpoint, fused: Mapping[str, FusedTensor], config: dict,
                 where: str) -> tuple[str, LoraTarget]:
    a_shape, b_shape = adapter.info(pair.a).shape, adapter.info(pair.b).shape
    if len(a_shape) != 2 or len(b_shape) != 2:
        raise InputError(f"{where}: module {pair.module!r} has {len(a_shape)}-D LoRA factors (a convolution); a dense "
                         "store takes linear and embedding LoRA only")
    rank = a_shape[0]
    if b_shape[1] != rank:
        raise InputError(f"{where}: module {pair.module!r} has factors of ranks {rank} (A) and {b_shape[1]} (B); "
                         "re-save the adapter")
    stated = pattern_value(config.get("rank_pattern"), pair.module, config.get("r", 8))
    if stated != rank:
        raise InputError(f"{where}: module {pair.module!r} has rank {rank}, but {ADAPTER_CONFIG} says {stated}; "
                         "re-save the adapter with the config it was trained with")
    name = _base_name(f"{pair.module}.weight", fused)
    if name is None:
        raise InputError(f"{where}: adapts module {pair.module!r}, but the base has no tensor "
                         f"{pair.module + '.weight'!r}; pass the model it was trained on as --base")
    shape = fused[name].shape
    transpose = _orientation(pair, tuple(shape), a_shape, b_shape, bool(config.get("fan_in_fan_out")))
    if len(shape) != 2 or transpose is None:
        raise InputError(f"{where}: module {pair.module!r} has factors {list(a_shape)} (A) and {list(b_shape)} (B), "
                         f"which do not fit the base's {name!r} {list(shape)}; pass the model it was trained on as --base")
    alpha = pattern_value(config.get("alpha_pattern"), pair.module, config.get("lora_alpha", 8))
    scaling = lora_scaling(alpha, rank, rslora=bool(config.get("use_rslora")))
    return name, LoraTarget(pair.a, pair.b, scaling, transpose)


def _whole_tensor(model_name: str, file_name: str, adapter: Checkpoint, fused: Mapping[str, FusedTensor],
                  where: str) -> str:
    """A tensor the adapter saved whole (modules_to_save, a trained bias): the base tensor it replaces."""
    name = _base_name(model_name, fused)
    if name is None or tuple(fused[name].shape) != tuple(adapter.info(file_name).shape):
        raise InputError(f"{where}: tensor {file_name!r} replaces no floating-point tensor of the base in its shape "
                         f"{list(adapter.info(file_name).shape)}; pass the model it was trained on as --base")
    if not adapter.info(file_name).dtype.is_float:
        raise InputError(f"{where}: tensor {file_name!r} is {adapter.info(file_name).dtype.name}; it does not "
                         "fine-tune this base")
    return name


def dense_adapter_deltas(adapter: Checkpoint, fused: list[FusedTensor]) -> tuple[AdapterDeltas, set[str]]:
    """The adapter as a DeltaSource over the base's fused tensors, and the fused tensors it leaves unchanged."""
    config = read_adapter_config(adapter.path)
    refusal = dense_refusal(config)
    if refusal:
        raise InputError(f"{adapter.path / ADAPTER_CONFIG}: {refusal}; a dense store cannot take it (fuse such "
                         "adapters in factor space: --base <their shared initial adapter>)")
    where = str(adapter.path / ADAPTER_WEIGHTS)
    by_name = {t.name: t for t in fused}
    pairs, whole = split_adapter_tensors(adapter.keys(), where)
    targets = dict(_lora_target(pair, adapter, by_name, config, where) for pair in pairs)
    replaced = {_whole_tensor(model_name, file_name, adapter, by_name, where): file_name
                for model_name, file_name in whole.items()}
    covered = [*targets, *replaced]
    if len(set(covered)) != len(covered):
        twice = next(n for n in covered if covered.count(n) > 1)
        raise InputError(f"{where}: changes the base's tensor {twice!r} twice; re-save the adapter")
    if not covered:
        raise InputError(f"{where}: holds no LoRA factors or tensors of the base; it does not adapt this base")
    return AdapterDeltas(adapter, targets, replaced), {t.name for t in fused} - set(covered)

