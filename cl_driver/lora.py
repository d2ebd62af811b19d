"""LoRA on CLIP as the official ConDU LoRA variant has it, through PEFT.

- LoRA on the MLP linears of every residual block of both towers (`mlp.fc1`, `mlp.fc2` in
  Hugging Face CLIP), rank 64 by default, scaling 1/sqrt(rank) (PEFT's rsLoRA with alpha 1).
- Both factors start random and small, N(0, init_std^2), drawn once with the run's seed: that
  initial adapter is part of the pre-trained state, and every task starts from it.
- Only the LoRA factors train. A task's result is a PEFT adapter folder (`adapter_config.json`
  and `adapter_model.safetensors`) that `PeftModel.from_pretrained` loads; ConDU fuses the factor
  deltas against the initial adapter.

For evaluation an adapter becomes plain CLIP weights, W + scaling * B @ A on each target.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from . import checkpoints

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MLP_LINEARS = r"(text|vision)_model\.encoder\.layers\.\d+\.mlp\.fc[12]"  # PEFT matches it in full
_PREFIX = "base_model.model."  # PEFT's key prefix in adapter files


def lora_config(rank: int):
    """PEFT's LoraConfig of the official variant: MLP linears, scaling alpha / sqrt(r) = 1 / sqrt(r)."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=1, use_rslora=True, target_modules=MLP_LINEARS, lora_dropout=0.0,
                      bias="none")


def is_adapter(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file() and (Path(path) / ADAPTER_WEIGHTS).is_file()


def save_adapter(peft_model, out: str | os.PathLike, *, base: str, description: str) -> Path:
    """Write the adapter folder under a temporary name, then rename it into place. Its
    adapter_config.json and model card name `base`, the CLIP model it adapts."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.active_peft_config.base_model_name_or_path = base
    peft_model.save_pretrained(str(tmp))
    checkpoints.adapter_card(tmp, out.name, base, description)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


@torch.no_grad()
def init_factors(peft_model, std: float, seed: int) -> None:
    """Every LoRA factor from N(0, std^2), one seeded generator in parameter order."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def write_initial_adapter(model, rank: int, std: float, seed: int, out: str | os.PathLike, *, base: str) -> Path:
    """The shared initial adapter of every task, written to `out` (the model is left as it was)."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(rank))
    try:
        init_factors(peft_model, std, seed)
        return save_adapter(peft_model, out, base=base,
                            description="The LoRA adapter every task of a `condu-cl` run starts from (random "
                                        "factors drawn with the run's seed): the base of its ConDU stores.")
    finally:
        peft_model.unload()


@contextmanager
def attached(model, adapter: str | os.PathLike, *, trainable: bool):
    """The model with the adapter's LoRA layers in it (only they train); removed on exit."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
    try:
        yield peft_model
    finally:
        peft_model.unload()


def adapter_scaling(adapter: str | os.PathLike) -> float:
    """The factor PEFT puts on B @ A, from the adapter's own config."""
    config = json.loads((Path(adapter) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{adapter}: per-layer ranks or alphas are not supported; use one rank and alpha")
    rank, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def merge_factors(dense: dict[str, torch.Tensor], factors: dict[str, torch.Tensor],
                  scaling: float) -> dict[str, torch.Tensor]:
    """Plain CLIP weights: W + scaling * B @ A on every target of the adapter's (A, B) pairs."""
    merged = dict(dense)
    for key, a in factors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len(_PREFIX):-len(".lora_A.weight")]
        b = factors[f"{_PREFIX}{module}.lora_B.weight"]  # (out, r) @ (r, in) -> (out, in)
        weight = dense[f"{module}.weight"]
        merged[f"{module}.weight"] = (weight.float() + scaling * (b.float() @ a.float())).to(weight.dtype)
    return merged
