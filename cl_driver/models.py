"""CLIP from a local folder or a hub id, its features, and zero-shot text classifiers.

    clip = load_clip("openai/clip-vit-base-patch16")        # or a local folder
    weights = text_classifier(clip, ["cat", "dog"], ["a photo of a {}."])   # (C, D)
    logits = clip_logits(clip.model, image_features(clip.model, pixels), weights)  # (B, C)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F


@dataclass
class Clip:
    """A CLIP model with the tokenizer and image processor it was saved with."""

    model: "torch.nn.Module"
    tokenizer: object
    processor: object
    source: str
    resolved: object = None  # fusion.hub.ResolvedCheckpoint: the folder, and the hub id and commit if any

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_text_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA when there is one."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_clip(name_or_path: str | os.PathLike, *, device: str | torch.device = "cpu") -> Clip:
    """Load CLIPModel, tokenizer and image processor from a local folder or a hub id
    (org/name[@revision], resolved by fusion.hub: one line on any error)."""
    from fusion import hub
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    resolved = hub.resolve_checkpoint(name_or_path)
    folder = str(resolved.path)
    try:
        model = CLIPModel.from_pretrained(folder).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        processor = AutoImageProcessor.from_pretrained(folder)
    except OSError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{name_or_path}: not a CLIP folder that transformers loads ({reason}); give a CLIP "
                         "model folder or hub id") from None
    clip = Clip(model, tokenizer, processor, str(name_or_path), resolved)
    # what the fine-tunes and adapters saved from it record as their base
    model.config._name_or_path = model.name_or_path = base_reference(clip)
    return clip


def base_folder(clip: Clip) -> Path:
    """The local folder theta0 was loaded from (a hub id's cached snapshot)."""
    return Path(clip.resolved.path if clip.resolved else clip.source)


def base_reference(clip: Clip) -> str:
    """theta0 as a record of it names it: its hub id, or its folder's absolute path."""
    if clip.resolved is not None and clip.resolved.from_hub:
        return clip.resolved.hub_id
    return str(base_folder(clip).resolve())


def describe_model(clip: Clip) -> dict:
    """Where theta0 came from: the argument, its folder, and its hub id, revision and commit if any."""
    resolved = clip.resolved
    return {"source": clip.source, "path": str(resolved.path) if resolved else clip.source,
            "hub_id": getattr(resolved, "hub_id", None), "revision": getattr(resolved, "revision", None),
            "commit": getattr(resolved, "commit", None)}


def image_size(processor) -> int:
    """The side of the square crop the processor makes (CLIP's default is 224)."""
    crop = getattr(processor, "crop_size", None)
    size = crop.get("height") if isinstance(crop, dict) else getattr(crop, "height", None)  # dict or SizeDict
    return int(size or 224)


def _pooled(output) -> torch.Tensor:
    # transformers 5 returns BaseModelOutputWithPooling; older versions a tensor
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def image_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) pixels -> (B, D) unit-norm image embeddings."""
    return F.normalize(_pooled(model.get_image_features(pixel_values=pixels)).float(), dim=-1)


def text_features(clip: Clip, texts: Sequence[str], *, batch_size: int = 256) -> torch.Tensor:
    """(N,) strings -> (N, D) unit-norm text embeddings (gradients flow if enabled)."""
    chunks = []
    for start in range(0, len(texts), batch_size):
        tokens = clip.tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                                max_length=clip.max_text_length, return_tensors="pt")
        tokens = {k: v.to(clip.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        chunks.append(_pooled(clip.model.get_text_features(**tokens)).float())
    return F.normalize(torch.cat(chunks), dim=-1)


def class_prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """C x P prompts, class-major: [t.format(c) for c in classes for t in templates]."""
    return [template.format(name) for name in class_names for template in templates]


def template_features(clip: Clip, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(C, P, D) unit-norm text embeddings of every class under every template."""
    feats = text_features(clip, class_prompts(class_names, templates))  # (C*P, D)
    return feats.reshape(len(class_names), len(templates), -1)


@torch.no_grad()
def text_classifier(clip: Clip, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(C, D) zero-shot weights: per class, the normalized mean of its normalized prompt embeddings."""
    return F.normalize(template_features(clip, class_names, templates).mean(dim=1), dim=-1)


def clip_logits(model, image_feats: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """logit_scale * cosine: (B, D) x (C, D) -> (B, C), with CLIP's own learned scale."""
    return model.logit_scale.exp().float() * image_feats @ classifier.to(image_feats.device).T


def state_dict_cpu(model) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the model's weights (safe to save, compare or reload)."""
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in model.state_dict().items()}


def load_weights(model, state: dict[str, torch.Tensor]) -> None:
    """Put a full state dict into the model in place (every tensor must be there)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
