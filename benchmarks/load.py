"""The quick demo on a shared machine: wall time and CPU time idle, and beside busy processes.

    python -m benchmarks.load                 # idle, then beside 2 busy processes; plus spinning threads
    python -m benchmarks.load --busy 2 --no-active
    python -m benchmarks.load --quick --results-dir /tmp/load   # the tiny config, beside 1 busy process

Each case runs `condu-cl run mini_mtil_quick` (what `make demo` runs) as a fresh process in its
own run folder and reads its CPU time from the operating system (the children's rusage), so
every thread and every process it starts is counted. The busy processes are plain Python loops,
one per core asked for, started before the run and stopped after it.

Three cases: idle; loaded (beside --busy loops) with the project's default OpenMP wait policy
(PASSIVE, fusion.threads); and, unless --no-active, loaded with OMP_WAIT_POLICY=ACTIVE, the
spinning that libgomp does at its barriers, to show what the default avoids. Targets: beside two
busy processes the demo's CPU time stays within 1.3x of the idle run's, its wall time within 3x.
Results: benchmarks/results/load.{json,md}. `--quick` runs benchmarks/configs/mini_mtil_tiny.yaml
beside one busy process, without the warm-up run and the spinning case.
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

DEMO_CONFIG = "mini_mtil_quick"  # what `make demo` runs
TARGET_CPU, TARGET_WALL = 1.3, 3.0
BUSY_LOOP = "while True: pass"


def run_demo(out: Path, config: str, policy: str) -> dict:
    """One run of the config as a fresh process: wall seconds, and its (and its children's) CPU seconds."""
    env = dict(os.environ, OMP_WAIT_POLICY=policy,
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cl_driver.cli", "run", config, "--out", str(out), "--no-progress"],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"the demo failed: {done.stderr.strip().splitlines()[-1:]}")
    return {"wall_s": wall, "user_s": after.ru_utime - before.ru_utime, "sys_s": after.ru_stime - before.ru_stime}


def with_busy(count: int, action):
    """Run `action()` while `count` busy-loop processes run beside it."""
    loops = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(count)]
    try:
        time.sleep(1.0)  # let them take their cores
        return action()
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def measure(args: argparse.Namespace, scratch: Path) -> dict:
    cases = {}
    if not args.quick:  # a first, unmeasured run fills the caches every later run finds (numba's kernels, pixels)
        run_demo(scratch / "warm", args.config, "PASSIVE")
    cases["idle"] = run_demo(scratch / "idle", args.config, "PASSIVE")
    print(f"idle: {cases['idle']}", file=sys.stderr)
    cases["loaded"] = with_busy(args.busy, lambda: run_demo(scratch / "loaded", args.config, "PASSIVE"))
    print(f"beside {args.busy} busy processes: {cases['loaded']}", file=sys.stderr)
    if args.active:
        cases["loaded_active"] = with_busy(args.busy, lambda: run_demo(scratch / "active", args.config, "ACTIVE"))
        print(f"same, spinning OpenMP threads: {cases['loaded_active']}", file=sys.stderr)
    return cases


def report(res: dict) -> str:
    idle = res["cases"]["idle"]
    rows = []
    for name, label in (("idle", "idle"), ("loaded", f"beside {res['busy']} busy processes"),
                        ("loaded_active", f"beside {res['busy']} busy processes, OMP_WAIT_POLICY=ACTIVE")):
        case = res["cases"].get(name)
        if case:
            cpu = case["user_s"] + case["sys_s"]
            rows.append(f"| {label} | {case['wall_s']:.0f} s | {case['wall_s'] / idle['wall_s']:.2f}x | "
                        f"{case['user_s']:.0f} s | {cpu / (idle['user_s'] + idle['sys_s']):.2f}x |")
    loaded = res["cases"]["loaded"]
    cpu_ratio = (loaded["user_s"] + loaded["sys_s"]) / (idle["user_s"] + idle["sys_s"])
    wall_ratio = loaded["wall_s"] / idle["wall_s"]
    verdict = (f"Beside {res['busy']} busy processes the demo's CPU time is {cpu_ratio:.2f}x the idle run's "
               f"(target <= {TARGET_CPU}x: {'met' if cpu_ratio <= TARGET_CPU else 'NOT met'}) and its wall time "
               f"{wall_ratio:.2f}x (target <= {TARGET_WALL}x: {'met' if wall_ratio <= TARGET_WALL else 'NOT met'}).")
    return "\n".join([
        "# The quick demo on a shared machine", "",
        f"Command: `{res['command']}`. Config `{res['config']}`"
        f"{' (what `make demo` runs)' if res['config'] == DEMO_CONFIG else ''}, a fresh process "
        f"each; CPU time is the process's and its children's, from the operating system. Machine: "
        f"{res['machine']['cpus']} CPUs, {res['machine']['platform']}.", "",
        "| case | wall | wall / idle | user CPU | CPU / idle |", "|---|---:|---:|---:|---:|", *rows, "",
        verdict, "",
        "Why: torch's intra-op threads (and numba's parallel regions) run on libgomp, whose threads spin at "
        "every barrier before they sleep. Beside other work a spinning thread takes the time slice that the "
        "thread it waits for needs, so each barrier costs a scheduler quantum of spinning. condu-cl and "
        "condu-fuse set OMP_WAIT_POLICY=PASSIVE before torch or numba load (fusion.threads; a value you set "
        "is kept)" + ("; the last row shows the same run with spinning threads." if "loaded_active" in res["cases"]
                      else "."), ""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.splitlines()[0])
    p.add_argument("--busy", type=int, default=None, help="busy-loop processes beside the loaded runs (default 2, "
                   "quick 1)")
    p.add_argument("--config", default=None, help=f"a shipped config name or a YAML path (default {DEMO_CONFIG})")
    p.add_argument("--active", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the loaded case with spinning OpenMP threads (default: yes, quick: no)")
    p.add_argument("--quick", action="store_true", help="the tiny config beside one busy process, no warm-up run, "
                   "no spinning case (with --results-dir)")
    p.add_argument("--results-dir", default=None, help="results folder (default benchmarks/results; required "
                   "with --quick)")
    args = p.parse_args(argv)
    out = results_folder(p, args.results_dir, quick=args.quick)
    args.config = args.config or (str(TINY_CONFIG) if args.quick else DEMO_CONFIG)
    args.busy = args.busy if args.busy is not None else (1 if args.quick else 2)
    args.active = args.active if args.active is not None else not args.quick
    scratch = Path(tempfile.mkdtemp(prefix="condu-load-"))
    try:
        cases = measure(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    res = {"command": "python -m benchmarks.load " + " ".join(sys.argv[1:] if argv is None else argv),
           "config": args.config, "busy": args.busy, "cases": cases,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_end": os.getloadavg()}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "load.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "load.md").write_text(report(res))
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
