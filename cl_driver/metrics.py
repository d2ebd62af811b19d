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
    "continual_ties": "continual TIES",
    "opcm": "OPCM",
    "zscl": "ZSCL",
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
    """The Transfer / Average / Last table of a run, saying what the numbers are and which config ran,
    and under it what the metrics mean and what this run's rows show."""
    labels = {name: method_label(name, results.get("methods", {}).get(name)) for name in results["summary"]}
    config = results.get("config_file", "not recorded")
    return (f"Accuracy in % on each task's test set (MTIL's Transfer / Average / Last); config: {config}\n\n"
            + markdown_table(results["summary"], labels) + "\n" + DEFINITIONS + "\n"
            + "".join(f"- {line}\n" for line in findings(results, labels)))


def findings(results: Mapping, labels: Mapping[str, str]) -> list[str]:
    """What this run's rows show, each a line computed from its numbers; only rows the run has."""
    summaries, methods = results["summary"], results.get("methods", {})
    lines = [leaders_line(summaries, methods, labels), transfer_line(summaries, methods, labels),
             *agnostic_lines(summaries, methods, labels, results.get("routing_top1"))]
    return [line for line in lines if line]


# ---------------------------------------------------------------- what the table says

DEFINITIONS = ("With A[i, j] the accuracy on task j after learning task i: Transfer = mean of A on tasks not yet "
               "learned (zero-shot transfer), Average = mean of A over all steps and tasks, Last = mean of A after "
               "the last task. MTIL: Multi-domain Task-Incremental Learning, tasks of different domains learned one "
               "after another.")
UPPER_BOUND = "individual"  # one fine-tuned model per task: a bound, not a competitor


def shown(value: float) -> float:
    """A value as the table prints it; gaps are taken between these, so they add up on screen."""
    return round(float(value), 1)


def _kind(methods: Mapping, name: str) -> str | None:
    return (methods.get(name) or {}).get("kind")


def _condu(methods: Mapping, name: str, *, agnostic: bool) -> bool:
    method = methods.get(name) or {}
    return method.get("kind") == "condu" and bool(method.get("agnostic")) == agnostic


def ranked(summaries: Mapping, methods: Mapping, metric: str) -> list[tuple[str, float]]:
    """(method, shown value) on `metric`, best first, ties in the table's order; the upper bound
    and undefined values left out."""
    rows = [(name, shown(values[metric])) for name, values in summaries.items()
            if _kind(methods, name) != UPPER_BOUND and not math.isnan(values[metric])]
    return sorted(rows, key=lambda row: -row[1])


def _relation(value: float, reference: float) -> str:
    """'1.2 above', '0.8 below' or 'equal to', between two shown values."""
    gap = value - reference
    return "equal to" if abs(gap) < 0.05 else f"{abs(gap):.1f} {'above' if gap > 0 else 'below'}"


def _against(value: float, references: list[tuple[str, float]]) -> str:
    """' (1.2 above zero-shot, 15.3 below X)' for the references there are; '' for none."""
    text = ", ".join(f"{_relation(value, reference)} {who}" for who, reference in references)
    return f" ({text})" if text else ""


def lead_phrase(rows: list[tuple[str, float]], labels: Mapping[str, str], metric: str) -> str | None:
    """Who leads a ranking and by how much over the next; None with fewer than two methods."""
    if len(rows) < 2:
        return None
    best = rows[0][1]
    leaders = [labels[name] for name, value in rows if abs(value - best) < 0.05]
    rest = [(name, value) for name, value in rows if abs(value - best) >= 0.05]
    if not rest:
        return f"{metric}: all {len(rows)} methods tie at {best:.1f}"
    who = f"{leaders[0]} leads with" if len(leaders) == 1 else f"{' and '.join(leaders)} tie at"
    name, value = rest[0]
    return f"{metric}: {who} {best:.1f}, {best - value:.1f} above {labels[name]} ({value:.1f})"


def leaders_line(summaries: Mapping, methods: Mapping, labels: Mapping[str, str]) -> str | None:
    """The leader on Average and on Last, the individual experts (the upper bound) not ranked."""
    phrases = [p for p in (lead_phrase(ranked(summaries, methods, m), labels, m.capitalize())
                           for m in ("average", "last")) if p]
    if not phrases:
        return None
    text = "; ".join(phrases)
    if any(_kind(methods, name) == UPPER_BOUND for name in summaries):
        text += "; individual experts (the upper bound: one fine-tuned model per task) are not ranked"
    return text + "."


def transfer_line(summaries: Mapping, methods: Mapping, labels: Mapping[str, str]) -> str | None:
    """ConDU's Transfer against zero-shot's, rows of one value said together."""
    zero = next((n for n in summaries if _kind(methods, n) == "zero_shot"), None)
    condu = [n for n in summaries if _kind(methods, n) == "condu"]
    if zero is None or not condu or math.isnan(summaries[zero]["transfer"]):
        return None
    reference, groups = shown(summaries[zero]["transfer"]), {}
    for name in condu:
        groups.setdefault(shown(summaries[name]["transfer"]), []).append(labels[name])
    parts = [f"{'every ConDU row' if len(groups) == 1 and len(names) > 1 else ' and '.join(names)} {value:.1f}"
             f"{_against(value, [('zero-shot', reference)])}" for value, names in groups.items()]
    return (f"Transfer against zero-shot's {reference:.1f}: {'; '.join(parts)}. On a task not yet learned ConDU "
            "averages zero-shot's logits with those of the learned experts its router picks, so the gap is what "
            "those experts add there.")


def _identity_twin(methods: Mapping, name: str, candidates) -> str | None:
    """The ConDU row with task identity that differs from `name` in nothing else (rescaler, routing)."""
    def setting(n: str) -> dict:
        return {k: v for k, v in (methods.get(n) or {}).items() if k not in ("name", "agnostic")}

    return next((c for c in candidates if _condu(methods, c, agnostic=False) and setting(c) == setting(name)), None)


def routing_share(routing: Mapping | None, name: str) -> float | None:
    """After the last task, the mean over seen tasks of the % of test images routed first to their own expert."""
    hits = [v for v in ((routing or {}).get(name) or [[]])[-1] if v is not None]
    return sum(hits) / len(hits) if hits else None


def agnostic_lines(summaries: Mapping, methods: Mapping, labels: Mapping[str, str],
                   routing: Mapping | None = None) -> list[str]:
    """Each task-agnostic ConDU row against zero-shot and ConDU with task identity, and its routing."""
    zero = next((n for n in summaries if _kind(methods, n) == "zero_shot"), None)
    lines = []
    for name in (n for n in summaries if _condu(methods, n, agnostic=True)):
        twin = _identity_twin(methods, name, summaries)
        parts = []
        for metric in ("average", "last"):
            value = shown(summaries[name][metric])
            references = ([("zero-shot", shown(summaries[zero][metric]))] if zero else []) + (
                [(f"{labels[twin]} with task identity", shown(summaries[twin][metric]))] if twin else [])
            parts.append(f"{metric.capitalize()} {value:.1f}{_against(value, references)}")
        line = f"{labels[name]} (no task identity: each test image is routed by its features): {'; '.join(parts)}."
        share = routing_share(routing, name)
        if share is not None:
            line += (f" After the last task its router puts a seen task's own expert first for {share:.0f}% of "
                     "that task's test images.")
        lines.append(line)
    return lines


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
