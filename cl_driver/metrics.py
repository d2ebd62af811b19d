"""MTIL metrics from the accuracy matrix, and their JSON, markdown and heat-map forms.

A[i, j] is the accuracy on task j after training step i (0-based here, 1-based in the paper):
    Transfer = mean over j >= 2 of (mean over i < j of A[i, j])   zero-shot on tasks not yet learned
    Average  = mean over j of (mean over i of A[i, j])
    Last     = mean over j of A[T, j]
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .config import default_method_name

METRICS = ("transfer", "average", "last")


def _matrix(accuracy) -> torch.Tensor:
    matrix = torch.as_tensor(accuracy, dtype=torch.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"accuracy matrix must be square (T, T), got shape {tuple(matrix.shape)}")
    return matrix


def transfer(accuracy) -> float:
    """Mean over columns j >= 2 of the mean of the entries above the diagonal; NaN for T = 1."""
    matrix = _matrix(accuracy)
    columns = [matrix[:j, j].mean() for j in range(1, matrix.shape[0])]
    return float(torch.stack(columns).mean()) if columns else math.nan


def average(accuracy) -> float:
    """Mean over columns of the column means (every step, every task)."""
    return float(_matrix(accuracy).mean(dim=0).mean())


def last(accuracy) -> float:
    """Mean of the last row: every task after the final step."""
    return float(_matrix(accuracy)[-1].mean())


def summarize(accuracy) -> dict[str, float]:
    return {"transfer": transfer(accuracy), "average": average(accuracy), "last": last(accuracy)}


def _fmt(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.1f}"


def markdown_table(summaries: Mapping[str, Mapping[str, float]], labels: Mapping[str, str] | None = None) -> str:
    """| Method | Transfer | Average | Last | with one row per method, in the given order."""
    lines = ["| Method | Transfer | Average | Last |", "|---|---:|---:|---:|"]
    for method, values in summaries.items():
        label = (labels or {}).get(method, method)
        lines.append(f"| {label} | " + " | ".join(_fmt(values[m]) for m in METRICS) + " |")
    return "\n".join(lines) + "\n"


KIND_LABELS = {
    "zero_shot": "zero-shot",
    "sequential": "sequential fine-tuning",
    "task_arithmetic": "continual task arithmetic",
    "magmax": "MagMax",
    "individual": "individual experts (upper bound)",
}


def method_label(name: str, method: Mapping | None) -> str:
    """A method as people say it ("ConDU, model rescaler"); the config's name follows when the
    config gave it one of its own."""
    if not method:
        return name
    if method["kind"] == "condu":
        label = f"ConDU{' task-agnostic' if method.get('agnostic') else ''}, {method['rescaler']} rescaler"
        label += "".join(f", {part}" for part in (method.get("aggregate") and f"{method['aggregate']} aggregation",
                                                   method.get("top_k") and f"top {method['top_k']}") if part)
    else:
        label = KIND_LABELS[method["kind"]]
    return label if name == default_method_name(method) else f"{label} ({name})"


def summary_table(results: Mapping) -> str:
    """The Transfer / Average / Last table of a run, saying what the numbers are and which config ran."""
    labels = {name: method_label(name, results.get("methods", {}).get(name)) for name in results["summary"]}
    config = results.get("config_file", "not recorded")
    return (f"Accuracy in % on each task's test set (MTIL's Transfer / Average / Last); config: {config}\n\n"
            + markdown_table(results["summary"], labels))


def matrix_table(accuracy, tasks: Sequence[str]) -> str:
    """The accuracy matrix as markdown: rows are steps, columns tasks."""
    matrix = _matrix(accuracy)
    lines = ["| after \\ on | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for i, row in enumerate(matrix.tolist()):
        lines.append(f"| {i + 1}. {tasks[i]} | " + " | ".join(f"{v:.1f}" for v in row) + " |")
    return "\n".join(lines) + "\n"


def heatmap(accuracy, tasks: Sequence[str], path: str | os.PathLike, *, title: str = "") -> Path:
    """Write a PNG of the matrix with each cell's value (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = _matrix(accuracy).numpy()
    size = 1.0 + 0.55 * len(tasks)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(matrix, vmin=0, vmax=100, cmap="viridis")
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), [f"after {t}" for t in tasks])
    for (i, j), value in zip(((i, j) for i in range(len(tasks)) for j in range(len(tasks))), matrix.flatten()):
        ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7, color="white" if value < 60 else "black")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    path = Path(path)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
