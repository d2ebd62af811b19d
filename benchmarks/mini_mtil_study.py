"""When does ConDU keep zero-shot skill? A study on mini-MTIL across model size, fine-tuning
strength and aggregation, with the `gated` aggregate beside the official rule.

    python -m benchmarks.mini_mtil_study                  # every run not yet done, then the report
    python -m benchmarks.mini_mtil_study --only grid      # a slice: grid | seed | order | cli
    python -m benchmarks.mini_mtil_study --runs M-lr1e-04,S-lr1e-04   # named runs
    python -m benchmarks.mini_mtil_study --list           # the plan, with what is done
    python -m benchmarks.mini_mtil_study --report-only    # rewrite the results from the run folders
    python -m benchmarks.mini_mtil_study --quick --results-dir /tmp/study   # one tiny run, then its report

Each run is the continual loop of `cl_driver/configs/mini_mtil.yaml` (10 tasks, 200 test images
each) with zero-shot, the individual experts and ConDU (`model` rescaler) on one mini CLIP, one
fine-tuning lr and one task order, in its own child process and run folder (runs/study/ID/,
with the config.yaml it ran). An interrupted run resumes after its last finished task; a
finished one is never run again. ConDU's routed predictions are computed once per step for the
top 4 experts and combined under every aggregation of the study (`StudyRun`): mean and weighted
with K = 1, 2, 4 (top-1 and top-2 are the first slots of top-4) and gated with K = 4. The `cli`
slice runs `condu-cl run ... --aggregate gated` itself on the full config and on the held-out
order. Results: benchmarks/results/mini_mtil_study.{json,md} and three plots.
`--quick` runs the plan's smallest model on benchmarks/configs/mini_mtil_tiny.yaml (two tasks, a
few steps) in a temporary folder, through the same child process, collection and report.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks._common import RESULTS_DIR, ROOT, TINY_CONFIG, results_folder
from cl_driver.loop import ContinualRun

NAME = "mini_mtil_study"
RUNS_DIR = ROOT / "runs" / "study"
BASE_CONFIG = ROOT / "cl_driver" / "configs" / "mini_mtil.yaml"
ORDER2_CONFIG = ROOT / "benchmarks" / "configs" / "mini_mtil_order2.yaml"
DESIGN_RECORD = RESULTS_DIR / f"{NAME}_design.json"  # the gated rule's first design, kept as it measured

# Mini CLIPs of one recipe (cl_driver/mini/pretrain.py, 5000 steps of batch 64, seed 0); only the
# widths differ. The shipped one is M; S is about 4x smaller, L the largest that one CPU hour allows.
WIDTHS = {"S": "mini-clip-small", "M": "mini-clip", "L": "mini-clip-large"}
# Fine-tuning strength: lr, and iterations doubled for each lower lr so the experts still learn;
# warmup stays 10 % of the iterations.
STRENGTHS = {1e-4: 200, 3e-5: 400, 1e-5: 800}
AGGREGATIONS = [("mean", 1), ("mean", 2), ("mean", 4), ("weighted", 1), ("weighted", 2), ("weighted", 4),
                ("gated", 4)]
OFFICIAL = ("mean", 4)
CONDU = "condu-model"  # the one ConDU method of every run: the paper's whole-model rescaler
METHODS = ["zero_shot", "individual", {"kind": "condu", "rescaler": "model"}]


def variant_name(aggregate: str, k: int) -> str:
    return f"condu-{aggregate}-k{k}"


@dataclass(frozen=True)
class RunSpec:
    """One continual run of the study."""

    width: str
    lr: float
    iterations: int
    order: str = "I"
    seed: int = 0
    slice: str = "grid"

    @property
    def id(self) -> str:
        extra = ("" if self.order == "I" else f"-order{self.order}") + ("" if self.seed == 0 else f"-seed{self.seed}")
        return f"{self.width}-lr{self.lr:.0e}{extra}"


def plan() -> list[RunSpec]:
    """Every run of the study, in the order they are reported."""
    grid = [RunSpec(w, lr, it) for w in WIDTHS for lr, it in STRENGTHS.items()]
    return grid + [RunSpec("M", 1e-4, 200, seed=1, slice="seed"), RunSpec("M", 1e-4, 200, order="II", slice="order")]


def quick_plan() -> list[RunSpec]:
    """The quick mode's one run: the smallest model, a few steps (on the tiny config's two tasks)."""
    return [RunSpec("S", 1e-4, 4)]


@dataclass(frozen=True)
class CliRun:
    """`condu-cl run CONFIG --aggregate gated` on a config shipped with the project."""

    id: str
    config: Path
    order: str

    def command(self, out: Path) -> list[str]:
        """Run from the checkout's root, with paths relative to it."""
        return [sys.executable, "-m", "cl_driver.cli", "run", relative(self.config), "--methods",
                "zero_shot,individual," + CONDU, "--aggregate", "gated", "--out", relative(out), "--no-progress",
                "--threads", "1"]


def relative(path: Path) -> str:
    return os.path.relpath(path, ROOT)


CLI_RUNS = [CliRun("cli-gated-full", BASE_CONFIG, "I"), CliRun("cli-gated-order2", ORDER2_CONFIG, "II")]


# --- one run: its config and the loop ------------------------------------------------------------

def read_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def run_config(spec: RunSpec, *, quick: bool = False) -> dict:
    """The full mini-MTIL config (quick: the tiny one) with this run's model, strength, seed, task order
    and methods."""
    raw = read_yaml(TINY_CONFIG if quick else BASE_CONFIG)
    raw["model"] = WIDTHS[spec.width]
    raw["training"].update(lr=spec.lr, iterations=spec.iterations, warmup_steps=spec.iterations // 10, seed=spec.seed)
    raw["evaluation"].update(top_k=max(k for _, k in AGGREGATIONS), aggregate="mean")
    raw["methods"] = METHODS
    if spec.order == "II":
        raw["tasks"] = read_yaml(ORDER2_CONFIG)["tasks"]
    return raw


class StudyRun(ContinualRun):
    """The loop, with ConDU's unseen tasks combined under every aggregation of the study.

    One routing pass a step: the top-K experts (K the largest of the study), each run once on the
    images that chose it. Each aggregation is a weight per slot on that pass: mean K = (1 for the
    first K slots), weighted K = (similarity for the first K slots), gated = (1 where the expert
    passes its calibrated gate), all combined by `combine_routed`.
    """

    def evaluate(self, method, i):
        if method.config.name != CONDU:
            return super().evaluate(method, i)
        from cl_driver.gating import recorded

        began = time.perf_counter()
        rows, joins, thresholds = study_rows(self.evaluation, method.config, i)
        for name, row in rows.items():
            self.state.rows.setdefault(name, []).append(row)
        self.state.rows[CONDU].append(rows[variant_name(*OFFICIAL)])
        self.state.gates.setdefault(CONDU, []).append(recorded(thresholds))
        self.state.records.setdefault("gate_joins", []).append(joins)
        self.state.seconds[f"eval/{CONDU}/{i + 1}"] = time.perf_counter() - began

    def finish(self) -> dict:
        from cl_driver.results import build_results, write_outputs

        results = build_results(self.config, self.state, [s.name for s in self.specs])
        results["gate_joins"] = self.state.records.get("gate_joins", [])
        write_outputs(results, self.folder.root)
        return results


def study_rows(evaluation, method, i: int):
    """ConDU's row at step i under every aggregation of the study, from one routed pass; the step's
    gate counts and thresholds."""
    from cl_driver.inference import accuracy, combine_routed, experts_on_routes, route
    from cl_driver.stores import learned_prototypes

    store, tasks = evaluation.open_store(method.rescaler), len(evaluation.specs)
    routed, protos = list(range(i + 1, tasks)), learned_prototypes(store, i)
    top_k = method.top_k or evaluation.config.evaluation.top_k
    routes = {j: route(evaluation.data.base_eval(j)[1], protos, top_k) for j in routed}
    own = {}
    expert_logits = experts_on_routes(routes, evaluation.experts(store, method, i, own), visit=range(i + 1))
    thresholds = evaluation.gate_thresholds(store, method, i)
    rows = {}
    for aggregate, k in AGGREGATIONS:
        row = dict(own)
        for j in routed:
            logits0, _, labels = evaluation.data.base_eval(j)
            selection, values = routes[j]
            weights = slot_weights(selection, values, aggregate, k, thresholds)
            row[j] = accuracy(combine_routed(logits0, selection, weights, expert_logits[j], "weighted"), labels)
        rows[variant_name(aggregate, k)] = [row[j] for j in range(tasks)]
    return rows, gate_joins(routes, thresholds), thresholds


def gate_joins(routes: dict, thresholds) -> dict:
    """How many unseen test images of a step let at least one expert through the gated rule's gate."""
    from cl_driver.gating import passes

    joined = [passes(selection, values, thresholds).any(dim=1) for selection, values in routes.values()]
    return {"images": sum(len(j) for j in joined), "joined": int(sum(j.sum() for j in joined))}


def slot_weights(selection, values, aggregate: str, k: int, thresholds):
    """(N, K) selected experts and similarities -> (N, K) non-negative weights of one aggregation
    (theta0 weighs 1); `thresholds` are the gated rule's per-expert taus."""
    from cl_driver.gating import passes

    first_k = (values.new_ones(values.shape[1]).cumsum(0) <= k).to(values.dtype)  # (K,)
    if aggregate == "mean":
        return values.new_ones(values.shape) * first_k
    if aggregate == "weighted":
        return values.clamp(min=0) * first_k
    return passes(selection, values, thresholds).to(values.dtype) * first_k  # gated


def child(run_id: str, *, runs_dir: Path | None = None, quick: bool = False) -> None:
    """Run (or resume) one run of the plan (quick: of the quick plan) in this process; writes its results.json."""
    import torch
    import yaml

    from cl_driver.config import parse_config

    torch.set_num_threads(1)
    spec = {s.id: s for s in (quick_plan() if quick else plan())}[run_id]
    out = (runs_dir or RUNS_DIR) / spec.id
    out.mkdir(parents=True, exist_ok=True)
    raw = run_config(spec, quick=quick)
    (out / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    config = parse_config(raw, where=str(out / "config.yaml"), base_dir=BASE_CONFIG.parent)
    StudyRun(config, out, progress=False).run()


# --- running many runs, two at a time -----------------------------------------------------------

def results_path(run_id: str, runs_dir: Path | None = None) -> Path:
    return (runs_dir or RUNS_DIR) / run_id / "results.json"


def run_children(jobs: list[tuple[str, list[str]]], parallel: int, timings: dict) -> None:
    """Run (id, command) children, `parallel` at a time; record each one's wall and CPU seconds."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    pending, running = list(jobs), {}
    while pending or running:
        while pending and len(running) < parallel:
            run_id, command = pending.pop(0)
            print(f"start {run_id}: {' '.join(command[1:])}", flush=True)
            running[subprocess.Popen(command, cwd=ROOT, env=env).pid] = (run_id, time.perf_counter())
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        run_id, began = running.pop(pid)
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(f"{run_id} failed (exit {os.waitstatus_to_exitcode(status)}); rerun the same command "
                             "to resume it")
        timings[run_id] = {"wall_s": time.perf_counter() - began, "cpu_s": usage.ru_utime + usage.ru_stime}
        print(f"done {run_id}: {timings[run_id]['cpu_s'] / 60:.1f} CPU-min", flush=True)


def pending_jobs(specs: list[RunSpec], cli: list[CliRun], *, runs_dir: Path | None = None,
                 quick: bool = False) -> list[tuple[str, list[str]]]:
    """The runs without results yet, the largest model first (the longest job starts first); each
    child is this module again, run from the repository root."""
    runs_dir = runs_dir or RUNS_DIR
    order = {w: i for i, w in enumerate(reversed(list(WIDTHS)))}
    todo = sorted((s for s in specs if not results_path(s.id, runs_dir).exists()),
                  key=lambda s: (order[s.width], -s.iterations))
    child_args = ["--runs-dir", str(runs_dir)] + (["--quick"] if quick else [])
    jobs = [(s.id, [sys.executable, "-m", f"benchmarks.{NAME}", "--child", s.id, *child_args]) for s in todo]
    return jobs + [(c.id, c.command(runs_dir / c.id)) for c in cli if not results_path(c.id, runs_dir).exists()]


# --- collecting ----------------------------------------------------------------------------------

def summary_rows(spec: dict, results: dict) -> list[dict]:
    """One row per method and aggregation of a finished run, with the run's settings as fields."""
    s, rows = results["summary"], []

    def add(method, aggregation, k, name):
        rows.append({"run": spec["id"], "method": method, "aggregation": aggregation, "K": k, **spec["fields"],
                     **{m: s[name][m] for m in ("transfer", "average", "last")}})

    add("zero-shot", None, None, "zero_shot")
    add("individual experts", None, None, "individual")
    for aggregate, k in AGGREGATIONS:
        name = variant_name(aggregate, k)
        if name in s:
            add("ConDU", aggregate, k, name)
    if CONDU in s and variant_name(*OFFICIAL) not in s:  # a plain loop run (the CLI): its own rule
        add("ConDU", results["config"]["evaluation"]["aggregate"], results["config"]["evaluation"]["top_k"], CONDU)
    return rows


def fidelity_rows(spec: dict, results: dict) -> list[dict]:
    """Per task: the rebuilt delta's cosine and relative error, and expert minus rebuilt accuracy,
    right after the task's own step and after the last step."""
    tasks, rows = results["tasks"], []
    expert, rebuilt = results["matrices"]["individual"], results["matrices"][CONDU]
    for j, entry in enumerate(results["fidelity"]["model"]):
        own, last = entry["own_step"], entry["last_step"]
        rows.append({"run": spec["id"], **spec["fields"], "task": tasks[j],
                     "cosine_own": own["cosine"], "rel_l2_own": own["rel_l2"],
                     "cosine_last": last["cosine"], "rel_l2_last": last["rel_l2"],
                     "gap_own": expert[j][j] - rebuilt[j][j], "gap_last": expert[-1][j] - rebuilt[-1][j]})
    return rows


def model_records() -> dict:
    """Each width's pre-training record: parameters, steps, CPU and wall minutes, zero-shot."""
    out = {}
    for width, folder in WIDTHS.items():
        path = ROOT / "cl_driver" / "assets" / folder / "PRETRAIN.json"
        if path.exists():
            r = json.loads(path.read_text())
            out[width] = {"folder": f"cl_driver/assets/{folder}", "parameters": r["parameters"],
                          "config": r["config_summary"], "steps": r["steps_done"], "minutes": r["minutes"],
                          "cpu_minutes": r.get("cpu_minutes"), "final_loss": r["final_loss"],
                          "mean_zero_shot": 100 * sum(r["zero_shot"].values()) / len(r["zero_shot"]),
                          "bytes": (path.parent / "model.safetensors").stat().st_size, "command": r["command"]}
    return out


def spec_fields(spec: RunSpec, params: dict) -> dict:
    return {"width": spec.width, "parameters": params.get(spec.width, {}).get("parameters"), "lr": spec.lr,
            "iterations": spec.iterations, "order": spec.order, "seed": spec.seed, "slice": spec.slice}


def collect(timings: dict, *, runs_dir: Path | None = None, results_dir: Path = RESULTS_DIR,
            quick: bool = False) -> dict:
    """Everything finished under runs/study (quick: the quick plan's runs under runs_dir) into one
    record (runs without results are left out); earlier timings come from results_dir's record."""
    runs_dir = runs_dir or RUNS_DIR
    models = model_records()
    saved = results_dir / f"{NAME}.json"
    old = json.loads(saved.read_text()) if saved.exists() else {}
    runs, rows, fidelity = {}, [], []
    if quick:
        entries = [(s.id, spec_fields(s, models), f"python -m benchmarks.{NAME} --quick") for s in quick_plan()]
    else:
        entries = [(s.id, spec_fields(s, models), f"python -m benchmarks.{NAME} --runs {s.id}") for s in plan()]
        entries += [(c.id, spec_fields(RunSpec("M", 1e-4, 200, order=c.order, slice="cli"), models),
                     "condu-cl " + " ".join(c.command(runs_dir / c.id)[3:]))
                    for c in CLI_RUNS]
    for run_id, fields, command in entries:
        if not results_path(run_id, runs_dir).exists():
            continue
        results = json.loads(results_path(run_id, runs_dir).read_text())
        spec = {"id": run_id, "fields": fields}
        timing = timings.get(run_id) or old.get("runs", {}).get(run_id, {}).get("timing")
        runs[run_id] = {**fields, "command": command, "timing": timing, "tasks": results["tasks"],
                        "matrices": results["matrices"], "gates": results.get("gates", {}),
                        "gate_joins": results.get("gate_joins", []),
                        "fidelity": results["fidelity"], "seconds": results["seconds"]}
        rows += summary_rows(spec, results)
        fidelity += fidelity_rows(spec, results)
    record = {"name": NAME, "quick": quick, "machine": f"{platform.machine()} CPU ({os.cpu_count()} cores, shared), "
                                      f"Python {platform.python_version()}",
              "plan": {"widths": WIDTHS, "strengths": {f"{lr:.0e}": it for lr, it in STRENGTHS.items()},
                       "aggregations": AGGREGATIONS, "official": OFFICIAL, "seeds": "training and data seed 0 "
                       "(one run with seed 1); pre-training seed 0"},
              "models": models, "runs": runs, "rows": rows, "fidelity": fidelity,
              "design_history": json.loads(DESIGN_RECORD.read_text()) if DESIGN_RECORD.exists() else None}
    record["not_run"] = [run_id for run_id, _, _ in entries if run_id not in runs]
    record["claims"] = check_claims(record)
    return record


# --- the claims ----------------------------------------------------------------------------------

def row(record: dict, run: str, method: str, aggregation=None, k=None) -> dict | None:
    for r in record["rows"]:
        if r["run"] == run and r["method"] == method and r["aggregation"] == aggregation and r["K"] == k:
            return r
    return None


def grid_runs(record: dict, lr: float | None = None, width: str | None = None) -> list[str]:
    return [i for i, r in record["runs"].items() if r["slice"] == "grid"
            and (lr is None or r["lr"] == lr) and (width is None or r["width"] == width)]


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def spearman(x: list[float], y: list[float]) -> float:
    """Rank correlation (average ranks for ties)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for m in range(i, j + 1):
                r[order[m]] = (i + j) / 2
            i = j + 1
        return r
    rx, ry = ranks(x), ranks(y)
    mx, my = mean(rx), mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    norm = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / norm if norm else math.nan


def transfer_gap(record: dict, run: str, aggregation="mean", k=4) -> float:
    """ConDU's Transfer minus zero-shot's in one run (negative: below zero-shot)."""
    return row(record, run, "ConDU", aggregation, k)["transfer"] - row(record, run, "zero-shot")["transfer"]


def check_claims(record: dict) -> list[dict]:
    """Each question of the study as a claim, with the numbers behind it and whether it holds."""
    claims = []

    def claim(text, holds, numbers):
        claims.append({"claim": text, "holds": None if holds is None else bool(holds), "numbers": numbers})

    widths = [w for w in WIDTHS if grid_runs(record, 1e-4, w)]
    if len(widths) >= 2:
        by_width = {w: grid_runs(record, 1e-4, w)[0] for w in widths}
        gaps = {w: transfer_gap(record, r) for w, r in by_width.items()}
        claim("A larger model brings ConDU's Transfer closer to zero-shot's (official rule, lr 1e-4)",
              all(gaps[a] < gaps[b] for a, b in zip(widths, widths[1:])),
              ", ".join(f"{w} ({record['models'][w]['parameters'] / 1e6:.1f}M) {gaps[w]:+.1f}" for w in widths))
        cos = {w: mean(f["cosine_last"] for f in record["fidelity"] if f["run"] == r) for w, r in by_width.items()}
        claim("A larger model rebuilds its experts more faithfully (mean cosine after the last step, lr 1e-4)",
              all(cos[a] < cos[b] for a, b in zip(widths, widths[1:])),
              ", ".join(f"{w} {cos[w]:.3f}" for w in widths))
        last_gap = {w: row(record, r, "individual experts")["last"] - row(record, r, "ConDU", *OFFICIAL)["last"]
                    for w, r in by_width.items()}
        claim("A larger model brings ConDU's Last closer to the individual experts' (lr 1e-4)",
              all(last_gap[a] > last_gap[b] for a, b in zip(widths, widths[1:])),
              ", ".join(f"{w} {-last_gap[w]:+.1f}" for w in widths))
    for width in widths:
        runs = {record["runs"][r]["lr"]: r for r in grid_runs(record, width=width)}
        if len(runs) < 2:
            continue
        lrs = sorted(runs, reverse=True)
        gaps = {lr: transfer_gap(record, runs[lr]) for lr in lrs}
        experts = {lr: row(record, runs[lr], "individual experts")["last"] for lr in lrs}
        zero = row(record, runs[lrs[0]], "zero-shot")["last"]
        claim(f"{width}: a gentler fine-tune (lower lr, more iterations) brings ConDU's Transfer closer to zero-shot's",
              all(gaps[a] < gaps[b] for a, b in zip(lrs, lrs[1:])),
              ", ".join(f"lr {lr:.0e}: {gaps[lr]:+.1f} (experts' Last {experts[lr]:.1f}, zero-shot {zero:.1f})"
                        for lr in lrs))
    for width in widths:
        runs = {record["runs"][r]["lr"]: r for r in grid_runs(record, width=width)}
        if len(runs) < 2:
            continue
        lrs = sorted(runs, reverse=True)
        cos = {lr: mean(f["cosine_last"] for f in record["fidelity"] if f["run"] == runs[lr]) for lr in lrs}
        claim(f"{width}: a gentler fine-tune rebuilds the experts more faithfully (mean cosine, last step)",
              all(cos[a] < cos[b] for a, b in zip(lrs, lrs[1:])), ", ".join(f"lr {lr:.0e}: {cos[lr]:.3f}" for lr in lrs))
    runs = [r for r in grid_runs(record)]
    if runs:
        ks = sorted({k for a, k in AGGREGATIONS if a == "mean"})
        monotone = [r for r in runs if all(transfer_gap(record, r, "mean", a) > transfer_gap(record, r, "mean", b)
                                           for a, b in zip(ks, ks[1:]))]
        claim("Fewer experts keep more zero-shot skill: with the mean rule, Transfer falls as K grows (every grid run)",
              len(monotone) == len(runs), f"{len(monotone)} of {len(runs)} runs; K = {', '.join(map(str, ks))} "
              f"mean gap over the runs: " + ", ".join(f"{mean(transfer_gap(record, r, 'mean', k) for r in runs):+.1f}"
                                                      for k in ks))
        better = [(r, k) for r in runs for k in ks
                  if transfer_gap(record, r, "weighted", k) >= transfer_gap(record, r, "mean", k)]
        claim("Weighting by similarity keeps at least as much as the plain mean at the same K (every run and K > 1)",
              all((r, k) in better for r in runs for k in ks if k > 1),
              f"{len([b for b in better if b[1] > 1])} of {len(runs) * len([k for k in ks if k > 1])} (run, K > 1); "
              f"mean gain of weighted over mean at K = 4: "
              f"{mean(transfer_gap(record, r, 'weighted', 4) - transfer_gap(record, r, 'mean', 4) for r in runs):+.1f}")
    if "M-lr1e-04" in record["runs"] and "M-lr1e-04-seed1" in record["runs"]:
        a, b = transfer_gap(record, "M-lr1e-04"), transfer_gap(record, "M-lr1e-04-seed1")
        la = row(record, "M-lr1e-04", "ConDU", *OFFICIAL)["last"]
        lb = row(record, "M-lr1e-04-seed1", "ConDU", *OFFICIAL)["last"]
        claim("Seed noise (M, lr 1e-4; seed 1 draws other training batches, test and held-out images)", None,
              f"official Transfer - zero-shot: seed 0 {a:+.1f}, seed 1 {b:+.1f}; ConDU Last {la:.1f} vs {lb:.1f}")
    closest = max(((r, a, k) for r in grid_runs(record) for a, k in AGGREGATIONS if a != "gated"),
                  key=lambda t: transfer_gap(record, *t), default=None)
    if closest:
        r, a, k = closest
        claim("Some setting of the paper's rules (size, strength, mean or weighted, K) reaches zero-shot's Transfer",
              transfer_gap(record, r, a, k) >= 0,
              f"closest: {r}, {a} K = {k}: {transfer_gap(record, r, a, k):+.1f} "
              f"({row(record, r, 'ConDU', a, k)['transfer']:.1f} vs {row(record, r, 'zero-shot')['transfer']:.1f})")
    pairs = [(f["cosine_last"], f["gap_last"]) for f in record["fidelity"] if record["runs"][f["run"]]["slice"] == "grid"]
    if len(pairs) >= 5:
        rho = spearman([p[0] for p in pairs], [p[1] for p in pairs])
        claim("Tasks rebuilt at a lower cosine lose more accuracy against their expert (Spearman rho < -0.3, "
              "grid runs, last step)", rho < -0.3, f"rho = {rho:+.2f} over {len(pairs)} (run, task) pairs")
    for run in [r for r in record["runs"] if r in ("M-lr1e-04", "M-lr1e-04-orderII")] + \
               [r for r in record["runs"] if record["runs"][r]["slice"] == "cli"]:
        gated = row(record, run, "ConDU", "gated", 4)
        if gated is None:
            continue
        zero, official = row(record, run, "zero-shot"), row(record, run, "ConDU", *OFFICIAL)
        beside = f", official {official['transfer']:.1f} / {official['average']:.1f}" if official else ""
        entries = gated_entries(record, run)
        claim(f"{run} (order {record['runs'][run]['order']}): the gated rule's Transfer is at least zero-shot's",
              gated["transfer"] >= zero["transfer"] - 1e-9,
              f"gated {gated['transfer']:.1f} / {gated['average']:.1f} / {gated['last']:.1f} (Transfer / Average / "
              f"Last), zero-shot {zero['transfer']:.1f} / {zero['average']:.1f}{beside}; unseen entries below "
              f"zero-shot: {entries['below']} of {entries['entries']} (worst {entries['worst']:+.1f})")
    return claims


def gated_entries(record: dict, run: str) -> dict:
    """The gated rule on every unseen (step, task) entry of a run against zero-shot's."""
    r = record["runs"][run]
    gated, zero = r["matrices"].get(variant_name("gated", 4)) or r["matrices"][CONDU], r["matrices"]["zero_shot"]
    diffs = [gated[i][j] - zero[i][j] for j in range(len(zero)) for i in range(j)]
    return {"entries": len(diffs), "below": sum(d < 0 for d in diffs), "worst": min(diffs), "best": max(diffs)}


def scale_trend(record: dict) -> dict | None:
    """Least-squares slope of the official rule's Transfer gap against log10(parameters), lr 1e-4."""
    points = [(math.log10(record["runs"][r]["parameters"]), transfer_gap(record, r)) for r in grid_runs(record, 1e-4)]
    if len(points) < 2:
        return None
    mx, my = mean(p[0] for p in points), mean(p[1] for p in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    closes_at = 10 ** (mx - my / slope) if slope > 0 else None
    return {"points": points, "slope_per_decade": slope, "zero_gap_parameters": closes_at}


# --- writing -------------------------------------------------------------------------------------

def fmt(value, digits=1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def table(header: list[str], lines: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(v) for v in line) + " |" for line in lines]
    return "\n".join(out) + "\n"


def models_table(record: dict) -> str:
    lines = [[w, m["folder"], f"{m['parameters']:,}", m["config"], f"{m['bytes'] / 1e6:.1f}", m["steps"],
              fmt(m["cpu_minutes"]), fmt(m["minutes"]), fmt(m["final_loss"], 3), fmt(m["mean_zero_shot"])]
             for w, m in record["models"].items()]
    return table(["width", "folder", "parameters", "architecture", "MB", "steps", "CPU min", "wall min",
                  "final loss", "mean zero-shot %"], lines)


def rows_table(record: dict) -> str:
    lines = [[r["run"], r["method"], r["aggregation"] or "-", r["K"] or "-", r["width"], f"{r['parameters'] or 0:,}",
              f"{r['lr']:.0e}", r["iterations"], r["order"], r["seed"], fmt(r["transfer"]), fmt(r["average"]),
              fmt(r["last"])] for r in record["rows"]]
    return table(["run", "method", "aggregation", "K", "width", "parameters", "lr", "iterations", "order", "seed",
                  "Transfer", "Average", "Last"], lines)


def strength_table(record: dict) -> str:
    lines = []
    for run in record["runs"]:
        zero, experts = row(record, run, "zero-shot"), row(record, run, "individual experts")
        official, gated = row(record, run, "ConDU", *OFFICIAL), row(record, run, "ConDU", "gated", 4)
        if official is None:
            continue
        lines.append([run, fmt(zero["transfer"]), fmt(experts["last"]),
                      " / ".join(fmt(official[m]) for m in ("transfer", "average", "last")),
                      fmt(official["transfer"] - zero["transfer"]), fmt(official["last"] - experts["last"]),
                      " / ".join(fmt(gated[m]) for m in ("transfer", "average", "last")) if gated else "-"])
    return table(["run", "zero-shot Transfer", "experts' Last", "ConDU official T / A / L",
                  "Transfer - zero-shot", "Last - experts'", "ConDU gated T / A / L"], lines)


def aggregation_table(record: dict) -> str:
    lines = []
    for run in record["runs"]:
        if row(record, run, "ConDU", *OFFICIAL) is None:
            continue
        lines.append([run] + [fmt(transfer_gap(record, run, a, k)) for a, k in AGGREGATIONS])
    return table(["run"] + [f"{a} K={k}" for a, k in AGGREGATIONS], lines)


def fidelity_table(record: dict) -> str:
    lines = []
    for run in record["runs"]:
        f = [x for x in record["fidelity"] if x["run"] == run]
        lines.append([run, fmt(mean(x["cosine_own"] for x in f[1:]), 3), fmt(mean(x["cosine_last"] for x in f), 3),
                      fmt(mean(x["rel_l2_own"] for x in f[1:]), 3), fmt(mean(x["rel_l2_last"] for x in f), 3),
                      fmt(mean(x["gap_own"] for x in f)), fmt(mean(x["gap_last"] for x in f)),
                      fmt(spearman([x["cosine_last"] for x in f], [x["gap_last"] for x in f]), 2)])
    return table(["run", "cosine, own step (tasks 2-10)", "cosine, last step", "rel. error, own step (tasks 2-10)",
                  "rel. error, last step", "expert - rebuilt, own step", "expert - rebuilt, last step",
                  "Spearman(cosine, gap), last step"], lines)


def per_task_fidelity_table(record: dict, lr: float = 1e-4) -> str:
    runs = grid_runs(record, lr)
    if not runs:
        return ""
    tasks = record["runs"][runs[0]]["tasks"]
    lines = []
    for task in tasks:
        cells = []
        for run in runs:
            f = next(x for x in record["fidelity"] if x["run"] == run and x["task"] == task)
            cells.append(f"{f['cosine_last']:.2f} / {f['rel_l2_last']:.2f} / {f['gap_last']:+.1f}")
        lines.append([task] + cells)
    return table(["task"] + [f"{r}: cosine / rel. error / expert - rebuilt" for r in runs], lines)


def gated_table(record: dict) -> str:
    lines = []
    for run, r in record["runs"].items():
        gated = row(record, run, "ConDU", "gated", 4)
        if gated is None:
            continue
        e = gated_entries(record, run)
        taus = [t for step in r["gates"].get(CONDU, []) for t in step if t is not None]
        joins = r.get("gate_joins") or []
        joined = f"{sum(j['joined'] for j in joins)} of {sum(j['images'] for j in joins)}" if joins else "-"
        lines.append([run, r["order"], " / ".join(fmt(gated[m]) for m in ("transfer", "average", "last")),
                      f"{e['below']} of {e['entries']}", fmt(e["worst"]), fmt(e["best"]),
                      f"{fmt(min(taus), 3)} to {fmt(max(taus), 3)}" if taus else "-", joined])
    return table(["run", "order", "gated T / A / L", "unseen entries below zero-shot", "worst entry - zero-shot",
                  "best entry - zero-shot", "finite taus", "unseen test images with an expert through the gate"],
                 lines)


def design_section(record: dict) -> str:
    """The gated rule's first design and what it measured on the design order."""
    d = record.get("design_history")
    if not d:
        return ""
    s = d["summary"]
    return (f"The gate was designed on order I. Its first design ({d['rule']}) measured, on {d['run']}: "
            f"Transfer {s['condu-gated-k4']['transfer']:.1f} against zero-shot's {s['zero_shot']['transfer']:.1f} "
            f"(official rule {s['condu-mean-k4']['transfer']:.1f}), with {d['below_zero_shot']} of "
            f"{d['unseen_entries']} unseen entries below zero-shot, the worst {d['worst']['task']} after "
            f"{d['worst']['step']} at {d['worst']['difference']:+.1f}: a threshold under which the learned tasks "
            "lost nothing still let experts into an unseen task they damaged. The rule was then changed to the "
            "per-expert gate of `cl_driver/gating.py`, which keeps every expert out of every learned task but its "
            f"own; order II was not looked at before that. Command: `{d['command']}`.\n")


def claims_table(claims: list[dict]) -> str:
    mark = {True: "yes", False: "**no**", None: "-"}
    return table(["claim", "holds", "numbers"], [[c["claim"], mark[c["holds"]], c["numbers"]] for c in claims])


def timing_table(record: dict) -> str:
    lines = [[run, fmt(r["timing"]["cpu_s"] / 60), fmt(r["timing"]["wall_s"] / 60)]
             for run, r in record["runs"].items() if r.get("timing")]
    total = sum(r["timing"]["cpu_s"] for r in record["runs"].values() if r.get("timing")) / 60
    return table(["run", "CPU min", "wall min"], lines + [["all runs", fmt(total), ""]])


def commands(record: dict) -> str:
    models = "\n".join(f"    {m['command']}" for m in record["models"].values())
    runs = "\n".join(f"    {r['command']}" for r in record["runs"].values())
    return f"Pre-training (each model's PRETRAIN.md has the exact replay command):\n\n{models}\n\nRuns:\n\n{runs}\n"


def not_run_text(record: dict) -> str:
    """The planned runs without results, named, so no reader takes the grid for complete."""
    missing = record.get("not_run") or []
    if not missing:
        return "Every run of the plan is here."
    return (f"Planned but not run ({len(missing)} of {len(missing) + len(record['runs'])}): {', '.join(missing)}. "
            f"`python -m benchmarks.{NAME}` runs them (each resumes where it stopped) and rewrites this page.")


QUICK_NOTE = ("**A quick run** (`--quick`): the smallest model on benchmarks/configs/mini_mtil_tiny.yaml, two "
              "tasks and a few steps. It checks the code path; its figures measure nothing, and the text below "
              "describes the full study.\n\n")


def markdown(record: dict, notes: str) -> str:
    trend = scale_trend(record)
    trend_text = "" if not trend else (
        f"Official rule, lr 1e-4: Transfer - zero-shot rises by {trend['slope_per_decade']:+.1f} points per tenfold "
        f"parameters (least squares over {len(trend['points'])} widths)"
        + (f"; a straight line in log-parameters would reach zero at about {trend['zero_gap_parameters'] / 1e6:.0f}M "
           "parameters." if trend["zero_gap_parameters"] else "; the line does not rise toward zero.") + "\n")
    return f"""# When does ConDU keep zero-shot skill? mini-MTIL across size, strength and aggregation

{QUICK_NOTE if record.get('quick') else ''}Every number here is read from `{NAME}.json`, which
`python -m benchmarks.{NAME}` wrote from the run folders. Ten tasks in the order of
`cl_driver/configs/mini_mtil.yaml` (order I), 200 test images each; ConDU with the paper's
whole-model rescaler; training and data seed 0 unless a row says otherwise; pre-training seed 0.
Machine: {record['machine']}; every run on one torch thread.

{not_run_text(record)}
## Models: one recipe, three widths

{models_table(record)}
## Findings, claim by claim

{claims_table(record['claims'])}
{trend_text}
{notes}
## Size and strength: the official rule (mean, K = 4) and the gated rule

{strength_table(record)}
![Transfer against Last]({NAME}-transfer-vs-last.png)

## Aggregation: ConDU's Transfer minus zero-shot's, per rule and K

{aggregation_table(record)}
![gap to zero-shot against K]({NAME}-gap-vs-k.png)

## Reconstruction fidelity and the accuracy each rebuilt expert loses

Cosine and relative L2 error of each task's rebuilt delta against its fine-tuned delta (right
after its own step, where the first task is exact, and after the last step), and the accuracy
of the individual expert minus that of the rebuilt one on the task (own step: row i of the
matrix; last step: the last row). Means over the tasks of each run.

{fidelity_table(record)}
Per task at lr 1e-4, after the last step:

{per_task_fidelity_table(record)}
![fidelity against width]({NAME}-fidelity.png)

## The gated rule entry by entry

{gated_table(record)}
{design_section(record)}
## Every run: Transfer / Average / Last

{rows_table(record)}
## Time

{timing_table(record)}
## Commands

{commands(record)}"""


# --- plots ---------------------------------------------------------------------------------------

def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


LR_COLORS = {1e-4: "tab:red", 3e-5: "tab:orange", 1e-5: "tab:blue"}
RULE_MARKERS = {("mean", 4): ("o", "ConDU official (mean, K=4)"), ("weighted", 1): ("^", "ConDU weighted, K=1"),
                ("gated", 4): ("D", "ConDU gated")}


def plot_transfer_vs_last(record: dict, path: Path) -> None:
    """One panel per width: each rule's (Last, Transfer) per lr, with zero-shot and the experts."""
    plt = pyplot()
    widths = [w for w in WIDTHS if grid_runs(record, width=w)]
    fig, axes = plt.subplots(1, len(widths), figsize=(5 * len(widths), 4.4), sharey=True, squeeze=False)
    for ax, width in zip(axes[0], widths):
        for run in grid_runs(record, width=width):
            color = LR_COLORS[record["runs"][run]["lr"]]
            zero, experts = row(record, run, "zero-shot"), row(record, run, "individual experts")
            ax.scatter(experts["last"], experts["transfer"], marker="s", facecolors="none", edgecolors=color, s=60)
            for rule, (marker, _) in RULE_MARKERS.items():
                r = row(record, run, "ConDU", *rule)
                ax.scatter(r["last"], r["transfer"], marker=marker, color=color, s=45)
            ax.scatter(zero["last"], zero["transfer"], marker="*", color="black", s=120)
            ax.axhline(zero["transfer"], color="gray", lw=0.8, ls="--")
        params = record["models"][width]["parameters"] / 1e6
        ax.set_title(f"width {width} ({params:.1f}M parameters)")
        ax.set_xlabel("Last (%)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Transfer (%)")
    handles = [plt.Line2D([], [], marker=m, ls="", color="gray", label=label) for m, label in RULE_MARKERS.values()]
    handles += [plt.Line2D([], [], marker="s", ls="", mfc="none", color="gray", label="individual experts"),
                plt.Line2D([], [], marker="*", ls="", color="black", ms=10, label="zero-shot (dashed: its Transfer)")]
    handles += [plt.Line2D([], [], marker="o", ls="", color=c, label=f"lr {lr:.0e}, {STRENGTHS[lr]} it.")
                for lr, c in LR_COLORS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, bbox_to_anchor=(0.5, -0.08))
    fig.suptitle("Transfer against Last: each rule and fine-tuning strength, per model width")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_fidelity(record: dict, path: Path) -> None:
    """Left: mean cosine against parameters, per lr; right: per task, cosine against the accuracy lost."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for lr, color in LR_COLORS.items():
        runs = sorted(grid_runs(record, lr), key=lambda r: record["runs"][r]["parameters"])
        if not runs:
            continue
        x = [record["runs"][r]["parameters"] for r in runs]
        for key, style in (("cosine_own", "--"), ("cosine_last", "-")):
            y = [mean(f[key] for f in record["fidelity"] if f["run"] == r and (key != "cosine_own" or f["task"] !=
                                                                               record["runs"][r]["tasks"][0]))
                 for r in runs]
            left.plot(x, y, style, marker="o", color=color, label=f"lr {lr:.0e}, {key.split('_')[1]} step")
    left.set_xscale("log")
    left.set_xlabel("parameters")
    left.set_ylabel("mean cosine, rebuilt vs fine-tuned delta")
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    markers = {"S": "v", "M": "o", "L": "^"}
    for f in record["fidelity"]:
        if record["runs"][f["run"]]["slice"] == "grid":
            right.scatter(f["cosine_last"], f["gap_last"], marker=markers[f["width"]], color=LR_COLORS[f["lr"]],
                          s=22, alpha=0.8)
    right.axhline(0, color="gray", lw=0.8)
    right.set_xlabel("cosine after the last step (one task of one run)")
    right.set_ylabel("expert - rebuilt accuracy, last step (points)")
    right.legend(handles=[plt.Line2D([], [], marker=m, ls="", color="gray", label=f"width {w}")
                          for w, m in markers.items()], fontsize=7)
    right.grid(alpha=0.3)
    fig.suptitle("Reconstruction fidelity against width, and the accuracy it costs (colour: lr)")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_gap_vs_k(record: dict, path: Path) -> None:
    """ConDU's Transfer minus zero-shot's against K, mean and weighted, one panel per lr."""
    plt = pyplot()
    lrs = [lr for lr in STRENGTHS if grid_runs(record, lr)]
    fig, axes = plt.subplots(1, len(lrs), figsize=(4.6 * len(lrs), 4), sharey=True, squeeze=False)
    colors = {"S": "tab:green", "M": "tab:purple", "L": "tab:brown"}
    ks = sorted({k for a, k in AGGREGATIONS if a == "mean"})
    for ax, lr in zip(axes[0], lrs):
        for run in grid_runs(record, lr):
            width = record["runs"][run]["width"]
            for aggregate, style in (("mean", "-"), ("weighted", "--")):
                ax.plot(ks, [transfer_gap(record, run, aggregate, k) for k in ks], style, marker="o",
                        color=colors[width], label=f"{width} {aggregate}")
            ax.scatter([max(ks)], [transfer_gap(record, run, "gated", 4)], marker="D", color=colors[width], s=50,
                       zorder=3)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(ks)
        ax.set_xlabel("K (experts routed to)")
        ax.set_title(f"lr {lr:.0e}, {STRENGTHS[lr]} iterations")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Transfer - zero-shot Transfer (points)")
    axes[0][0].legend(fontsize=7, title="diamond: gated", title_fontsize=7)
    fig.suptitle("Gap to zero-shot against K (solid: mean, dashed: weighted by similarity)")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


# --- the command ---------------------------------------------------------------------------------

def load_timings(runs_dir: Path | None = None) -> dict:
    path = (runs_dir or RUNS_DIR) / "timings.json"
    return json.loads(path.read_text()) if path.exists() else {}


def add_timings(new: dict, runs_dir: Path | None = None) -> dict:
    """CPU and wall seconds per run, summed over the invocations that worked on it."""
    runs_dir = runs_dir or RUNS_DIR
    timings = load_timings(runs_dir)
    for run_id, t in new.items():
        old = timings.get(run_id, {"cpu_s": 0.0, "wall_s": 0.0})
        timings[run_id] = {k: old[k] + t[k] for k in ("cpu_s", "wall_s")}
    runs_dir.mkdir(parents=True, exist_ok=True)
    (runs_dir / "timings.json").write_text(json.dumps(timings, indent=1))
    return timings


def write_report(record: dict, results_dir: Path, notes_path: Path | None) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{NAME}.json").write_text(json.dumps(record, indent=1) + "\n")
    notes = notes_path.read_text() if notes_path and notes_path.exists() else ""
    (results_dir / f"{NAME}.md").write_text(markdown(record, notes))
    if grid_runs(record):
        plot_transfer_vs_last(record, results_dir / f"{NAME}-transfer-vs-last.png")
        plot_fidelity(record, results_dir / f"{NAME}-fidelity.png")
        plot_gap_vs_k(record, results_dir / f"{NAME}-gap-vs-k.png")


def select(args) -> tuple[list[RunSpec], list[CliRun]]:
    specs, cli = (quick_plan(), []) if args.quick else (plan(), CLI_RUNS)
    if args.runs:
        wanted = [r.strip() for r in args.runs.split(",") if r.strip()]
        known = [s.id for s in specs] + [c.id for c in cli]
        unknown = [r for r in wanted if r not in known]
        if unknown:
            raise SystemExit(f"--runs: unknown {unknown}; the plan has {known} (see --list)")
        return [s for s in specs if s.id in wanted], [c for c in cli if c.id in wanted]
    if args.only:
        return [s for s in specs if s.slice == args.only], (cli if args.only == "cli" else [])
    return specs, cli


def main(argv=None) -> dict | None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mini_mtil_study", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("grid", "seed", "order", "cli"), help="run one slice of the plan")
    p.add_argument("--runs", help="comma-separated run ids (see --list)")
    p.add_argument("--jobs", type=int, default=2, help="child processes side by side (one torch thread each)")
    p.add_argument("--list", action="store_true", help="print the plan and what is done, run nothing")
    p.add_argument("--report-only", action="store_true", help="rewrite the results from the finished runs")
    p.add_argument("--results-dir", type=Path, default=None,
                   help="results folder (default benchmarks/results; required with --quick)")
    p.add_argument("--runs-dir", type=Path, default=None,
                   help="run folders (default runs/study; quick: a temporary folder, removed after)")
    p.add_argument("--notes", type=Path, default=None, help="markdown of findings to include (no numbers: those "
                   f"come from the json; default benchmarks/results/{NAME}_notes.md, none with --quick)")
    p.add_argument("--quick", action="store_true", help="one tiny run of the smallest model, then its report "
                   "(with --results-dir)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, runs_dir=args.runs_dir, quick=args.quick)
        return None
    args.results_dir = results_folder(p, args.results_dir, quick=args.quick)
    if args.quick and args.runs_dir is None:
        with tempfile.TemporaryDirectory(prefix="mini-mtil-study-quick-") as scratch:
            return study(args, Path(scratch))
    return study(args, args.runs_dir or RUNS_DIR)


def study(args: argparse.Namespace, runs_dir: Path) -> dict | None:
    """List, run and report the runs the parsed command line selects, with their folders under runs_dir."""
    specs, cli = select(args)
    if args.list:
        for s in specs:
            print(f"{s.id:24s} {s.slice:6s} width {s.width} lr {s.lr:.0e} it {s.iterations:4d} order {s.order} "
                  f"seed {s.seed}  {'done' if results_path(s.id, runs_dir).exists() else 'to do'}")
        for c in cli:
            print(f"{c.id:24s} cli    {' '.join(c.command(runs_dir / c.id)[3:])}  "
                  f"{'done' if results_path(c.id, runs_dir).exists() else 'to do'}")
        return None
    if not args.report_only:
        missing = [WIDTHS[s.width] for s in specs if not (ROOT / "cl_driver" / "assets" / WIDTHS[s.width]).exists()]
        if missing:
            raise SystemExit(f"no model {sorted(set(missing))} in cl_driver/assets; pre-train it first with the "
                             "command in benchmarks/results/mini_mtil_study.md (Commands)")
        new = {}
        try:
            run_children(pending_jobs(specs, cli, runs_dir=runs_dir, quick=args.quick), args.jobs, new)
        finally:
            add_timings(new, runs_dir)
    record = collect(load_timings(runs_dir), runs_dir=runs_dir, results_dir=args.results_dir, quick=args.quick)
    notes = args.notes or (None if args.quick else RESULTS_DIR / f"{NAME}_notes.md")
    write_report(record, args.results_dir, notes)
    print(claims_table(record["claims"]))
    return record


if __name__ == "__main__":
    main()
