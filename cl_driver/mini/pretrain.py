"""Pre-train the mini CLIP contrastively on generated image-caption pairs, then save it (weights,
config, tokenizer, image processor) and record its figures.

    python -m cl_driver.mini.pretrain --out cl_driver/assets/mini-clip --seed 0 --steps 5000 --max-minutes 82

Reproducible from the seed: the model initialisation, every batch of pairs (`captions.make_batch`
with a generator seeded by (seed, step)) and the evaluation splits are seeded. `--max-minutes`
stops early, cleanly: the schedule is the one of `--steps`, the weights of the last step are
saved and evaluated, and PRETRAIN.json records how many steps ran, with the command that replays
exactly those steps (`--stop-after`), on one thread and the same torch version.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import captions
from .tasks import BUILTIN_TASKS, get_task
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, build_tokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_TEXT_LENGTH = 24


# --- the model, tokenizer and processor --------------------------------------------------------

def vocabulary_texts() -> list[str]:
    """Every text the tokenizer must cover: the captions' words and all task prompts."""
    prompts = [t.format(c) for name in BUILTIN_TASKS for c in get_task(name).class_names for t in get_task(name).templates]
    return list(captions.VOCABULARY_TEXTS) + prompts


def clip_config(vocab_size: int, *, image_size: int = 32, patch_size: int = 8, vision_width: int = 192,
                vision_layers: int = 4, text_width: int = 128, text_layers: int = 2, projection_dim: int = 128):
    from transformers import CLIPConfig

    text = dict(vocab_size=vocab_size, hidden_size=text_width, intermediate_size=4 * text_width,
                num_hidden_layers=text_layers, num_attention_heads=text_width // 64,
                max_position_embeddings=MAX_TEXT_LENGTH, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    vision = dict(image_size=image_size, patch_size=patch_size, hidden_size=vision_width,
                  intermediate_size=4 * vision_width, num_hidden_layers=vision_layers,
                  num_attention_heads=vision_width // 64)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def image_processor(image_size: int):
    """CLIP's processor at the model's own size: an image of that size passes through unresized."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def to_pixels(images) -> torch.Tensor:
    """PIL images already at the model's size -> (B, 3, H, W), normalised as the processor does."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 255.0  # (B, H, W, 3)
    arr = (arr - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def encode_texts(tokenizer, texts) -> dict[str, torch.Tensor]:
    out = tokenizer(list(texts), padding=True, truncation=True, max_length=MAX_TEXT_LENGTH, return_tensors="pt")
    return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}


def pooled(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


# --- training ----------------------------------------------------------------------------------

def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matching (image, text) rows."""
    logits = logit_scale.exp().clamp(max=100) * F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T  # (B, B)
    target = torch.arange(len(logits))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def lr_at(step: int, *, peak: float, warmup: int, total: int, floor: float = 0.05) -> float:
    """Linear warmup, then cosine decay to `floor * peak` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def optimizer_for(model, lr: float, weight_decay: float):
    # No decay on biases, norms, embeddings' positions and the temperature.
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "position" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "position" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98), eps=1e-6)


# --- zero-shot evaluation ----------------------------------------------------------------------

@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, task: str, *, n: int | None = None, image_size: int = 32) -> float:
    """Accuracy on the task's test split with its own templates: per class, the normalised mean of
    its normalised prompt embeddings; predict the class of highest cosine."""
    spec = get_task(task)
    images, labels = spec.render("test", n, image_size=image_size, seed=0)
    prompts = [t.format(c) for c in spec.class_names for t in spec.templates]
    text = F.normalize(pooled(model.get_text_features(**encode_texts(tokenizer, prompts))), dim=-1)
    classifier = F.normalize(text.reshape(len(spec.class_names), len(spec.templates), -1).mean(1), dim=-1)
    feats = torch.cat([F.normalize(pooled(model.get_image_features(pixel_values=to_pixels(images[i:i + 256]))), dim=-1)
                       for i in range(0, len(images), 256)])
    return float(((feats @ classifier.T).argmax(1) == torch.tensor(labels)).float().mean())


def zero_shot_table(model, tokenizer, *, n: int | None = None, image_size: int = 32) -> dict[str, float]:
    model.eval()
    table = {t: zero_shot_accuracy(model, tokenizer, t, n=n, image_size=image_size) for t in BUILTIN_TASKS}
    model.train()
    return table


def chance(task: str) -> float:
    return 1.0 / len(get_task(task).class_names)


# --- saving and recording ----------------------------------------------------------------------

def save_model(model, tokenizer, processor, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)


def write_record(out: Path, record: dict) -> None:
    (out / "PRETRAIN.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "PRETRAIN.md").write_text(record_markdown(record))


def record_markdown(r: dict) -> str:
    rows = "\n".join(
        f"| {t} | {len(get_task(t).class_names)} | {100 * chance(t):.1f} | {100 * acc:.1f} | {acc / chance(t):.2f}x |"
        for t, acc in r["zero_shot"].items())
    curve = "\n".join(f"| {p['step']} | {p['minutes']:.1f} | {p['loss']:.3f} | {100 * p['mean_zero_shot']:.1f} |"
                      for p in r["curve"])
    return f"""# The shipped mini CLIP: pre-training record

Command: `{r['command']}`

Replay exactly these steps: `{r.get('reproduce', r['command'])}`

- parameters: {r['parameters']:,} ({r['config_summary']})
- steps: {r['steps_done']} of {r['steps_scheduled']} scheduled, batch {r['batch_size']} ({r['pairs_seen']:,} generated pairs)
- wall time: {r['minutes']:.1f} min on {r['machine']} ({r['threads']} thread(s), shared machine){cpu_time(r)}
- final training loss: {r['final_loss']:.3f} (ln(batch) = {math.log(r['batch_size']):.3f} is chance)
- tasks at >= 1.5x chance zero-shot: {r['tasks_at_1_5x_chance']} of {len(r['zero_shot'])}

## Zero-shot accuracy on the tasks' test splits (their own templates, {r['eval_images_per_task']} images each)

| task | classes | chance % | zero-shot % | x chance |
|---|---|---|---|---|
{rows}

## Training curve (zero-shot on the first {r['curve_images_per_task']} test images of each task)

| step | minutes | loss (mean of last 50) | mean zero-shot % |
|---|---|---|---|
{curve}
"""


def cpu_time(record: dict) -> str:
    """The run's own CPU time; the wall clock also counts other jobs on a shared machine."""
    return f"; CPU time {record['cpu_minutes']:.1f} min" if "cpu_minutes" in record else ""


def replay_command(args, steps_done: int) -> str:
    """The command that replays exactly the steps this run made, with no time limit."""
    return (f"python -m cl_driver.mini.pretrain --out {args.out} --seed {args.seed} --steps {args.steps} "
            f"--stop-after {steps_done} --batch-size {args.batch_size} --lr {args.lr} --warmup {args.warmup} "
            f"--weight-decay {args.weight_decay} --image-size {args.image_size} --patch-size {args.patch_size} "
            f"--vision-width {args.vision_width} --vision-layers {args.vision_layers} --text-width {args.text_width} "
            f"--text-layers {args.text_layers} --threads 1")


# --- the command -------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m cl_driver.mini.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="folder for the model, tokenizer, processor and record")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=5000, help="scheduled steps (the cosine schedule's length)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop cleanly after this much training time")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps of the --steps schedule (replays a run a time limit cut short)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--warmup", type=int, default=250)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--vision-width", type=int, default=192)
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--text-width", type=int, default=128)
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--curve-images", type=int, default=100, help="test images per task for the curve")
    p.add_argument("--eval-images", type=int, default=None, help="test images per task at the end (default: the split)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    import sys

    from transformers import CLIPModel

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer(vocabulary_texts(), max_length=MAX_TEXT_LENGTH)
    config = clip_config(len(tokenizer), image_size=args.image_size, patch_size=args.patch_size,
                         vision_width=args.vision_width, vision_layers=args.vision_layers,
                         text_width=args.text_width, text_layers=args.text_layers)
    model = CLIPModel(config).train()
    processor = image_processor(args.image_size)
    optimizer = optimizer_for(model, args.lr, args.weight_decay)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"mini CLIP: {n_params:,} parameters, vocabulary {len(tokenizer)}", flush=True)

    start, cpu_start, losses, curve, step = time.time(), time.process_time(), [], [], 0
    for step in range(args.steps):
        if args.max_minutes is not None and time.time() - start > 60 * args.max_minutes:
            print(f"time limit reached after {step} steps", flush=True)
            break
        if args.stop_after is not None and step >= args.stop_after:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, peak=args.lr, warmup=args.warmup, total=args.steps)
        images, texts = captions.make_batch(np.random.default_rng([args.seed, step]), args.batch_size, args.image_size)
        image_emb = pooled(model.get_image_features(pixel_values=to_pixels(images)))
        text_emb = pooled(model.get_text_features(**encode_texts(tokenizer, texts)))
        loss = contrastive_loss(image_emb, text_emb, model.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            print(f"step {step + 1} loss {np.mean(losses[-50:]):.3f} lr {optimizer.param_groups[0]['lr']:.2e} "
                  f"scale {model.logit_scale.exp().item():.1f} {time.time() - start:.0f}s", flush=True)
        if (step + 1) % args.eval_every == 0:
            zs = zero_shot_table(model, tokenizer, n=args.curve_images, image_size=args.image_size)
            curve.append({"step": step + 1, "minutes": (time.time() - start) / 60, "loss": float(np.mean(losses[-50:])),
                          "mean_zero_shot": float(np.mean(list(zs.values()))), "zero_shot": zs})
            print("zero-shot " + " ".join(f"{t}={100 * a:.0f}" for t, a in zs.items()), flush=True)
            save_model(model, tokenizer, processor, args.out)  # a usable checkpoint if the run is cut short
    else:
        step = args.steps
    minutes, cpu_minutes = (time.time() - start) / 60, (time.process_time() - cpu_start) / 60

    model.eval()
    save_model(model, tokenizer, processor, args.out)
    zs = zero_shot_table(model, tokenizer, n=args.eval_images, image_size=args.image_size)
    record = {
        "command": "python -m cl_driver.mini.pretrain " + " ".join(sys.argv[1:] if argv is None else argv),
        "reproduce": replay_command(args, step),
        "seed": args.seed, "steps_scheduled": args.steps, "steps_done": step, "batch_size": args.batch_size,
        "pairs_seen": step * args.batch_size, "minutes": minutes, "cpu_minutes": cpu_minutes,
        "threads": args.threads,
        "machine": f"{platform.machine()} CPU, torch {torch.__version__}",
        "final_loss": float(np.mean(losses[-50:])) if losses else float("nan"),
        "parameters": n_params,
        "config_summary": f"{args.image_size} px, patch {args.patch_size}, vision {args.vision_layers}x{args.vision_width}, "
                          f"text {args.text_layers}x{args.text_width}, vocabulary {len(tokenizer)}",
        "hyperparameters": {k: v for k, v in vars(args).items() if k != "out"} | {"out": str(args.out)},
        "eval_images_per_task": args.eval_images or "all",
        "curve_images_per_task": args.curve_images,
        "zero_shot": zs,
        "chance": {t: chance(t) for t in BUILTIN_TASKS},
        "tasks_at_1_5x_chance": sum(zs[t] >= 1.5 * chance(t) for t in BUILTIN_TASKS),
        "curve": curve,
    }
    write_record(args.out, record)
    print(record_markdown(record), flush=True)
    return record


if __name__ == "__main__":
    main()
