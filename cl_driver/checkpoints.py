"""Fine-tunes on disk as the ecosystem writes them, so other tools find their base and load them.

    NN-task/                    a whole-model fine-tune: `CLIPModel.from_pretrained` loads it
        model.safetensors
        config.json             the base's, with `_name_or_path` (the base) and the weights' dtype
        preprocessor_config.json, tokenizer.json, ...   the base's processor and tokenizer files
        README.md               model card; its front matter says `base_model: <theta0>`
    NN-task/ (LoRA runs)        PEFT's adapter folder: adapter_config.json names the base too

The base is theta0 as people name it: its hub id, or the absolute path of its folder. With it
recorded, `condu-fuse unify ckpt_a ckpt_b` needs no --base, and the store keeps each task's
config, tokenizer and processor files, so a decoupled expert loads with `from_pretrained`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save

from fusion import atomic_write

MODEL_WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
# The base folder's tokenizer and processor files that a copy of the model needs to load.
BASE_FILES = ("preprocessor_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt")
# Hub ids and absolute paths as plain YAML scalars: a slash, and no character YAML reads specially.
_PLAIN = re.compile(r"[\w./@+][\w./~@+ -]*(?<! )")


def yaml_scalar(value: str) -> str:
    """`value` as a YAML scalar: plain when it is a plain id or path, else quoted."""
    if "/" in value and _PLAIN.fullmatch(value):
        return value
    return f"'{value}'" if "'" not in value else json.dumps(value, ensure_ascii=False)


def model_card(title: str, base: str, description: str, *, library: str = "transformers") -> str:
    """A model card whose front matter names the base, in the hub's convention."""
    return (f"---\nbase_model: {yaml_scalar(base)}\nlibrary_name: {library}\ntags:\n- condu\n---\n\n"
            f"# {title}\n\n{description}\n")


def config_naming_base(config: dict, base: str, weights: dict[str, torch.Tensor]) -> dict:
    """The base's config.json content, recording the base and the dtype the weights were written in."""
    dtype = next((t.dtype for t in weights.values() if t.is_floating_point()), None)
    config = {**config, "_name_or_path": base}
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
        if "torch_dtype" in config:
            config["torch_dtype"] = config["dtype"]
    return config


def base_files(base_folder: Path) -> dict[str, bytes]:
    """The base's tokenizer and processor files that exist, by name."""
    return {name: (base_folder / name).read_bytes() for name in BASE_FILES if (base_folder / name).is_file()}


def weights_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """A state dict as a safetensors file's bytes, as torch's save_file writes it."""
    return save({k: v.contiguous() for k, v in state.items()}, metadata={"format": "pt"})


def save_weights(state: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """A state dict as a safetensors file, written atomically."""
    return atomic_write(path, weights_bytes(state))


def save_model_folder(state: dict[str, torch.Tensor], out: str | os.PathLike, *, base_folder: str | os.PathLike,
                      base: str, task: str) -> Path:
    """A model folder of `state` that `from_pretrained` loads and that names its base, written whole
    (fusion.atomic_write), so a folder that exists is complete."""
    out, base_folder = Path(out), Path(base_folder)
    config_file = base_folder / CONFIG
    if not config_file.is_file():
        raise ValueError(f"{base_folder}: no {CONFIG}; theta0 must be a model folder that transformers loads")
    config = config_naming_base(json.loads(config_file.read_text(encoding="utf-8")), base, state)
    description = (f"CLIP fine-tuned by `condu-cl` on the task `{task}`. Its delta is taken against the base "
                   "above (theta0); `CLIPModel.from_pretrained` and `CLIPProcessor.from_pretrained` load this folder.")
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(out, {MODEL_WEIGHTS: weights_bytes(state), CONFIG: json.dumps(config, indent=2) + "\n",
                              **base_files(base_folder), CARD: model_card(out.name, base, description)})


def adapter_card(folder: str | os.PathLike, title: str, base: str, description: str) -> Path:
    """Replace the card PEFT writes into an adapter folder with one whose front matter names the base."""
    path = Path(folder) / CARD
    path.write_text(model_card(title, base, description, library="peft"), encoding="utf-8")
    return path
