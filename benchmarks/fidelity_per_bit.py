"""Fidelity per bit: bytes on disk per parameter per task against the quality of the rebuilt models,
for ConDU's store and for T-Switch-, BitDelta- and TALL-masks-style encodings of the same fine-tunes.

    python -m benchmarks.fidelity_per_bit                     # both families; trains what is missing
    python -m benchmarks.fidelity_per_bit --family gpt2       # one family (clip or gpt2)
    python -m benchmarks.fidelity_per_bit --quick --results-dir /tmp/fpb   # tiny models, a few tasks

Fine-tunes (each family's tasks are fine-tuned from one base; nothing here is tuned on the test sets):
- clip: the mini-MTIL experts, the ten tasks of cl_driver/configs/mini_mtil.yaml fine-tuned from
  the shipped mini CLIP by the driver's own training (its `individual` chain). A finished
  `python -m benchmarks.mini_mtil` run's fine-tunes (runs/mini_mtil/checkpoints/individual) are
  reused when their base is byte for byte this one; the rest are trained, in
  runs/fidelity_per_bit/clip. Quality: accuracy of each rebuilt expert on its task's test images.
- gpt2: a tiny GPT-2 (transformers' GPT2Config, 2 layers of width 128) trained here to copy a
  sequence of 8 symbols after a separator, then fine-tuned on 8 synthetic sequence tasks
  (reverse, sort, two shifts, two permutations of the symbols, swapped pairs, a rotation), in
  runs/fidelity_per_bit/gpt2. Quality: top-1 agreement of the rebuilt model with its fine-tune
  on 512 test sequences (and the task loss, and accuracy against the truth).

Encodings, each of every task of a family:
- ConDU: the store itself (fusion.Store), built as the continual loop builds it (unify the first
  task, add the others one at a time), in each rescaler mode (model, tensor-mean, tensor) and
  unified dtype (float32, bfloat16, and the compact int8 and int4 blocks); the rebuilt models are
  the store's decoupled ones. Beside them EMR-Merging's one-shot rule (every task unified at
  once, tensor-mean rescalers, float32).
- T-Switch-style: per task an activation mask (the k largest |delta| over the whole model), a
  polarity bit per active entry (its sign) and one scale, the mean |delta| over the active entries
  (the least-squares scale of a fixed +-1 pattern); k swept over TSWITCH_K. Its mask is
  counted as a standard codec (xz, LZMA2) compresses it, and as packed bits.
- BitDelta-style: per task one sign bit per parameter and one scale per tensor, the tensor's mean
  |delta| (BitDelta's initial scale; its scale distillation is not run here).
- TALL-masks-style: the task-arithmetic sum of the deltas, stored once in float32, and per task a
  mask m_t = |delta_t| > lambda * |sum - delta_t| (the official code's strict rule); lambda per
  task from the paper's grid {0.2, ..., 0.6}, chosen on held-out data (clip: the task's `val`
  images; gpt2: 512 other sequences), as the paper chooses it on validation accuracy.

Bytes: what is on disk per task, divided by the fused parameters and the tasks: the store's
unified file and trigger files (headers included; the manifest's rescalers and checksums are left
out, a few KiB); every other encoding's raw bits and float32 scalars, no container.
Timings (the store's add and decouple) are medians over the tasks. Seeds are fixed.

Writes benchmarks/results/fidelity_per_bit.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks._common import ROOT, TINY_CONFIG, machine_info, results_folder, write_results

NAME = "fidelity_per_bit"
RUNS = ROOT / "runs" / NAME
REUSE = ROOT / "runs" / "mini_mtil"  # a finished `python -m benchmarks.mini_mtil` run
CONDU_DTYPES = ("float32", "bfloat16", "int8", "int4")
RESCALERS = ("model", "tensor-mean", "tensor")
TSWITCH_K = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7)
TALL_LAMBDAS = (0.2, 0.3, 0.4, 0.5, 0.6)
SCALE_BYTES = 4  # every scalar (a scale, a rescaler) as float32


# ---- a family: a base, its fine-tunes, and how a rebuilt model is judged ----------------------------


@dataclass
class Family:
    """Fine-tunes of one base on disk, their deltas, and the quality of a rebuilt model."""

    name: str
    base_path: Path
    checkpoints: list[Path]
    tasks: list[str]
    base: dict[str, np.ndarray]  # every tensor of the base
    fused: list[str]  # its float tensors: what every encoding rebuilds
    quality: Callable[[int, dict | None, str], dict]  # (task, delta or None for the base, key) -> metrics
    validate: Callable[[int, dict, str], float]  # held-out score of a rebuilt delta (higher is better)
    primary: str  # the metric the plot and the comparisons read
    primary_label: str
    deltas: list[dict[str, np.ndarray]] = field(default_factory=list)  # per task, flat float32

    @property
    def numel(self) -> int:
        return sum(self.base[n].size for n in self.fused)

    def load_deltas(self, read: Callable[[Path], dict]) -> None:
        for path in self.checkpoints:
            tuned = read(path)
            self.deltas.append({n: (tuned[n].astype(np.float32) - self.base[n].astype(np.float32)).reshape(-1)
                                for n in self.fused})


def _flat(delta: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    return np.concatenate([delta[n] for n in names])


def _split(flat: np.ndarray, like: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    out, lo = {}, 0
    for n in names:
        out[n] = flat[lo : lo + like[n].size]
        lo += like[n].size
    return out


# ---- the clip family: mini-MTIL experts -------------------------------------------------------------


def clip_family(folder: Path, *, quick: bool) -> tuple[Family, dict]:
    """The mini-MTIL experts (the driver's `individual` chain), trained where missing."""
    import torch
    from safetensors.numpy import load_file

    from cl_driver.config import load_config
    from cl_driver.data import as_dataset, load_split
    from cl_driver.finetunes import weights_file
    from cl_driver.inference import accuracy
    from cl_driver.loop import ContinualRun

    config = load_config(TINY_CONFIG if quick else "mini_mtil").select_methods(["individual"])
    run = ContinualRun(config, folder, progress=False)
    reused = [] if quick else _reuse_experts(run)
    began = time.perf_counter()
    run.run()
    trained_s = time.perf_counter() - began
    paths = [run.folder.checkpoint("individual", i) for i in range(len(run.specs))]
    base = load_file(str(run.finetunes.base_path))
    fused = [n for n, a in base.items() if np.issubdtype(a.dtype, np.floating)]
    torch_base = {n: torch.from_numpy(a) for n, a in base.items()}
    val_sets: dict[int, tuple] = {}

    def state(delta):
        if delta is None:
            return torch_base
        return {**torch_base, **{n: torch.from_numpy(np.asarray(base[n] + delta[n].reshape(base[n].shape)))
                                 for n in fused}}

    def quality(j: int, delta, key: str) -> dict:
        return {"accuracy": run.evaluation.accuracy((key, j), lambda: state(delta), j)}

    def validate(j: int, delta, key: str) -> float:
        if j not in val_sets:
            split = load_split(run.specs[j], "val", image_size=run.data.side, seed=config.training.seed,
                               limit=config.evaluation.max_test)
            val_sets[j] = (as_dataset(split, run.clip.processor, run.data.side), torch.tensor(split.labels))
        run.runner.activate((key, j), lambda: state(delta))
        dataset, labels = val_sets[j]
        logits, _ = run.runner.logits(dataset, run.specs[j].class_names, run.specs[j].templates)
        return accuracy(logits, labels)

    family = Family("clip", run.finetunes.base_path, paths, [s.name for s in run.specs], base, fused, quality,
                    validate, "accuracy", "accuracy of the rebuilt expert on its task (%)")
    family.load_deltas(lambda p: load_file(str(weights_file(p))))
    source = {"config": "benchmarks/configs/mini_mtil_tiny.yaml" if quick else "cl_driver/configs/mini_mtil.yaml",
              "model": config.model, "reused_from_mini_mtil": reused, "training_s": trained_s,
              "run_folder": _relative(folder)}
    return family, source


def _reuse_experts(run) -> list[str]:
    """Copy a finished mini_mtil run's fine-tunes of the same base into this run folder."""
    theirs = REUSE / "base.safetensors"
    if not theirs.is_file() or theirs.read_bytes() != run.finetunes.base_path.read_bytes():
        return []
    reused = []
    for i, spec in enumerate(run.specs):
        mine, source = run.folder.checkpoint("individual", i), REUSE / "checkpoints" / "individual" / f"{i + 1:02d}-{spec.name}"
        if not mine.exists() and source.is_dir():
            shutil.copytree(source, mine)
            reused.append(spec.name)
    return reused


# ---- the gpt2 family: a tiny GPT-2 and eight synthetic sequence tasks ----------------------------------

SYMBOLS, LENGTH = 32, 8  # sequences of 8 symbols of 32, then a separator, then the answer
SEP = SYMBOLS
GPT2_TASKS = ("reverse", "sort", "shift1", "shift5", "permute_a", "permute_b", "swap_pairs", "rotate3")


def task_answers(task: str, x: np.ndarray) -> np.ndarray:
    """The answer to input symbols x (n, LENGTH) under `task` (copy: the pre-training task)."""
    perm_a, perm_b = np.random.default_rng(101).permutation(SYMBOLS), np.random.default_rng(202).permutation(SYMBOLS)
    answers = {
        "copy": lambda: x,
        "reverse": lambda: x[:, ::-1],
        "sort": lambda: np.sort(x, axis=1),
        "shift1": lambda: (x + 1) % SYMBOLS,
        "shift5": lambda: (x + 5) % SYMBOLS,
        "permute_a": lambda: perm_a[x],
        "permute_b": lambda: perm_b[x],
        "swap_pairs": lambda: x.reshape(len(x), LENGTH // 2, 2)[:, :, ::-1].reshape(len(x), LENGTH),
        "rotate3": lambda: np.roll(x, -3, axis=1),
    }
    return answers[task]()


def sequences(task: str, count: int, seed: int):
    """(count, 2 * LENGTH + 1) token ids: the input, the separator, the answer."""
    import torch

    x = np.random.default_rng(seed).integers(0, SYMBOLS, (count, LENGTH))
    return torch.from_numpy(np.concatenate([x, np.full((count, 1), SEP), task_answers(task, x)], axis=1))


def answer_logits(model, batch):
    """The logits that predict the answer's LENGTH tokens, (n, LENGTH, V)."""
    return model(batch).logits[:, LENGTH : 2 * LENGTH]


def _train(model, task: str, steps: int, lr: float, seed: int) -> float:
    import torch

    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    loss = torch.tensor(0.0)
    for step in range(steps):
        batch = sequences(task, 64, seed * 1_000_003 + step)
        logits = answer_logits(model, batch)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, LENGTH + 1 :].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def gpt2_family(folder: Path, *, quick: bool) -> tuple[Family, dict]:
    """The tiny GPT-2 and its fine-tunes on disk (trained here once; reused while the recipe is the same)."""
    import torch
    from safetensors.numpy import load_file
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    shape = dict(n_embd=32, n_layer=1, n_head=4) if quick else dict(n_embd=128, n_layer=2, n_head=4)
    steps = dict(pretrain=40, finetune=20) if quick else dict(pretrain=600, finetune=300)
    tasks = list(GPT2_TASKS[:3] if quick else GPT2_TASKS)
    recipe = {"shape": shape, "steps": steps, "tasks": tasks, "lr": {"pretrain": 3e-3, "finetune": 1e-3},
              "batch": 64, "symbols": SYMBOLS, "length": LENGTH, "seed": 0}
    config = GPT2Config(vocab_size=SYMBOLS + 1, n_positions=2 * LENGTH + 1, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=SEP, eos_token_id=SEP, **shape)
    recorded = folder / "recipe.json"
    if not recorded.is_file() or json.loads(recorded.read_text()) != recipe:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    began = time.perf_counter()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    if not (folder / "base" / "model.safetensors").is_file():
        _train(model, "copy", steps["pretrain"], recipe["lr"]["pretrain"], seed=0)
        model.save_pretrained(folder / "base")
    base_state = {k: v.clone() for k, v in GPT2LMHeadModel.from_pretrained(folder / "base").state_dict().items()}
    for t, task in enumerate(tasks):
        if not (folder / task / "model.safetensors").is_file():
            model.load_state_dict(base_state)
            _train(model, task, steps["finetune"], recipe["lr"]["finetune"], seed=t + 1)
            model.save_pretrained(folder / task)
    recorded.write_text(json.dumps(recipe))
    trained_s = time.perf_counter() - began

    base = load_file(str(folder / "base" / "model.safetensors"))
    fused = [n for n, a in base.items() if np.issubdtype(a.dtype, np.floating)]
    model.eval()
    tests = [sequences(task, 512, 10_000 + t) for t, task in enumerate(tasks)]
    vals = [sequences(task, 512, 20_000 + t) for t, task in enumerate(tasks)]

    def load(delta) -> None:
        model.load_state_dict({n: torch.from_numpy(np.asarray(base[n] + (0 if delta is None else delta[n].reshape(base[n].shape))))
                               for n in fused}, strict=False)

    @torch.no_grad()
    def predictions(batch):
        logits = answer_logits(model, batch)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, LENGTH + 1 :].reshape(-1))
        return float(loss), logits.argmax(-1)

    own = []  # each fine-tune's own predictions on its test sequences
    for t, task in enumerate(tasks):
        model.load_state_dict({k: torch.from_numpy(v) for k, v in load_file(str(folder / task / "model.safetensors")).items()},
                              strict=False)
        own.append(predictions(tests[t])[1])

    def quality(j: int, delta, key: str) -> dict:
        load(delta)
        loss, guess = predictions(tests[j])
        return {"agreement": 100.0 * float((guess == own[j]).double().mean()), "loss": loss,
                "accuracy": 100.0 * float((guess == tests[j][:, LENGTH + 1 :]).double().mean())}

    def validate(j: int, delta, key: str) -> float:
        load(delta)
        _, guess = predictions(vals[j])
        return 100.0 * float((guess == vals[j][:, LENGTH + 1 :]).double().mean())

    family = Family("gpt2", folder / "base", [folder / task for task in tasks], tasks, base, fused, quality, validate,
                    "agreement", "top-1 agreement of the rebuilt model with its fine-tune (%)")
    family.load_deltas(lambda p: load_file(str(p / "model.safetensors")))
    source = {"recipe": recipe, "training_s": trained_s, "run_folder": _relative(folder),
              "parameters": int(sum(a.size for a in base.values()))}
    return family, source


# ---- the encodings -------------------------------------------------------------------------------------


@dataclass
class Encoding:
    """One encoding of every task of a family: what it costs on disk and how its rebuilds fare."""

    method: str  # ConDU, EMR (one-shot), T-Switch-style, BitDelta-style, TALL-masks-style, fine-tunes, base
    variant: str  # the mode: rescaler / dtype, k, lambda
    bytes: int  # on disk, every task together
    per_task: list[dict] = field(default_factory=list)  # each task's quality metrics
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.method} {self.variant}".strip()


def _xz_bytes(bits: np.ndarray) -> int:
    """What a standard codec (xz: LZMA2, preset 9) makes of bit-packed booleans."""
    return len(lzma.compress(np.packbits(bits, bitorder="little").tobytes(), preset=9))


def _entropy_bits(p: float) -> float:
    return 0.0 if p <= 0 or p >= 1 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def tswitch(delta: np.ndarray, k: float) -> tuple[np.ndarray, dict]:
    """The T-Switch-style rebuild of one flat delta: scale * sign on the k largest |delta|."""
    size = np.abs(delta)
    count = max(1, int(round(k * delta.size)))
    threshold = np.partition(size, delta.size - count)[delta.size - count]
    active = (size >= threshold) & (size > 0)  # (N,) ties at the threshold join
    scale = np.float32(size[active].astype(np.float64).mean()) if active.any() else np.float32(0.0)
    rebuilt = np.where(active, np.where(delta > 0, scale, -scale), np.float32(0.0)).astype(np.float32)
    nnz = int(active.sum())
    sizes = {"density": nnz / delta.size, "mask_xz": _xz_bytes(active), "mask_packed": -(-delta.size // 8),
             "polarity": -(-nnz // 8), "scale": SCALE_BYTES}
    return rebuilt, sizes


def bitdelta(delta: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """The BitDelta-style rebuild: per tensor +-(mean |delta|) by the sign bit (zero counts as minus)."""
    out, nbytes = {}, 0
    for n, d in delta.items():
        scale = np.float32(np.abs(d).astype(np.float64).mean())
        out[n] = np.where(d > 0, scale, -scale).astype(np.float32)
        nbytes += -(-d.size // 8) + SCALE_BYTES
    return out, nbytes


def tall_masks(deltas: list[np.ndarray], lam: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """The task-arithmetic sum (float32, in task order) and each task's mask |d_t| > lam * |sum - d_t|."""
    total = deltas[0].copy()
    for d in deltas[1:]:
        total += d
    return total, [np.abs(d) > np.float32(lam) * np.abs(total - d) for d in deltas]


# ---- measuring -----------------------------------------------------------------------------------------


def judge(family: Family, encoding: Encoding, rebuilt: Callable[[int], dict | None]) -> Encoding:
    """Every task's quality under `encoding` (rebuilt(i): task i's delta as the encoding rebuilds it)."""
    for i in range(len(family.tasks)):
        encoding.per_task.append(family.quality(i, rebuilt(i), encoding.label))
    return encoding


def condu_stores(family: Family, work: Path) -> tuple[list[Encoding], dict]:
    """Every ConDU mode as the continual loop builds it, and EMR's one-shot unify."""
    from fusion import Store

    encodings, masks = [], {}
    plans = [(r, d, False) for r in RESCALERS for d in CONDU_DTYPES] + [("tensor-mean", "float32", True)]
    for rescaler, dtype, one_shot in plans:
        path = work / f"{family.name}-{'emr' if one_shot else 'condu'}-{rescaler}-{dtype}"
        shutil.rmtree(path, ignore_errors=True)
        adds = []
        if one_shot:
            store = Store.unify(path, family.base_path, family.checkpoints, names=family.tasks, rescaler=rescaler,
                                dtype=dtype)
        else:
            store = Store.unify(path, family.base_path, family.checkpoints[:1], names=family.tasks[:1],
                                rescaler=rescaler, dtype=dtype)
            for checkpoint, name in zip(family.checkpoints[1:], family.tasks[1:]):
                began = time.perf_counter()
                store.add(checkpoint, name=name)
                adds.append(time.perf_counter() - began)
        info = store.info()
        sizes = info["sizes"]
        method, variant = ("EMR (one-shot)", f"{rescaler} / {dtype}") if one_shot else ("ConDU", f"{rescaler} / {dtype}")
        encoding = Encoding(method, variant, sizes["unified"] + sizes["triggers"],
                            extra={"rescaler": rescaler, "dtype": dtype, "unified_bytes": sizes["unified"],
                                   "trigger_bytes": sizes["triggers"], "manifest_bytes": (path / "condu.json").stat().st_size,
                                   "fidelity": [t["fidelity"] for t in info["tasks"]],
                                   "mask_density": [t["mask_density"] for t in info["tasks"]]})
        decouples = []

        def rebuilt(i: int) -> dict:
            began = time.perf_counter()
            model = store.load_task(i + 1)
            decouples.append(time.perf_counter() - began)
            return {n: (model[n].astype(np.float32) - family.base[n].astype(np.float32)).reshape(-1) for n in family.fused}

        judge(family, encoding, rebuilt)
        encoding.extra["add_s_median"] = statistics.median(adds) if adds else None
        encoding.extra["decouple_s_median"] = statistics.median(decouples)
        encodings.append(encoding)
        if (rescaler, dtype, one_shot) == ("model", "float32", False):
            masks = trigger_compression(store, family)
        shutil.rmtree(path, ignore_errors=True)
    return encodings, masks


def trigger_compression(store, family: Family) -> dict:
    """What a standard codec makes of ConDU's masks: does entropy coding of the triggers pay?"""
    from safetensors.numpy import load_file

    rows = []
    for task in store.manifest().tasks:
        packed = load_file(str(store.path / task.triggers))
        bits = np.concatenate([np.unpackbits(packed[n], count=family.base[n].size, bitorder="little") for n in family.fused])
        raw = -(-bits.size // 8)
        coded = _xz_bytes(bits.astype(bool))
        density = float(bits.mean())
        rows.append({"task": task.name, "density": density, "packed_bytes": raw, "xz_bytes": coded,
                     "xz_over_packed": coded / raw, "entropy_over_packed": _entropy_bits(density)})
    return {"tasks": rows, "xz_over_packed_mean": statistics.mean(r["xz_over_packed"] for r in rows),
            "entropy_over_packed_mean": statistics.mean(r["entropy_over_packed"] for r in rows)}


def other_encodings(family: Family) -> list[Encoding]:
    """T-Switch-, BitDelta- and TALL-masks-style encodings of the same deltas."""
    names, out = family.fused, []
    flats = [_flat(d, names) for d in family.deltas]  # (N,) each
    for k in TSWITCH_K:
        encoding = Encoding("T-Switch-style", f"k={k:g}", 0)
        parts = []

        def rebuilt(i: int) -> dict:
            flat, sizes = tswitch(flats[i], k)
            parts.append(sizes)
            return _split(flat, family.deltas[i], names)

        judge(family, encoding, rebuilt)
        encoding.bytes = sum(p["mask_xz"] + p["polarity"] + p["scale"] for p in parts)
        encoding.extra = {"k": k, "density": [p["density"] for p in parts],
                          "bytes_packed_masks": sum(p["mask_packed"] + p["polarity"] + p["scale"] for p in parts),
                          "mask_xz_bytes": sum(p["mask_xz"] for p in parts)}
        out.append(encoding)

    encoding = Encoding("BitDelta-style", "sign + mean |delta| per tensor", 0)
    sizes = []

    def rebuilt_bitdelta(i: int) -> dict:
        rebuilt, nbytes = bitdelta(family.deltas[i])
        sizes.append(nbytes)
        return rebuilt

    judge(family, encoding, rebuilt_bitdelta)
    encoding.bytes = sum(sizes)
    out.append(encoding)

    total, by_lambda = None, {}
    for lam in TALL_LAMBDAS:
        total, masks = tall_masks(flats, lam)
        by_lambda[lam] = masks
    chosen, scores = [], []
    for i in range(len(family.tasks)):  # lambda per task on held-out data, as the paper does
        held_out = {lam: family.validate(i, _split(np.where(by_lambda[lam][i], total, 0), family.deltas[i], names),
                                         f"tall-val-{lam}") for lam in TALL_LAMBDAS}
        best = max(TALL_LAMBDAS, key=lambda lam: (held_out[lam], -lam))
        chosen.append(best)
        scores.append(held_out)
    encoding = Encoding("TALL-masks-style", "lambda per task on held-out data", 0)
    judge(family, encoding, lambda i: _split(np.where(by_lambda[chosen[i]][i], total, 0).astype(np.float32),
                                             family.deltas[i], names))
    chosen_masks = [by_lambda[chosen[i]][i] for i in range(len(family.tasks))]
    n = total.size
    encoding.bytes = 4 * n + sum(-(-n // 8) for _ in chosen_masks)
    encoding.extra = {"lambda": chosen, "held_out": [{str(k): v for k, v in s.items()} for s in scores],
                      "density": [float(m.mean()) for m in chosen_masks],
                      "bytes_xz_masks": 4 * n + sum(_xz_bytes(m) for m in chosen_masks)}
    out.append(encoding)
    return out


def references(family: Family) -> list[Encoding]:
    """The fine-tunes themselves (float32 deltas) and the base (nothing stored)."""
    ft = Encoding("fine-tunes", "(float32)", 4 * family.numel * len(family.tasks))
    judge(family, ft, lambda i: family.deltas[i])
    base = Encoding("base", "(nothing stored)", 0)
    judge(family, base, lambda i: None)
    return [ft, base]


def summarize(family: Family, encoding: Encoding) -> dict:
    metrics = encoding.per_task[0].keys()
    mean = {m: statistics.mean(t[m] for t in encoding.per_task) for m in metrics}
    return {"method": encoding.method, "variant": encoding.variant, "label": encoding.label,
            "bytes": encoding.bytes, "bytes_per_param_per_task": encoding.bytes / (family.numel * len(family.tasks)),
            "mean": mean, "min": {m: min(t[m] for t in encoding.per_task) for m in metrics},
            "per_task": encoding.per_task, **encoding.extra}


def measure_family(family: Family, work: Path) -> dict:
    began = time.perf_counter()
    condu, masks = condu_stores(family, work)
    rows = [summarize(family, e) for e in [*references(family), *condu, *other_encodings(family)]]
    return {"tasks": family.tasks, "fused_parameters": family.numel, "primary": family.primary,
            "primary_label": family.primary_label, "rows": rows, "condu_masks": masks,
            "seconds": time.perf_counter() - began}


# ---- reading the curve -----------------------------------------------------------------------------------


def pareto(rows: list[dict], metric: str) -> list[str]:
    """Encodings no other beats on both bytes (fewer) and quality (higher): the curve's frontier."""
    stored = [r for r in rows if r["method"] not in ("fine-tunes", "base")]
    front = []
    for r in stored:
        beaten = any(o["bytes_per_param_per_task"] <= r["bytes_per_param_per_task"] and o["mean"][metric] >= r["mean"][metric]
                     and (o["bytes_per_param_per_task"], o["mean"][metric]) != (r["bytes_per_param_per_task"], r["mean"][metric])
                     for o in stored)
        if not beaten:
            front.append(r["label"])
    return sorted(front, key=lambda label: next(r["bytes_per_param_per_task"] for r in stored if r["label"] == label))


def best_within(rows: list[dict], metric: str, method: str, size: float) -> dict | None:
    """The best `method` encoding that takes at most `size` bytes per parameter per task (None: none fits)."""
    fits = [r for r in rows if r["method"] == method and r["bytes_per_param_per_task"] <= size]
    return max(fits, key=lambda r: r["mean"][metric]) if fits else None


def analyse(rows: list[dict], metric: str) -> dict:
    """The best stored encoding, the frontier, each ConDU mode against the best T-Switch-style one in the
    same bytes (or fewer), and what the compact dtypes change against float32."""
    stored = [r for r in rows if r["method"] not in ("fine-tunes", "base")]
    best = max(stored, key=lambda r: r["mean"][metric])
    versus, compact = [], []
    for r in rows:
        if r["method"] != "ConDU":
            continue
        rival = best_within(rows, metric, "T-Switch-style", r["bytes_per_param_per_task"])
        versus.append({"condu": r["label"], "bytes_per_param_per_task": r["bytes_per_param_per_task"],
                       "condu_quality": r["mean"][metric],
                       "tswitch": None if rival is None else {"label": rival["label"], "k": rival["k"],
                                                              "bytes_per_param_per_task": rival["bytes_per_param_per_task"],
                                                              "quality": rival["mean"][metric]},
                       "difference": None if rival is None else r["mean"][metric] - rival["mean"][metric]})
        if r["dtype"] != "float32":
            full = next(o for o in rows if o["method"] == "ConDU" and o["rescaler"] == r["rescaler"]
                        and o["dtype"] == "float32")
            compact.append({"rescaler": r["rescaler"], "dtype": r["dtype"],
                            "bytes_ratio": full["bytes_per_param_per_task"] / r["bytes_per_param_per_task"],
                            "bytes_per_param_per_task": r["bytes_per_param_per_task"],
                            "float32_bytes_per_param_per_task": full["bytes_per_param_per_task"],
                            "quality": r["mean"][metric], "float32_quality": full["mean"][metric],
                            "change": r["mean"][metric] - full["mean"][metric]})
    return {"best": best["label"], "best_quality": best["mean"][metric],
            "best_bytes_per_param_per_task": best["bytes_per_param_per_task"], "pareto": pareto(rows, metric),
            "condu_vs_tswitch": versus, "compact": compact}


# ---- report ------------------------------------------------------------------------------------------------


def _relative(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _table(family: dict) -> str:
    metric = family["primary"]
    extra = [m for m in family["rows"][0]["mean"] if m != metric]
    head = ["encoding", "bytes / param / task", f"{metric} (mean)", f"{metric} (worst task)", *extra, "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 2) + ["---"]) + "|"]
    for r in sorted(family["rows"], key=lambda r: -r["bytes_per_param_per_task"]):
        notes = []
        if r["method"] == "T-Switch-style":
            notes.append(f"density {statistics.mean(r['density']):.3f}; packed masks "
                         f"{r['bytes_packed_masks'] / (family['fused_parameters'] * len(family['tasks'])):.3f} B")
        if r["method"] == "TALL-masks-style":
            notes.append(f"lambda {', '.join(f'{x:g}' for x in r['lambda'])}; density {statistics.mean(r['density']):.3f}")
        if r["method"] in ("ConDU", "EMR (one-shot)"):
            notes.append(f"decouple {r['decouple_s_median'] * 1e3:.0f} ms" +
                         (f", add {r['add_s_median'] * 1e3:.0f} ms" if r.get("add_s_median") else ""))
        cells = [r["label"], f"{r['bytes_per_param_per_task']:.4f}", f"{r['mean'][metric]:.2f}", f"{r['min'][metric]:.2f}",
                 *(f"{r['mean'][m]:.3f}" if m == "loss" else f"{r['mean'][m]:.2f}" for m in extra), "; ".join(notes)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _versus(family: dict) -> str:
    lines = ["| ConDU | bytes / param / task | ConDU | best T-Switch-style in as many bytes | difference |",
             "|---|---:|---:|---|---:|"]
    for v in family["analysis"]["condu_vs_tswitch"]:
        rival = v["tswitch"]
        there = "none fits" if rival is None else \
            f"{rival['quality']:.2f} (k={rival['k']:g}, {rival['bytes_per_param_per_task']:.4f} B)"
        difference = "-" if v["difference"] is None else f"{v['difference']:+.2f}"
        lines.append(f"| {v['condu']} | {v['bytes_per_param_per_task']:.4f} | {v['condu_quality']:.2f} | {there} | "
                     f"{difference} |")
    return "\n".join(lines)


def _compact(family: dict) -> str:
    lines = ["| rescaler | dtype | bytes / param / task (float32: ...) | smaller | quality (float32: ...) | change |",
             "|---|---|---:|---:|---:|---:|"]
    for c in family["analysis"]["compact"]:
        lines.append(f"| {c['rescaler']} | {c['dtype']} | {c['bytes_per_param_per_task']:.4f} "
                     f"({c['float32_bytes_per_param_per_task']:.4f}) | {c['bytes_ratio']:.2f}x | {c['quality']:.2f} "
                     f"({c['float32_quality']:.2f}) | {c['change']:+.2f} |")
    return "\n".join(lines)


def _masks(family: dict) -> str:
    masks = family["condu_masks"]
    return (f"ConDU's masks (model / float32 store): density {statistics.mean(t['density'] for t in masks['tasks']):.3f}; "
            f"xz makes them {masks['xz_over_packed_mean']:.3f} of their packed size (the entropy bound: "
            f"{masks['entropy_over_packed_mean']:.3f}).")


def markdown(result: dict) -> str:
    lines = ["# Fidelity per bit\n", f"`{result['command']}`; {result['machine']['cpu']}, "
             f"load average {result['machine']['load_average']}, {result['machine']['time_utc']}.\n",
             "Bytes on disk per fused parameter per task against the quality of each task's rebuilt model, for "
             "ConDU's store and for T-Switch-, BitDelta- and TALL-masks-style encodings of the same fine-tunes "
             "(the module's docstring says how each is made and counted). Sorted by bytes.\n"]
    for name, family in result["families"].items():
        analysis = family["analysis"]
        lines += [f"## {name}: {len(family['tasks'])} tasks, {family['fused_parameters']:,} fused parameters\n",
                  f"Quality: {family['primary_label']}.\n", _table(family), "",
                  f"Best quality of a stored encoding: {analysis['best']} ({analysis['best_quality']:.2f} at "
                  f"{analysis['best_bytes_per_param_per_task']:.4f} B). On the frontier (no other encoding has "
                  f"fewer bytes and higher quality): {', '.join(analysis['pareto'])}.\n",
                  "ConDU's compact dtypes against its float32 store, same rescaler:\n", _compact(family), "",
                  "Each ConDU mode against the best T-Switch-style encoding that fits in as many bytes (or fewer):\n",
                  _versus(family), "", _masks(family), ""]
    lines += result.get("notes", [])
    return "\n".join(lines)


STYLE = {"EMR (one-shot)": ("s", "tab:cyan"), "T-Switch-style": ("^", "tab:red"),
         "BitDelta-style": ("D", "tab:green"), "TALL-masks-style": ("v", "tab:purple")}
CONDU_STYLE = {"model": "tab:blue", "tensor-mean": "tab:olive", "tensor": "navy"}


def plot(result: dict, path: Path) -> None:
    """Quality against bytes per parameter per task (log), one panel per family; ConDU's four dtypes of
    each rescaler joined by a line (float32 on the right, int4 on the left)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    families = list(result["families"].items())
    fig, axes = plt.subplots(1, len(families), figsize=(7.5 * len(families), 5.5), squeeze=False)
    for ax, (name, family) in zip(axes[0], families):
        metric, rows = family["primary"], family["rows"]
        for rescaler, color in CONDU_STYLE.items():
            points = sorted((r["bytes_per_param_per_task"], r["mean"][metric], r["dtype"]) for r in rows
                            if r["method"] == "ConDU" and r["rescaler"] == rescaler)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=color, lw=1,
                    label=f"ConDU, {rescaler} rescaler")
            if rescaler == "tensor":
                for b, q, dtype in points:
                    ax.annotate(dtype, (b, q), fontsize=7, xytext=(0, 6), textcoords="offset points", ha="center")
        for method, (marker, color) in STYLE.items():
            points = sorted((r["bytes_per_param_per_task"], r["mean"][metric], r["variant"]) for r in rows
                            if r["method"] == method)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, color=color, markersize=7,
                    linestyle="-" if method == "T-Switch-style" else "none", label=method)
            if method == "T-Switch-style":
                for b, q, variant in points:
                    ax.annotate(variant, (b, q), fontsize=7, color=color, xytext=(4, -10), textcoords="offset points")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: f"{x:g}" if f"{x:.0e}"[0] in "235" else ""))
        for r in rows:
            if r["method"] in ("fine-tunes", "base"):
                ax.axhline(r["mean"][metric], color="grey", linestyle=":" if r["method"] == "base" else "--", lw=1)
                ax.annotate(f"{r['method']}: {r['mean'][metric]:.1f}", (ax.get_xlim()[0], r["mean"][metric]),
                            fontsize=7, color="grey", xytext=(2, 2), textcoords="offset points")
        ax.set_xlabel("bytes on disk per parameter per task (log)")
        ax.set_ylabel(family["primary_label"])
        ax.set_title(f"{name}: {len(family['tasks'])} tasks, {family['fused_parameters'] / 1e6:.2f}M parameters")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def report(result: dict, results_dir: Path) -> None:
    """The JSON, the markdown and the plot, the analysis read again from the rows."""
    for family in result["families"].values():
        family["analysis"] = analyse(family["rows"], family["primary"])
    result["notes"] = NOTES
    for path in write_results(NAME, result, markdown(result), out_dir=results_dir):
        print(path)
    plot(result, Path(results_dir) / f"{NAME}.png")
    print(Path(results_dir) / f"{NAME}.png")


# ---- main ------------------------------------------------------------------------------------------------------

NOTES = [
    "## How to read it\n",
    "- One run of each family; per-task rows are in the JSON. Seeds are fixed, so a rerun gives the same "
    "fine-tunes, stores and numbers (timings aside).",
    "- T-Switch-style: the activation mask holds the k largest |delta| over the whole model; its bytes are "
    "what xz makes of the packed mask, plus a bit per active entry and one float32 scale (the packed-mask "
    "size is in the notes). The scale is the mean |delta| over the active entries, the least-squares scale of "
    "a fixed +-1 pattern. The paper's own threshold and knob could not be checked here; k is swept instead.",
    "- BitDelta-style keeps every tensor (1-D ones too) as signs and one scale, the tensor's mean |delta|; "
    "BitDelta's scale distillation (training the scales against the fine-tune's outputs) is not run.",
    "- TALL-masks-style: lambda per task from {0.2, 0.3, 0.4, 0.5, 0.6} by held-out accuracy (clip: the task's "
    "val images; gpt2: 512 other sequences), the sum of the deltas in float32, masks as packed bits.",
    "- ConDU: the store's own files (unified + triggers) as `condu-fuse` writes them; a model is what "
    "`condu-fuse decouple` gives. int8 / int4 are the compact mode (`--dtype int8|int4`): per block of 64 "
    "elements a float32 scale, so 8.5 and 4.5 bits a parameter, shared by the tasks.",
]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and a few tasks, in a temporary folder")
    parser.add_argument("--results-dir", default=None, help="results folder (default benchmarks/results; required "
                        "with --quick)")
    parser.add_argument("--family", choices=("clip", "gpt2"), action="append", help="one family (default both)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the markdown and the plot from the "
                        "results folder's JSON")
    args = parser.parse_args(argv)
    results_dir = results_folder(parser, args.results_dir, quick=args.quick)
    if args.report_only:
        result = json.loads((Path(results_dir) / f"{NAME}.json").read_text())
        report(result, Path(results_dir))
        return result
    import torch

    torch.set_num_threads(args.threads)
    temporary = Path(tempfile.mkdtemp(prefix=f"{NAME}-"))
    runs = temporary if args.quick else RUNS
    families = args.family or ["clip", "gpt2"]
    result = {"families": {}, "sources": {}}
    try:
        for name in families:
            make = clip_family if name == "clip" else gpt2_family
            family, source = make(runs / name, quick=args.quick)
            result["sources"][name] = source
            result["families"][name] = measure_family(family, temporary / "stores")
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    command = f"python -m benchmarks.{NAME}" + (" --quick" if args.quick else "") + \
        "".join(f" --family {f}" for f in args.family or [])
    result.update(command=command, machine=machine_info(), quick=args.quick,
                  settings={"condu_dtypes": CONDU_DTYPES, "rescalers": RESCALERS, "tswitch_k": TSWITCH_K,
                            "tall_lambdas": TALL_LAMBDAS})
    report(result, Path(results_dir))
    return result


if __name__ == "__main__":
    main()
