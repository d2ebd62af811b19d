"""Helpers shared by the benchmark scripts: timing medians, result files, peak memory of a child run.

Every benchmark writes `benchmarks/results/<name>.json` (the numbers) and `<name>.md` (a table a
person reads), and records the machine and its load so noisy figures can be judged. A `--quick`
run writes only to the folder it is given: its tiny figures never replace the results of record.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import psutil

ROOT = Path(__file__).resolve().parents[1]  # the repository root: children run `-m benchmarks.<name>` from it
RESULTS_DIR = ROOT / "benchmarks" / "results"
TINY_CONFIG = ROOT / "benchmarks" / "configs" / "mini_mtil_tiny.yaml"  # the continual run of the quick modes
GIB = 1 << 30


def results_folder(parser: argparse.ArgumentParser, given: str | os.PathLike | None, *, quick: bool,
                   option: str = "--results-dir") -> Path:
    """The folder a run writes to: the one given, else benchmarks/results; a quick run must be given one."""
    if given is None and quick:
        parser.error(f"--quick writes only to a folder you name: add {option} FOLDER "
                     "(benchmarks/results keeps the figures of record)")
    return Path(given) if given is not None else RESULTS_DIR


def time_repeats(fn: Callable[[], Any], *, repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of `repeats` calls of fn, after `warmup` untimed calls (JIT, page faults)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def summarize(times: Sequence[float], nbytes: int) -> dict[str, float]:
    """Median, spread and throughput (GB/s of `nbytes`, at the median time) of timed runs."""
    median = statistics.median(times)
    return {
        "median_s": median,
        "min_s": min(times),
        "max_s": max(times),
        "repeats": len(times),
        "gbps": nbytes / median / 1e9,
        "gbps_best": nbytes / min(times) / 1e9,
    }


def machine_info() -> dict[str, Any]:
    """What the numbers ran on, and how busy the machine was (others share it)."""
    import torch

    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / GIB, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_results(name: str, data: dict[str, Any], markdown: str, *, out_dir: str | os.PathLike = RESULTS_DIR) -> list[Path]:
    """Write <name>.json and <name>.md under out_dir; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return [json_path, md_path]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats are printed with 3 significant digits."""
    def cell(value: Any) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def current_rss_bytes() -> int:
    """This process's resident set size now."""
    return psutil.Process().memory_info().rss


def reset_peak_rss() -> bool:
    """Restart the peak-RSS count from the current RSS (Linux >= 4.0); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def self_peak_rss_bytes() -> int:
    """This process's peak resident set size since start or the last reset_peak_rss()."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB, never reset


def run_child_measuring_rss(argv: Sequence[str], *, poll_s: float = 0.005, timeout_s: float = 1800) -> dict[str, Any]:
    """Run `python argv...` in a child, from the repository root (so `-m benchmarks.<name>` resolves);
    return the last JSON line it prints, plus the peak RSS that psutil saw while polling it
    (`polled_peak_rss_bytes`). The child should report its own exact peak (`self_peak_rss_bytes`)
    in its JSON: polling can miss a short spike."""
    child = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    peak = 0
    done = threading.Event()

    def poll() -> None:
        nonlocal peak
        proc = psutil.Process(child.pid)
        while not done.is_set():
            try:
                peak = max(peak, proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(poll_s)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        stdout, _ = child.communicate(timeout=timeout_s)
    finally:
        done.set()
        watcher.join()
    if child.returncode != 0:
        raise RuntimeError(f"benchmark child {' '.join(argv)} failed with exit code {child.returncode}")
    report = json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])
    report["polled_peak_rss_bytes"] = peak
    return report
