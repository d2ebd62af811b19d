#!/usr/bin/env python
"""Storage of LoRA adapters in a ConDU store, in both modes, against keeping every task's own files.

    python -m benchmarks.adapter_storage            # GPT-2 shape: 6 layers of width 384, rank 16; T = 2, 4, 8
    python -m benchmarks.adapter_storage --quick --results-dir /tmp/adapter_storage   # a tiny model, T = 2, 3

Factor space: the base is the adapters' shared initialisation, and the store is set against the
T adapter files. Dense: the base is the model, and the store is set against T merged models (what
`decouple` writes for each task) and, for the record, against the T adapter files themselves.
Adapters are made with PEFT (get_peft_model, save_pretrained) on a GPT-2 built from its config,
with LoRA on c_attn, c_proj and c_fc of every block. Their factors are random, as a trained
adapter's are dense: in factor space each task adds a normal draw to every factor of the shared
initialisation; in dense mode each adapter's factors are normal draws of their own.
Sizes are bytes of files on disk: every file of the store folder (manifest and its backup
included), adapter_model.safetensors of each adapter, model.safetensors of a decoupled model.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from benchmarks._common import machine_info, markdown_table, results_folder, write_results

MiB = 1 << 20
NAME = "adapter_storage"
TARGETS = ["c_attn", "c_proj", "c_fc"]


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _model(folder: Path, *, layers: int, width: int, vocab: int) -> Path:
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_embd=width, n_head=max(1, width // 64), vocab_size=vocab, n_positions=128,
                        bos_token_id=0, eos_token_id=0)
    GPT2Model(config).save_pretrained(folder)
    return folder


def _adapter(base: Path, folder: Path, *, rank: int, init_seed: int, task_seed: int | None) -> Path:
    """A PEFT adapter whose factors are the normal draw of `init_seed`, plus one of `task_seed`."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Model

    model = get_peft_model(GPT2Model.from_pretrained(str(base)),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, fan_in_fan_out=True))
    init = torch.Generator().manual_seed(init_seed)
    task = torch.Generator().manual_seed(1000 + (task_seed or 0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                value = 0.02 * torch.randn(param.shape, generator=init)
                if task_seed is not None:
                    value += 0.002 * torch.randn(param.shape, generator=task)
                param.copy_(value)
    model.save_pretrained(folder)
    return folder


def _grow(store_dir: Path, base: Path, adapters: list[Path], counts: list[int]) -> dict[int, int]:
    """Store sizes with the first T adapters, for each T in counts: unify the first, add the rest."""
    from fusion import Store

    store, sizes = Store.unify(store_dir, base, adapters[: counts[0]]), {}
    sizes[counts[0]] = _folder_bytes(store_dir)
    for k, adapter in enumerate(adapters[counts[0]:], start=counts[0] + 1):
        store.add(adapter)
        if k in counts:
            sizes[k] = _folder_bytes(store_dir)
    return sizes


def measure(work: Path, *, layers: int, width: int, vocab: int, rank: int, counts: list[int]) -> dict:
    from fusion import Store

    base = _model(work / "model", layers=layers, width=width, vocab=vocab)
    top = max(counts)
    init = _adapter(base, work / "init", rank=rank, init_seed=0, task_seed=None)
    tuned = [_adapter(base, work / f"factor-{k}", rank=rank, init_seed=0, task_seed=k) for k in range(top)]
    own = [_adapter(base, work / f"dense-{k}", rank=rank, init_seed=100 + k, task_seed=None) for k in range(top)]
    adapter_bytes = (tuned[0] / "adapter_model.safetensors").stat().st_size
    factor_sizes = _grow(work / "factor-store", init, tuned, counts)
    dense_sizes = _grow(work / "dense-store", base, own, counts)
    merged = Store.open(work / "dense-store").decouple(1, work / "merged")
    merged_bytes = (merged / "model.safetensors").stat().st_size
    rows = []
    for t in counts:
        rows.append({"mode": "factors", "tasks": t, "store_bytes": factor_sizes[t], "against": "adapter files",
                     "separate_bytes": t * adapter_bytes, "adapter_files_bytes": t * adapter_bytes})
        rows.append({"mode": "dense", "tasks": t, "store_bytes": dense_sizes[t], "against": "merged models",
                     "separate_bytes": t * merged_bytes, "adapter_files_bytes": t * adapter_bytes})
    for row in rows:
        row["ratio"] = row["separate_bytes"] / row["store_bytes"]
    return {"model": {"layers": layers, "width": width, "vocab": vocab, "model_bytes": merged_bytes,
                      "parameters": merged_bytes // 4},
            "adapter": {"rank": rank, "targets": TARGETS, "adapter_bytes": adapter_bytes}, "rows": rows}


def _markdown(result: dict, command: str) -> str:
    model, adapter = result["model"], result["adapter"]
    table = markdown_table(
        ["mode", "T", "store", "against", "T of them", "smaller by", "T adapter files"],
        [[r["mode"], r["tasks"], f"{r['store_bytes'] / MiB:.2f} MiB", r["against"],
          f"{r['separate_bytes'] / MiB:.2f} MiB", f"{r['ratio']:.2f}x", f"{r['adapter_files_bytes'] / MiB:.2f} MiB"]
         for r in result["rows"]])
    return (f"# LoRA adapters in a ConDU store: storage\n\n"
            f"Model: GPT-2 shape, {model['layers']} layers of width {model['width']}, vocabulary {model['vocab']}: "
            f"{model['model_bytes'] / MiB:.1f} MiB in fp32. Adapters: PEFT LoRA rank {adapter['rank']} on "
            f"{', '.join(adapter['targets'])}: {adapter['adapter_bytes'] / MiB:.2f} MiB each.\n\n"
            f"Command: `{command}`\n\n{table}\n\n"
            "The base (the model, or the shared initial adapter) is kept once outside the store and is "
            f"counted on neither side; a dense store needs the model besides ({model['model_bytes'] / MiB:.1f} MiB), "
            "merged models do not.\n\n"
            "Factor space keeps one unified set of factors plus a bit per factor element and task, so it "
            "costs about (1 + T/32) adapters. Dense keeps one unified full-size delta plus a bit per weight "
            "and task: against T merged models it saves the same way full fine-tunes do, but it is larger "
            "than the T adapter files themselves; keep adapters in factor space when they share an "
            "initialisation.\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.adapter_storage", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model and T = 2, 3")
    parser.add_argument("--results-dir", default=None, help="results folder (default benchmarks/results; "
                        "required with --quick)")
    parser.add_argument("--workdir", default=None, help="where the models are made (default: a temporary folder)")
    args = parser.parse_args(argv)
    results_dir = results_folder(parser, args.results_dir, quick=args.quick)
    shape = (dict(layers=2, width=32, vocab=128, rank=4, counts=[2, 3]) if args.quick
             else dict(layers=6, width=384, vocab=8192, rank=16, counts=[2, 4, 8]))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="adapter-storage-"))
    try:
        result = measure(work, **shape)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    command = "python -m benchmarks.adapter_storage" + (" --quick" if args.quick else "")
    result["command"], result["machine"] = command, machine_info()
    for path in write_results(NAME, result, _markdown(result, command), out_dir=results_dir):
        print(path)


if __name__ == "__main__":
    main()
