"""Classifying images with a run folder's continual model (`ConduCLIP`): latency per batch, memory.

    python -m benchmarks.predict                                  # runs/demo (make it: condu-cl demo)
    python -m benchmarks.predict --run runs/mine --batch 32 --repeats 9 --children 3
    python -m benchmarks.predict --quick --results-dir /tmp/p     # a tiny run made on the spot

Three modes, each as `condu-cl predict` and `ConduCLIP.predict` run them:
    task      one learned task's own expert and classes (--task)
    agnostic  every learned task's classes, theta0 plus the top-K experts by prototype similarity
    labels    labels of one's own (a built-in task the run did not learn), routed the same way

Each mode runs in fresh child processes (`-m benchmarks.predict --child MODE`): a child loads the
model (`ConduCLIP.from_run`), classifies one batch cold (experts rebuilt from the store, text
classifiers encoded), then the same batch `--repeats` times warm (experts and classifiers cached),
and reports its own peak RSS (VmHWM) and its RSS after the imports and after loading. The batch
is test images of the run's tasks (the agnostic batch takes them from every learned task in turn).
Figures are medians: of the warm batches in a child, then over `--children` children.
Results: benchmarks/results/predict.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import (ROOT, TINY_CONFIG, current_rss_bytes, machine_info, markdown_table, results_folder,
                                run_child_measuring_rss, self_peak_rss_bytes, time_repeats, write_results)

NAME = "predict"
MODES = ("task", "agnostic", "labels")
DEMO_RUN = ROOT / "runs" / "demo"
MIB = 1 << 20


# ---------------------------------------------------------------- the child: one mode, one process


def unseen_builtin(learned: list[str]) -> str:
    """The first built-in task the run did not learn: its images and class names are labels of one's own."""
    from cl_driver.mini.tasks import BUILTIN_TASKS

    return next(name for name in BUILTIN_TASKS if name not in learned)


def batch_for(model, mode: str, size: int) -> tuple[list, dict]:
    """`size` test images for the mode, and the keyword arguments of its predict call."""
    from cl_driver.config import TaskConfig
    from cl_driver.data import load_split, resolve_task
    from cl_driver.models import image_size

    side = model.config.image_size or image_size(model.clip.processor)
    if mode == "labels":
        spec = resolve_task(TaskConfig(name="unseen", source={"kind": "builtin", "task": unseen_builtin(model.tasks)}))
        specs, kwargs = [spec], {"candidate_labels": list(spec.class_names)}
    else:
        specs = model.specs[:1] if mode == "task" else model.specs
        kwargs = {"task": model.tasks[0]} if mode == "task" else {}
    splits = [load_split(spec, "test", image_size=side, limit=size) for spec in specs]
    images = [splits[k % len(splits)].load(k // len(splits)) for k in range(size)]  # tasks in turn
    return images, kwargs


def child(run: str, mode: str, batch: int, repeats: int) -> dict:
    """Load, classify one batch cold, then `repeats` warm; times and memory of this process."""
    import torch

    from cl_driver import ConduCLIP
    from cl_driver.console import quiet_library_bars

    quiet_library_bars()  # as `condu-cl predict` does
    rss_imports = current_rss_bytes()
    began = time.perf_counter()
    model = ConduCLIP.from_run(run)
    load_s = time.perf_counter() - began
    rss_loaded = current_rss_bytes()
    images, kwargs = batch_for(model, mode, batch)
    began = time.perf_counter()
    first = model.predict(images, top=1, **kwargs)
    cold_s = time.perf_counter() - began
    warm = time_repeats(lambda: model.predict(images, top=1, **kwargs), repeats=repeats, warmup=0)
    again = model.predict(images, top=1, **kwargs)
    assert again == first, "a warm batch must give the cold batch's predictions"
    return {"mode": mode, "batch": len(images), "kwargs": dict(kwargs), "load_s": load_s,
            "cold_s": cold_s, "warm_s": warm, "warm_median_s": statistics.median(warm),
            "experts_built": model.runner.cache.builds, "rss_after_imports_bytes": rss_imports,
            "rss_after_load_bytes": rss_loaded, "self_peak_rss_bytes": self_peak_rss_bytes(),
            "torch_threads": torch.get_num_threads()}


# ---------------------------------------------------------------- the parent


def tiny_run(folder: Path) -> Path:
    """The quick mode's run: the tiny mini-MTIL config, ConDU alone, two tasks, in seconds."""
    from cl_driver.config import load_config
    from cl_driver.loop import run

    out = folder / "run"
    run(load_config(TINY_CONFIG).select_methods(["condu-model"]), out, progress=False)
    return out


def median_of(children: list[dict], key: str) -> float:
    return statistics.median(c[key] for c in children)


def measure(run: Path, *, batch: int, repeats: int, children: int) -> dict:
    modes = {}
    for mode in MODES:
        argv = ["-m", "benchmarks.predict", "--child", mode, "--run", str(run), "--batch", str(batch),
                "--repeats", str(repeats)]
        runs = [run_child_measuring_rss(argv) for _ in range(children)]
        modes[mode] = {"children": runs, **{key: median_of(runs, key) for key in
                                             ("load_s", "cold_s", "warm_median_s", "self_peak_rss_bytes",
                                              "rss_after_load_bytes", "rss_after_imports_bytes", "experts_built")}}
        print(f"{mode}: warm batch {modes[mode]['warm_median_s'] * 1e3:.1f} ms, peak RSS "
              f"{modes[mode]['self_peak_rss_bytes'] / MIB:.0f} MiB", file=sys.stderr)
    return modes


def describe_run(run: Path) -> dict:
    """What was measured: the run's learned tasks, store, routing and model size."""
    from cl_driver import ConduCLIP

    model = ConduCLIP.from_run(run)
    return {"run": str(run), "tasks": model.tasks, "store": model.method.rescaler, "aggregate": model.aggregate,
            "top_k": model.top_k, "cache_size": model.config.evaluation.cache_size, "model": model.config.model,
            "parameters": sum(p.numel() for p in model.clip.model.parameters())}


def report(res: dict) -> str:
    run, rows = res["run"], []
    for mode, m in res["modes"].items():
        rows.append([mode, m["children"][0]["batch"], round(m["load_s"], 2), round(m["cold_s"] * 1e3, 1),
                     round(m["warm_median_s"] * 1e3, 1), round(m["warm_median_s"] * 1e3 / m["children"][0]["batch"], 2),
                     round(m["self_peak_rss_bytes"] / MIB), round(m["rss_after_load_bytes"] / MIB),
                     round(m["rss_after_imports_bytes"] / MIB), int(m["experts_built"])])
    table = markdown_table(["mode", "images", "load s", "cold batch ms", "warm batch ms", "warm ms / image",
                            "peak RSS MiB", "RSS after load MiB", "RSS after imports MiB", "experts built"], rows)
    machine = res["machine"]
    return "\n".join([
        "# Predicting with a run folder's continual model", "",
        f"Command: `{res['command']}`. Run `{run['run']}`: {len(run['tasks'])} learned tasks "
        f"({', '.join(run['tasks'])}), store `{run['store']}`, aggregate `{run['aggregate']}`, K = {run['top_k']}, "
        f"CLIP of {run['parameters'] / 1e6:.1f}M parameters; experts kept in memory up to {run['cache_size']}.", "",
        f"Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, torch {machine['torch']} with "
        f"{machine['torch_threads']} threads, load average {machine['load_average']} (others share it).", "",
        table, "",
        f"Medians of {res['repeats']} warm batches a child, then over {res['children']} child processes. Cold: "
        "the first batch after loading, which rebuilds each expert an image chooses from the store and encodes "
        "the label set's prompts with each model. Warm: the same batch again, experts and text classifiers "
        "cached. Peak RSS is the child's own (VmHWM). RSS after imports: Python, torch, transformers' hub "
        "utilities and cl_driver; loading adds transformers' CLIP code, the model and theta0's weights; the cold "
        "batch adds the experts it rebuilt and its activations.", ""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.predict", description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None, help=f"a run folder (default {DEMO_RUN.relative_to(ROOT)}; quick: a tiny "
                   "run made on the spot)")
    p.add_argument("--batch", type=int, default=None, help="images per batch (default 32, quick 8)")
    p.add_argument("--repeats", type=int, default=None, help="warm batches timed per child (default 9, quick 3)")
    p.add_argument("--children", type=int, default=None, help="child processes per mode (default 3, quick 1)")
    p.add_argument("--quick", action="store_true", help="a tiny run and few repeats (with --results-dir)")
    p.add_argument("--results-dir", default=None, help="results folder (default benchmarks/results; required "
                   "with --quick)")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.run, args.child, args.batch, args.repeats)))
        return 0
    out = results_folder(p, args.results_dir, quick=args.quick)
    batch = args.batch or (8 if args.quick else 32)
    repeats = args.repeats or (3 if args.quick else 9)
    children = args.children or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory(prefix="condu-predict-") as scratch:
        if args.run is None and args.quick:
            run = tiny_run(Path(scratch))
        else:
            run = Path(args.run) if args.run else DEMO_RUN
            if not (run / "state.json").is_file():
                p.error(f"{run}: no such run; make it with `condu-cl demo` (about a minute), or give --run")
        res = {"command": " ".join(["python -m benchmarks.predict", *(sys.argv[1:] if argv is None else argv)]),
               "quick": args.quick, "batch": batch, "repeats": repeats, "children": children,
               "run": describe_run(run), "modes": measure(run, batch=batch, repeats=repeats, children=children),
               "machine": machine_info()}
    write_results(NAME, res, report(res), out_dir=out)
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
