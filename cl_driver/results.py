"""A run's results: the JSON record, the markdown page and the heat maps, from the loop's state.

    results.json   matrices, Transfer / Average / Last, fidelity, routing, gates, store sizes, time
    results.md     the same as tables
    heatmap-<method>.png

`condu-cl report DIR` rebuilds the last two from results.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from fusion import atomic_write

from . import metrics
from .config import RunConfig

if TYPE_CHECKING:
    from .state import RunState


def write_json(data: dict, path: Path) -> None:
    """JSON written atomically (fusion.atomic_write: a reader sees the old file or the new one)."""
    atomic_write(path, json.dumps(data, indent=1))


def fidelity_summary(fidelity: dict, tasks: list[str]) -> dict:
    """Per store: each task's fidelity right after its own step and after the last step."""
    summary = {}
    for rescaler, per_step in fidelity.items():
        summary[rescaler] = [{"task": tasks[i], "own_step": per_step[i][i], "last_step": per_step[-1][i]}
                             for i in range(len(per_step))]
    return summary


def cost_summary(seconds: dict) -> dict:
    """Total seconds of fine-tuning, of each store's decouple-unify steps, and their ratio."""
    train = sum(v for k, v in seconds.items() if k.startswith("train/individual/"))
    stores = {}
    for key, value in seconds.items():
        if key.startswith("store/"):
            stores[key.split("/")[1]] = stores.get(key.split("/")[1], 0.0) + value
    return {"train_from_theta0_s": train, "store_s": stores,
            "store_over_train": {k: (v / train if train else None) for k, v in stores.items()}}


def build_results(config: RunConfig, state: RunState, tasks: list[str]) -> dict:
    matrices = dict(state.rows)
    return {
        "config_file": config.path,
        "tasks": tasks,
        "methods": {m.name: m.model_dump(mode="json") for m in config.methods},
        "matrices": matrices,
        "summary": {name: metrics.summarize(rows) for name, rows in matrices.items()},
        "fidelity": fidelity_summary(state.fidelity, tasks),
        "routing_top1": state.routing,
        "gates": state.gates,
        "stores": state.stores,
        "seconds": state.seconds,
        "cost": cost_summary(state.seconds),
        "config": state.config,
    }


def fidelity_table(fidelity: dict) -> str:
    lines = ["| store | task | cosine (own step) | rel. L2 (own step) | cosine (last) | rel. L2 (last) |",
             "|---|---|---:|---:|---:|---:|"]
    for rescaler, rows in fidelity.items():
        for r in rows:
            own, end = r["own_step"], r["last_step"]
            lines.append(f"| {rescaler} | {r['task']} | {own['cosine']:.4f} | {own['rel_l2']:.4f} | "
                         f"{end['cosine']:.4f} | {end['rel_l2']:.4f} |")
    return "\n".join(lines) + "\n"


def store_table(stores: dict) -> str:
    lines = ["| store | tasks | base MB | store MB (unified + triggers + private) | T separate models MB | savings |",
             "|---|---:|---:|---:|---:|---:|"]
    for rescaler, s in stores.items():
        lines.append(f"| {rescaler} | {s['tasks']} | {s['base_bytes'] / 1e6:.2f} | {s['total'] / 1e6:.2f} | "
                     f"{s['separate_checkpoints_bytes'] / 1e6:.2f} | {s['savings']:.2f}x |")
    return "\n".join(lines) + "\n"


def routing_table(routing: dict, tasks: list[str]) -> str:
    lines = ["| method | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for name, rows in routing.items():
        lines.append(f"| {name} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in rows[-1]) + " |")
    return "\n".join(lines) + "\n"


def results_markdown(results: dict) -> str:
    parts = ["# Continual learning results\n\n", metrics.summary_table(results)]
    for name, matrix in results["matrices"].items():
        label = metrics.method_label(name, results["methods"].get(name))
        parts.append(f"\n## {label} (`{name}`): accuracy matrix in % (rows: after step i; columns: task j)\n")
        parts.append(metrics.matrix_table(matrix, results["tasks"]))
    if results["fidelity"]:
        parts.append("\n## Reconstruction fidelity of the rebuilt deltas\n")
        parts.append(fidelity_table(results["fidelity"]))
    if results.get("stores"):
        parts.append("\n## Store size\n")
        parts.append(store_table(results["stores"]))
    if results.get("routing_top1"):
        parts.append("\n## Routing: % of a seen task's test images whose top expert is that task (last step)\n")
        parts.append(routing_table(results["routing_top1"], results["tasks"]))
    return "".join(parts)


def write_outputs(results: dict, root: str | os.PathLike) -> str:
    """results.json, results.md and one heat map per method; returns the summary table."""
    root = Path(root)
    write_json(results, root / "results.json")
    atomic_write(root / "results.md", results_markdown(results))
    for name, matrix in results["matrices"].items():
        metrics.heatmap(matrix, results["tasks"], root / f"heatmap-{name}.png",
                        title=metrics.method_label(name, results["methods"].get(name)))
    return metrics.summary_table(results)


def report(root: str | os.PathLike) -> str:
    """Rebuild the table, markdown and plots from a run folder's saved results."""
    root = Path(root)
    if not (root / "results.json").exists():
        raise ValueError(f"{root}: no results.json; finish the run with `condu-cl run` first")
    return write_outputs(json.loads((root / "results.json").read_text()), root)
