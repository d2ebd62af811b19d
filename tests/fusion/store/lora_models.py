"""Real PEFT LoRA adapters on a tiny GPT-2, on disk, and the references the store is checked against.

The model is a 2-layer GPT-2 of width 16: its attention and MLP weights are Conv1D, stored
(in, out), so its adapters use fan_in_fan_out; `wte` is an embedding, adapted with
lora_embedding_A/B; `c_proj` is square, so only the config tells its orientation. Factor values
are small integers times a power of two, and scalings are powers of two, so every delta and
every product B @ A is exact in float32: the store and the references agree bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.numpy import load_file
from transformers import GPT2Config, GPT2Model

TARGETS = ["c_attn", "c_proj", "c_fc", "wte"]
PREFIX = "base_model.model."


def tiny_gpt2(folder: Path, *, seed: int = 0) -> Path:
    """A tiny GPT-2 model folder (config.json, model.safetensors)."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0,
                        eos_token_id=0)
    GPT2Model(config).save_pretrained(folder)
    return folder


def _dyadic(rng, shape, scale: float, zero_fraction: float = 0.0) -> torch.Tensor:
    values = rng.integers(-8, 9, shape) * scale
    values = np.where(rng.random(shape) < zero_fraction, 0.0, values)
    return torch.from_numpy(values.astype(np.float32))


def peft_model(base: Path, **config):
    """PEFT's LoRA model on the tiny GPT-2 (its base recorded as the folder's path)."""
    options = dict(r=4, lora_alpha=8, target_modules=TARGETS, fan_in_fan_out=True)
    options.update(config)
    return get_peft_model(GPT2Model.from_pretrained(str(base)), LoraConfig(**options))


def save_adapter(model, folder: Path, *, init_seed: int, task_seed: int | None = None) -> Path:
    """Set every LoRA factor to the shared initialisation of `init_seed`, plus (for a task) a sparse
    delta of `task_seed`, and save the adapter folder."""
    init, task = np.random.default_rng(init_seed), np.random.default_rng(1000 + (task_seed or 0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                value = _dyadic(init, tuple(param.shape), 2.0**-3)
                if task_seed is not None:
                    value += _dyadic(task, tuple(param.shape), 2.0**-6, zero_fraction=0.3)
                param.copy_(value)
    model.save_pretrained(folder)
    return folder


def adapter(base: Path, folder: Path, *, init_seed: int = 0, task_seed: int | None = None, **config) -> Path:
    return save_adapter(peft_model(base, **config), folder, init_seed=init_seed, task_seed=task_seed)


def factors(folder: Path) -> dict[str, np.ndarray]:
    return load_file(folder / "adapter_model.safetensors")


def model_weights(folder: Path) -> dict[str, np.ndarray]:
    return load_file(folder / "model.safetensors")


def peft_layers(base: Path, folder: Path) -> dict[str, object]:
    """{module name in the base model: its LoRA layer} as PEFT builds them when it loads the adapter."""
    model = PeftModel.from_pretrained(GPT2Model.from_pretrained(str(base)), str(folder))
    return {name[len(PREFIX):]: module for name, module in model.named_modules()
            if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling}


def torch_dense_delta(folder: Path, base: Path) -> dict[str, np.ndarray]:
    """Each target weight's delta as PEFT computes it in torch to merge: transpose(B @ A) * scaling
    (LoraLayer.get_delta_weight), keyed by the base model's tensor names."""
    with torch.no_grad():
        return {f"{module}.weight": layer.get_delta_weight("default").numpy()
                for module, layer in peft_layers(base, folder).items()}


def record_base(folder: Path, base: str) -> None:
    """Make an adapter (or a model folder) record `base` as the model it was trained from."""
    name, key = ("adapter_config.json", "base_model_name_or_path") if (folder / "adapter_config.json").exists() \
        else ("config.json", "_name_or_path")
    config = json.loads((folder / name).read_text())
    config[key] = base
    (folder / name).write_text(json.dumps(config))


def outputs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state
