"""A tiny random CLIP (word-level tokenizer, 16-pixel images) and three tiny image-folder tasks."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

WORDS = ("a photo of the an image showing with color stripes brightness red green blue horizontal vertical "
         "dark bright pattern texture number").split()

# name -> class names; each image is drawn by `draw(task, label, rng)`
TASKS = {
    "colors": ["red", "green", "blue"],
    "stripes": ["horizontal", "vertical"],
    "light": ["dark", "bright"],
}
TEMPLATES = ["a photo of {}.", "an image of the {} pattern."]
SIDE = 16


def build_tiny_clip(folder: Path, *, seed: int = 0) -> Path:
    """Save a randomly initialized CLIPModel, its tokenizer and image processor to `folder`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<unk>", "<eos>"]  # eos id 3: not the legacy eos id 2 path
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                       special_tokens=[("<bos>", 1), ("<eos>", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", unk_token="<unk>", model_max_length=16)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=1,
                         eos_token_id=3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=SIDE, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE}).save_pretrained(folder)
    return folder


def draw(task: str, label: int, rng: random.Random):
    """A 16x16 RGB image of class `label` of `task`, with noise."""
    from PIL import Image

    noise = np.array([[rng.randint(0, 40) for _ in range(SIDE)] for _ in range(SIDE)])[..., None]
    if task == "colors":
        pixels = np.zeros((SIDE, SIDE, 3)) + 20
        pixels[..., label] = 200
    elif task == "stripes":
        line = (np.arange(SIDE) // 2 % 2 * 200)[:, None] * np.ones((1, SIDE))
        pixels = np.repeat((line if label == 0 else line.T)[..., None], 3, axis=2)
    else:
        pixels = np.full((SIDE, SIDE, 3), 40.0 if label == 0 else 210.0)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))


def write_task_folder(root: Path, task: str, *, n_train: int = 8, n_test: int = 5, n_val: int = 0,
                      seed: int = 0) -> Path:
    """root/task/{train,test}/<class>/NN.png, and root/task/val/... when n_val > 0 (drawn last, so
    train and test do not depend on it)"""
    rng = random.Random(f"{task}-{seed}")
    for split, n in (("train", n_train), ("test", n_test), ("val", n_val)):
        if not n:
            continue
        for label, name in enumerate(TASKS[task]):
            folder = root / task / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                draw(task, label, rng).save(folder / f"{k:02d}.png")
    return root / task


def tiny_config_dict(data_root: Path, model: Path, methods=None, iterations: int = 6) -> dict:
    return {
        "model": str(model),
        "device": "cpu",
        "fusion_kernel": "reference",
        "data_root": str(data_root),
        "tasks": [{"name": t, "class_names": names, "templates": TEMPLATES, "source": {"kind": "folder", "path": t}}
                  for t, names in TASKS.items()],
        "training": {"iterations": iterations, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "seed": 0},
        "evaluation": {"batch_size": 16, "top_k": 2, "cache_size": 2},
        "methods": methods or [
            "zero_shot", "sequential", {"kind": "task_arithmetic", "alpha": 0.5}, {"kind": "magmax", "scale": 0.8},
            "individual", {"kind": "condu", "rescaler": "model"}, {"kind": "condu", "rescaler": "tensor"},
            {"kind": "condu", "rescaler": "model", "agnostic": True},
            {"kind": "condu", "rescaler": "model", "agnostic": True, "aggregate": "weighted",
             "name": "condu-weighted"},
        ],
    }


