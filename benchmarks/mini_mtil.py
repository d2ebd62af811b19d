"""mini-MTIL: run the built-in continual-learning benchmark end to end and record its results.

    python -m benchmarks.mini_mtil                       # the full config (cl_driver/configs/mini_mtil.yaml)
    python -m benchmarks.mini_mtil --config mini_mtil_quick --name mini_mtil_quick
    python -m benchmarks.mini_mtil --quick --results-dir /tmp/mini_mtil   # benchmarks/configs/mini_mtil_tiny.yaml

It runs `condu-cl run CONFIG --out RUN` in child processes (the path a user takes): by default
two side by side, one per group of methods that share no checkpoints, merged afterwards. It times
their wall clock and CPU, then writes to benchmarks/results/:
    NAME.json, NAME.md           the Transfer / Average / Last table of every method, the checks of
                                 issue 5's claims (each with its numbers), per-task zero-shot against
                                 chance, reconstruction fidelity per task (own step and last step),
                                 the store size against T separate models, and the timings
    NAME-heatmap-METHOD.png      the accuracy matrix of every method
The run folder keeps checkpoints and stores; a run interrupted midway resumes where it stopped.
`--quick` runs the tiny config (two tasks, a few steps) in a temporary run folder, removed after.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import ROOT, TINY_CONFIG, results_folder
from cl_driver.results import fidelity_table

CONTINUAL_BASELINES = ("sequential", "task_arithmetic", "magmax")


# --- running ------------------------------------------------------------------------------------

def driver_command(config: str, run_dir: Path, methods: list[str] | None) -> list[str]:
    cmd = [sys.executable, "-m", "cl_driver.cli", "run", config, "--out", str(run_dir), "--no-progress"]
    return cmd + (["--methods", ",".join(methods)] if methods else [])


def method_groups(config: str, methods: list[str] | None, parallel: bool) -> list[list[str] | None]:
    """One group, or two that share no checkpoints: the methods built on sequential fine-tuning
    (sequential, MagMax; with zero-shot) and those built on fine-tunes from theta0. Each method's
    numbers do not depend on which others run beside it, so the split only saves time."""
    if not parallel:
        return [methods]
    from cl_driver.config import load_config

    chosen = [m for m in load_config(config).methods if not methods or m.name in methods]
    on_sequential = [m.name for m in chosen if m.kind in ("sequential", "magmax", "zero_shot")]
    on_theta0 = [m.name for m in chosen if m.name not in on_sequential]
    return [g for g in (on_theta0, on_sequential) if g] or [methods]


def run_driver(config: str, run_dir: Path, *, threads: int = 1, methods: list[str] | None = None,
               parallel: bool = True) -> tuple[dict, list[Path]]:
    """`condu-cl run` in child processes (one per method group, side by side); returns the wall
    and CPU seconds and the run folders."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    groups = method_groups(config, methods, parallel)
    dirs = [run_dir] if len(groups) == 1 else [run_dir / f"part-{k + 1}" for k in range(len(groups))]
    commands = [driver_command(config, d, g) for d, g in zip(dirs, groups)]
    before, began = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    children = [subprocess.Popen(cmd, cwd=ROOT, env=env) for cmd in commands]
    codes = [child.wait() for child in children]
    if any(codes):
        raise SystemExit(f"condu-cl run failed (exit codes {codes}); rerun the same command to resume")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    timing = {"wall_s": time.perf_counter() - began,
              "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
              "threads": threads, "processes": len(commands),
              "commands": [" ".join(["condu-cl"] + cmd[3:]) for cmd in commands]}
    return timing, dirs


def merge_results(parts: list[dict], method_order: list[str]) -> dict:
    """One results dict from runs of disjoint method groups over the same tasks."""
    merged = dict(parts[0])
    for key in ("methods", "matrices", "summary", "routing_top1", "seconds"):
        merged[key] = {}
        for part in parts:
            merged[key].update(part.get(key) or {})
    for key in ("fidelity", "stores", "cost"):
        merged[key] = next((p[key] for p in parts if p.get(key)), {})
    for key in ("methods", "matrices", "summary"):
        merged[key] = {m: merged[key][m] for m in method_order if m in merged[key]}
    return merged


def combine_runs(dirs: list[Path], run_dir: Path, method_order: list[str]) -> None:
    """Write run_dir/results.json (+ the driver's markdown and heat maps) from the parts."""
    if dirs == [run_dir]:
        return
    from cl_driver.results import write_outputs

    parts = [json.loads((d / "results.json").read_text()) for d in dirs]
    write_outputs(merge_results(parts, method_order), run_dir)


# --- the checks of issue 5 ----------------------------------------------------------------------

def chance_levels(tasks: list[str]) -> dict[str, float]:
    from cl_driver.mini.tasks import get_task
    return {t: 100.0 / len(get_task(t).class_names) for t in tasks}


def condu_methods(results: dict, *, agnostic: bool) -> list[str]:
    return [n for n, m in results["methods"].items() if m["kind"] == "condu" and bool(m.get("agnostic")) == agnostic]


def best_by(names: list[str], summary: dict, metric: str) -> str | None:
    return max(names, key=lambda n: summary[n][metric]) if names else None


def check_claims(results: dict) -> list[dict]:
    """Each claim of issue 5 with the numbers behind it and whether it holds in this run."""
    s, tasks = results["summary"], results["tasks"]
    chance = chance_levels(tasks)
    zero_shot = dict(zip(tasks, results["matrices"]["zero_shot"][-1])) if "zero_shot" in s else {}
    claims = []

    def claim(text, holds, numbers):
        claims.append({"claim": text, "holds": bool(holds), "numbers": numbers})

    if zero_shot and "individual" in s:
        above = [t for t in tasks if zero_shot[t] >= 1.5 * chance[t]]
        claim("zero-shot >= 1.5x chance on at least half of the tasks", len(above) * 2 >= len(tasks),
              f"{len(above)} of {len(tasks)} tasks: {', '.join(above) or 'none'}")
        claim("zero-shot well below the fine-tuned accuracy (individual Last - zero-shot >= 20 points)",
              s["individual"]["last"] - s["zero_shot"]["last"] >= 20,
              f"zero-shot {s['zero_shot']['last']:.1f} vs individual {s['individual']['last']:.1f}")
    if "sequential" in s and "individual" in s:
        gap = s["individual"]["last"] - s["sequential"]["last"]
        claim("sequential fine-tuning forgets: its Last is clearly (>= 5 points) below the individual experts'",
              gap >= 5, f"sequential {s['sequential']['last']:.1f} vs individual {s['individual']['last']:.1f} ({gap:+.1f})")
    condu = condu_methods(results, agnostic=False)
    baselines = [b for b in CONTINUAL_BASELINES if b in s]
    if condu and baselines:
        for metric in ("average", "last"):
            best = best_by(condu, s, metric)
            top = max(baselines, key=lambda b: s[b][metric])
            claim(f"ConDU's {metric.title()} is above every continual baseline's (best mode: {best})",
                  all(s[best][metric] > s[b][metric] for b in baselines),
                  f"{best} {s[best][metric]:.1f} vs best baseline {top} {s[top][metric]:.1f}; "
                  + ", ".join(f"{n} {s[n][metric]:.1f}" for n in condu))
    if condu and "individual" in s:
        best = best_by(condu, s, "last")
        gap = s["individual"]["last"] - s[best]["last"]
        claim("ConDU's Last is within 5 points of the individual experts' (best rescaler mode)", gap <= 5,
              f"{best} {s[best]['last']:.1f} vs individual {s['individual']['last']:.1f} ({-gap:+.1f}); "
              + ", ".join(f"{n} {s[n]['last']:.1f}" for n in condu))
    if condu and "zero_shot" in s:
        best = best_by(condu, s, "transfer")
        claim("ConDU's Transfer is at least zero-shot's Transfer minus 1", s[best]["transfer"] >= s["zero_shot"]["transfer"] - 1,
              f"{best} {s[best]['transfer']:.1f} vs zero-shot {s['zero_shot']['transfer']:.1f}")
    agnostic = condu_methods(results, agnostic=True)
    if agnostic and baselines:
        best = best_by(agnostic, s, "last")
        claim("task-agnostic ConDU's Average and Last are above every continual baseline's",
              all(s[best][m] > s[b][m] for b in baselines for m in ("average", "last")),
              f"{best} {s[best]['average']:.1f} / {s[best]['last']:.1f} vs "
              + ", ".join(f"{b} {s[b]['average']:.1f} / {s[b]['last']:.1f}" for b in baselines))
    claim("per-task reconstruction fidelity is reported (own step and last step)", bool(results.get("fidelity")),
          ", ".join(results.get("fidelity", {})) or "no ConDU store")
    return claims


# --- writing ------------------------------------------------------------------------------------

def fmt(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.1f}"


def summary_table(results: dict) -> str:
    lines = ["| method | Transfer | Average | Last |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {fmt(v['transfer'])} | {fmt(v['average'])} | {fmt(v['last'])} |" for n, v in results["summary"].items()]
    return "\n".join(lines) + "\n"


def zero_shot_table(results: dict) -> str:
    tasks, chance = results["tasks"], chance_levels(results["tasks"])
    zs = results["matrices"].get("zero_shot", [[float("nan")] * len(tasks)])[-1]
    ind = results["matrices"].get("individual")
    lines = ["| task | chance % | zero-shot % | x chance | individual expert % |", "|---|---:|---:|---:|---:|"]
    for j, t in enumerate(tasks):
        expert = fmt(ind[-1][j]) if ind else "n/a"
        lines.append(f"| {t} | {chance[t]:.1f} | {fmt(zs[j])} | {zs[j] / chance[t]:.2f}x | {expert} |")
    return "\n".join(lines) + "\n"


def _prototype_bytes(sizes: dict) -> int:
    """The prototypes' bytes: the store's attachments (format 2), or its prototypes (format 1 results)."""
    return sizes["attachments"] if "attachments" in sizes else sizes["prototypes"]


def storage_table(results: dict) -> str:
    """ConDU keeps theta0 once plus the store; T separate models are T full checkpoints (and
    theta0 too, for zero-shot on unseen tasks)."""
    lines = ["| rescaler | tasks | theta0 MB | unified MB | triggers MB | prototypes MB | store MB | "
             "theta0 + store MB | T separate models MB | separate / store |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    mb = 1 / 2**20
    for rescaler, st in results.get("stores", {}).items():
        lines.append(f"| {rescaler} | {st['tasks']} | {st['base_bytes'] * mb:.2f} | {st['unified'] * mb:.2f} | "
                     f"{st['triggers'] * mb:.2f} | {_prototype_bytes(st) * mb:.3f} | {st['total'] * mb:.2f} | "
                     f"{(st['total'] + st['base_bytes']) * mb:.2f} | {st['separate_checkpoints_bytes'] * mb:.2f} | "
                     f"{st['savings']:.2f}x |")
    return "\n".join(lines) + "\n"


def claims_table(claims: list[dict]) -> str:
    lines = ["| claim (issue 5) | holds | numbers |", "|---|---|---|"]
    lines += [f"| {c['claim']} | {'yes' if c['holds'] else '**no**'} | {c['numbers']} |" for c in claims]
    return "\n".join(lines) + "\n"


# The paper's other settings on mini-MTIL: (results name, what changes), each written by its own run
# of this script; the full benchmark's page shows their rows next to its own.
OTHER_SETTINGS = (
    ("mini_mtil_lora", "LoRA: rank 64 on the MLP linears of both towers, fused in factor space, lr 1e-3"),
    ("mini_mtil_fewshot", "5-shot: 5 training images a class, 100 iterations"),
)
SETTING_METHODS = ("zero_shot", "individual", "condu-model", "condu-tensor")


def settings_section(results_dir: Path) -> str:
    """Rows of the other settings' runs found next to this page, with the commands that made them."""
    records = [(json.loads((results_dir / f"{name}.json").read_text()), what) for name, what in OTHER_SETTINGS
               if (results_dir / f"{name}.json").exists()]
    if not records:
        return ""
    lines = ["| setting | method | Transfer | Average | Last |", "|---|---|---:|---:|---:|"]
    for record, what in records:
        summary = record["results"]["summary"]
        lines += [f"| {what} | {m} | {fmt(summary[m]['transfer'])} | {fmt(summary[m]['average'])} | "
                  f"{fmt(summary[m]['last'])} |" for m in SETTING_METHODS if m in summary]
    commands = "\n".join(f"- `{record['command']}`: [{record['name']}.md]({record['name']}.md)" for record, _ in records)
    return f"""
## The paper's other settings: LoRA and 5-shot

The same ten tasks and the same evaluation, trained as the official LoRA and few-shot settings
train (configs `mini_mtil_lora.yaml`, `mini_mtil_fewshot.yaml`). Each setting's own page has all
its methods, its claims, fidelity, storage and timings.

{chr(10).join(lines)}

{commands}
"""


def markdown(record: dict, results_dir: Path | None = None) -> str:
    r, t = record["results"], record["timing"]
    heatmaps = "\n".join(f"- {n}: [{p}]({p})" for n, p in record["heatmaps"].items())
    return f"""# mini-MTIL results: {record['name']}

Config: `{record['config']}` ({len(r['tasks'])} tasks: {', '.join(r['tasks'])}); model: the shipped mini CLIP
({record['model']}). Command: `{record['command']}`

Driver runs: {'; '.join(f"`{c}`" for c in record.get('driver_commands', [])) or 'n/a'}

Time: {t['wall_s'] / 60:.1f} min wall clock, {t['cpu_s'] / 60:.1f} min of CPU ({t.get('processes', 1)} process(es) of
{t['threads']} torch thread) on {record['machine']}. The wall clock counts other jobs sharing the machine;
CPU time is the run's own work.

## Transfer / Average / Last (%)

{summary_table(r)}
## What the results show, claim by claim

{claims_table(record['claims'])}
## Zero-shot of the shipped CLIP against chance and the individual experts (last row)

{zero_shot_table(r)}
## Reconstruction fidelity of each task's rebuilt delta

Cosine and relative L2 error of the reconstruction against the task's own fine-tuned delta,
right after the task's own step and after the last step.

{fidelity_table(r.get("fidelity", {}))}
## Storage: the ConDU store against T separate models

{storage_table(r)}
## Accuracy matrices

{heatmaps}
{settings_section(results_dir) if results_dir and record['name'] == 'mini_mtil' else ''}{record.get('notes', '')}"""


def collect(config: str, run_dir: Path, results_dir: Path, name: str, timing: dict, *,
            notes: str | None = None, command: str | None = None) -> dict:
    """Read the run's results.json, check the claims and write NAME.json, NAME.md and the heat maps;
    `command` is the command line recorded (default: the one that runs `config` as `name`)."""
    from cl_driver.config import load_config

    results = json.loads((run_dir / "results.json").read_text())
    results_dir.mkdir(parents=True, exist_ok=True)
    heatmaps = {}
    for method in results["matrices"]:
        src = run_dir / f"heatmap-{method}.png"
        if src.exists():
            dst = results_dir / f"{name}-heatmap-{method}.png"
            shutil.copyfile(src, dst)
            heatmaps[method] = dst.name
    cfg = load_config(config)
    record = {
        "name": name, "config": os.path.relpath(cfg.path, ROOT), "model": os.path.relpath(cfg.model, ROOT),
        "command": command or f"python -m benchmarks.mini_mtil --config {config} --name {name}",
        "driver_commands": [c.replace(str(ROOT) + os.sep, "") for c in timing.get("commands", [])],
        "machine": f"{platform.machine()} CPU ({os.cpu_count()} cores, shared), Python {platform.python_version()}",
        "timing": timing, "claims": check_claims(results), "heatmaps": heatmaps, "results": results,
    }
    if notes:
        record["notes"] = "\n## Notes\n\n" + notes.strip() + "\n"
    (results_dir / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    (results_dir / f"{name}.md").write_text(markdown(record, results_dir))
    return record


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mini_mtil", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="a YAML path or a shipped config name (default mini_mtil; "
                   "quick: benchmarks/configs/mini_mtil_tiny.yaml)")
    p.add_argument("--name", default="mini_mtil", help="file stem of the results")
    p.add_argument("--run-dir", type=Path, default=None,
                   help="run folder (default: runs/NAME; quick: a temporary folder, removed after)")
    p.add_argument("--results-dir", type=Path, default=None,
                   help="results folder (default benchmarks/results; required with --quick)")
    p.add_argument("--quick", action="store_true", help="the tiny config: two tasks, a few steps (with --results-dir)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the run (1 is fastest on a busy CPU)")
    p.add_argument("--notes", type=Path, default=None, help="a markdown file of findings to include")
    p.add_argument("--collect-only", action="store_true", help="rewrite the results of a finished run")
    p.add_argument("--render-only", action="store_true",
                   help="rewrite NAME.md from NAME.json alone (and the other settings' records), no run folder")
    p.add_argument("--methods", default=None, help="comma-separated subset of the config's methods")
    p.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=True,
                   help="run the two method groups that share no checkpoints side by side (2 cores)")
    args = p.parse_args(argv)
    args.results_dir = results_folder(p, args.results_dir, quick=args.quick)
    args.config = args.config or (str(TINY_CONFIG) if args.quick else "mini_mtil")
    if args.quick and args.run_dir is None:
        with tempfile.TemporaryDirectory(prefix="mini-mtil-quick-") as scratch:
            return run_benchmark(args, Path(scratch), argv)
    return run_benchmark(args, args.run_dir or ROOT / "runs" / args.name, argv)


def run_benchmark(args: argparse.Namespace, run_dir: Path, argv=None) -> dict:
    """Run (or collect, or render) the benchmark of the parsed command line in `run_dir`."""
    from cl_driver.config import load_config

    if args.render_only:
        record = json.loads((args.results_dir / f"{args.name}.json").read_text())
        (args.results_dir / f"{args.name}.md").write_text(markdown(record, args.results_dir))
        return record
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    saved = args.results_dir / f"{args.name}.json"
    if args.collect_only and saved.exists():
        timing = json.loads(saved.read_text())["timing"]
    else:
        timing, dirs = run_driver(args.config, run_dir, threads=args.threads, methods=methods, parallel=args.parallel)
        combine_runs(dirs, run_dir, [m.name for m in load_config(args.config).methods])
    notes = args.notes.read_text() if args.notes and args.notes.exists() else None
    # A quick run records its own command line: its config is a path, not a shipped name.
    command = None
    if args.quick:
        command = " ".join(["python -m benchmarks.mini_mtil", *(sys.argv[1:] if argv is None else argv)])
    record = collect(args.config, run_dir, args.results_dir, args.name, timing, notes=notes, command=command)
    print(summary_table(record["results"]) + "\n" + claims_table(record["claims"]))
    return record


if __name__ == "__main__":
    main()
