"""Figures of the ConDU store: speed, peak memory, storage and decouple, next to the official way.

    python -m benchmarks.fusion_store                  # 64M parameters a checkpoint, T = 2, 4, 8, 16
    python -m benchmarks.fusion_store --quick --results-dir /tmp/fusion_store   # 64K parameters, T = 2, 4

The workload is made here: a base and T fine-tuned fp32 checkpoints in transformer-like tensors,
written as safetensors tensor by tensor. The peer is `official_baseline.py` (whole state dicts,
bool masks, torch.save; run as `python -m benchmarks.official_baseline`), measured in the same run.

- unify and add, on both sides, run as the commands a user runs (`condu-fuse ...`, and the peer's
  script), each a fresh process: times include start-up; peak memory is the process's own
  ru_maxrss, plus the peak of its anonymous memory sampled from outside.
- decouple, copy and the cost of checking every read run as processes forked from this one
  (libraries already imported, so they compare the work itself), checked and unchecked interleaved.
- start-up: `condu-fuse --help` and a unify of tiny checkpoints, fresh processes.
- decouple by model size (`--decouple-params`, default 500M; `--decouple-only` measures just these
  rows into the saved results): one task of a store of that size to a file and to a folder, each
  beside `cp` + `sync` of the same output bytes, forked processes, paired and in alternating order.
Times are medians of `--repeats` runs. Results go to benchmarks/results/fusion_store.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch

from benchmarks._common import ROOT, results_folder

MiB, GiB = 1 << 20, 1 << 30
RESULT_NAME = "fusion_store"
TARGET_SPEEDUP = 6.0
TARGET_CHECKS = 0.10  # what checking every read may add to a decouple or an add
TARGET_STARTUP = 0.5  # seconds: condu-fuse --help, and a tiny unify
TARGET_PEAK = 1 * GiB
TARGET_DECOUPLE = 1.2  # decouple's time over a synced copy of the same output bytes, at every model size


# ---------------------------------------------------------------- the workload

@dataclass(frozen=True)
class TensorPlan:
    """One tensor of the synthetic model: kind picks how its values and deltas are drawn."""

    name: str
    shape: tuple[int, ...]
    kind: str  # embedding | weight | bias | norm | buffer

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def dtype(self) -> torch.dtype:
        return torch.int64 if self.kind == "buffer" else torch.float32


def parse_count(text: str) -> int:
    """'64M' -> 64 * 2**20, '512K' -> 512 * 2**10, '1000' -> 1000."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    if text[-1:] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def hidden_size(params: int) -> int:
    """A width that gives a handful of layers at this size, as real models of that size have."""
    for width, at_least in ((768, 48 * MiB), (512, 16 * MiB), (256, 2 * MiB)):
        if params >= at_least:
            return width
    return 128


def layer_plan(i: int, d: int) -> list[TensorPlan]:
    """One transformer block: attention q/k/v/o, two layer norms, MLP up/down."""
    p = f"layers.{i}."
    plans = []
    for proj in "qkvo":
        plans += [TensorPlan(f"{p}attn.{proj}_proj.weight", (d, d), "weight"),
                  TensorPlan(f"{p}attn.{proj}_proj.bias", (d,), "bias")]
    for norm in ("norm1", "norm2"):
        plans += [TensorPlan(f"{p}{norm}.weight", (d,), "norm"), TensorPlan(f"{p}{norm}.bias", (d,), "bias")]
    plans += [TensorPlan(f"{p}mlp.up.weight", (4 * d, d), "weight"), TensorPlan(f"{p}mlp.up.bias", (4 * d,), "bias"),
              TensorPlan(f"{p}mlp.down.weight", (d, 4 * d), "weight"), TensorPlan(f"{p}mlp.down.bias", (d,), "bias")]
    return plans


def model_plan(params: int, positions: int = 512) -> list[TensorPlan]:
    """About `params` parameters: blocks take ~70%, the token embedding the rest."""
    d = hidden_size(params)
    per_layer = 12 * d * d + 13 * d
    layers = max(1, round(0.7 * params / per_layer))
    vocab = max(16, (params - layers * per_layer - positions * d - 2 * d) // d)
    plans = [TensorPlan("embed_tokens.weight", (vocab, d), "embedding"),
             TensorPlan("embed_positions.weight", (positions, d), "weight"),
             TensorPlan("position_ids", (1, positions), "buffer"),
             TensorPlan("token_type_ids", (1, positions), "buffer")]
    for i in range(layers):
        plans += layer_plan(i, d)
    return plans + [TensorPlan("final_norm.weight", (d,), "norm"), TensorPlan("final_norm.bias", (d,), "bias"),
                    TensorPlan("pooler.num_batches_tracked", (), "buffer")]


def generator(seed: int, task: int, k: int) -> torch.Generator:
    """One seeded stream per (task, tensor): any tensor can be drawn alone, in any order."""
    return torch.Generator().manual_seed(seed * 1_000_003 + task * 10_007 + k)


def base_tensor(plan: TensorPlan, gen: torch.Generator) -> torch.Tensor:
    if plan.kind == "buffer":
        return torch.arange(plan.numel, dtype=torch.int64).reshape(plan.shape)
    values = torch.randn(plan.shape, generator=gen) * 0.02
    return values + 1.0 if plan.kind == "norm" else values


def task_delta(plan: TensorPlan, gen: torch.Generator) -> torch.Tensor:
    """A fine-tuning delta: small Gaussian at a per-tensor scale, ~10% exact zeros; an
    embedding moves only the rows its task saw; a norm is sometimes frozen."""
    scale = 1e-3 * math.exp(0.5 * float(torch.randn((), generator=gen)))
    delta = torch.randn(plan.shape, generator=gen) * scale
    if plan.kind == "embedding":
        delta *= (torch.rand(plan.shape[0], generator=gen) < 0.25)[:, None]
    elif plan.kind == "norm" and float(torch.rand((), generator=gen)) < 0.3:
        delta.zero_()
    return delta.masked_fill_(torch.rand(plan.shape, generator=gen) < 0.1, 0.0)


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.int64: "I64"}


def safetensors_header(plans: list[TensorPlan]) -> bytes:
    """The safetensors header for tensors written back to back in `plans` order."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for p in plans:
        nbytes = p.numel * p.dtype.itemsize
        header[p.name] = {"dtype": SAFETENSORS_DTYPES[p.dtype], "shape": list(p.shape),
                          "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


@dataclass
class Workload:
    base: str
    checkpoints: list[str]
    checkpoint_bytes: int  # one fp32 checkpoint file
    params: int
    fused_numel: int  # float elements, the ones with a mask bit per task
    tensors: int


def write_workload(workdir: Path, plans: list[TensorPlan], num_tasks: int, seed: int) -> Workload:
    """Write the base and every fine-tune at once, one tensor at a time: memory stays one tensor.
    A --workdir that already holds this exact workload is reused."""
    paths = [workdir / "base.safetensors"] + [workdir / f"task{i:02d}.safetensors" for i in range(1, num_tasks + 1)]
    marker = workdir / "workload.json"
    recipe = {"tensors": [asdict(p) for p in plans], "tasks": num_tasks, "seed": seed}
    if not (marker.exists() and json.loads(marker.read_text()) == json.loads(json.dumps(recipe))):
        marker.unlink(missing_ok=True)
        _write_checkpoints(paths, plans, seed)
        marker.write_text(json.dumps(recipe))
    fused = sum(p.numel for p in plans if p.kind != "buffer")
    return Workload(str(paths[0]), [str(p) for p in paths[1:]], paths[0].stat().st_size,
                    sum(p.numel for p in plans), fused, len(plans))


def _write_checkpoints(paths: list[Path], plans: list[TensorPlan], seed: int) -> None:
    header = safetensors_header(plans)
    files = [open(p, "wb") for p in paths]
    try:
        for f in files:
            f.write(header)
        for k, plan in enumerate(plans):
            base = base_tensor(plan, generator(seed, 0, k))
            files[0].write(base.numpy().tobytes())
            for task, f in enumerate(files[1:], start=1):
                tuned = base if plan.kind == "buffer" else base + task_delta(plan, generator(seed, task, k))
                f.write(tuned.numpy().tobytes())
        for f in files:
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in files:
            f.close()


# ---------------------------------------------------------------- the measured operations
# Each runs in a fresh process; it returns {"seconds": ...} and its own facts.

def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def dir_bytes(path: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _timed(fn, *args, **kwargs) -> dict:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return {"seconds": time.perf_counter() - start}


def op_noop() -> dict:
    return {"seconds": 0.0}


def op_store_decouple(store_dir, task, out, checked: bool = True) -> dict:
    from fusion import Store
    if not checked:
        _skip_checks()
    return _timed(lambda: Store.open(store_dir).decouple(task, out))


def op_store_add_copy(store_dir, checkpoint, scratch, checked: bool = True) -> dict:
    """add to a copy of a store (the original stays for the next run), checked or not."""
    from fusion import Store
    copy = Path(scratch) / "add-copy"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(store_dir, copy)
    if not checked:
        _skip_checks()
    result = _timed(lambda: Store.open(copy, device="cpu").add(checkpoint))
    shutil.rmtree(copy, ignore_errors=True)
    return result


def _skip_checks() -> None:
    """For measuring what checking costs: open the store's files and the base without their checksums.

    Only in a measured child process; the product has no such switch."""
    from fusion.io import Checkpoint, SafetensorsFile
    import fusion.store.snapshot as snapshot
    snapshot.open_base = lambda manifest, path=None: Checkpoint(path or manifest.base.path)
    snapshot._open_file = lambda store_dir, manifest, rel: SafetensorsFile(store_dir / rel)
    import fusion.store.front as front
    front.open_base = snapshot.open_base


def _timed_cpu(fn) -> dict:
    """Wall and CPU seconds (user + system, this process's threads together) of fn()."""
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fn()
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return {"seconds": seconds, "cpu": after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime}


def op_decouple_to(store_dir, task, out) -> dict:
    """decouple to a file (out ends in .safetensors) or a model folder, timed with its CPU seconds."""
    from fusion import Store
    return _timed_cpu(lambda: Store.open(store_dir).decouple(task, out))


def op_copy_synced(src, dst) -> dict:
    """What `cp` and `sync` do with a decoupled output (a file, or a folder's files): copy, fsync each."""
    def copy():
        if Path(src).is_dir():
            shutil.copytree(src, dst)
            for path in sorted(Path(dst).iterdir()):
                _fsync_file(path)
            fd = os.open(dst, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        else:
            shutil.copyfile(src, dst)
            _fsync_file(Path(dst))
    return _timed_cpu(copy)


def op_copy(src, dst) -> dict:
    """A plain file copy, synced: the speed limit of writing a checkpoint."""
    def copy():
        shutil.copyfile(src, dst)
        _fsync_file(Path(dst))
    return _timed(copy)


def op_load_save(src, dst) -> dict:
    """safetensors load_file + save_file of one checkpoint, synced."""
    from safetensors.torch import load_file, save_file

    def load_save():
        save_file(load_file(src), dst)
        _fsync_file(Path(dst))
    return _timed(load_save)


def op_compare(store_dir, official_dir, base, scratch) -> dict:
    """Same rules, same answer: the store's unified delta vs the official one, and task 1 rebuilt."""
    from safetensors.torch import load_file
    from fusion import Store
    from benchmarks import official_baseline as ob
    unified_files = sorted(Path(store_dir).glob("unified*.safetensors"))
    stored = {k: v for f in unified_files for k, v in load_file(str(f)).items()}
    unified, masks, rescalers = ob.load_state(official_dir)
    shared = [k for k in unified if k in stored]
    equal = all(torch.equal(stored[k].reshape(unified[k].shape), unified[k]) for k in shared)
    out = Path(scratch) / "compare-task1.safetensors"
    Store.open(store_dir).decouple(1, out)
    rebuilt, theta0 = load_file(str(out)), ob.load_state_dict(base)
    official = ob.reconstruct(unified, masks[0], rescalers[0])
    # Relative to the weights: both sides round theta0 + delta to fp32 once.
    worst = max(float((rebuilt[k] - (theta0[k] + official[k])).abs().max() / rebuilt[k].abs().max().clamp(min=1e-30))
                for k in official)
    out.unlink()
    return {"seconds": 0.0, "unified_tensors_compared": len(shared), "unified_tensors_official": len(unified),
            "unified_bit_equal": bool(equal and len(shared) == len(unified)),
            "task1_max_rel_error": worst}  # of the weights


def op_read_rate(paths) -> dict:
    """Read files from the page cache with preadv into one buffer, one thread: the read side's speed."""
    buffer, total = bytearray(8 << 20), 0
    start = time.perf_counter()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            offset = 0
            while got := os.preadv(fd, [buffer], offset):
                offset += got
            total += offset
        finally:
            os.close(fd)
    return {"seconds": time.perf_counter() - start, "bytes": total}


OPS = {name[3:]: fn for name, fn in globals().items() if name.startswith("op_")}


# ---------------------------------------------------------------- isolated runs and memory

def _child_main(conn, op: str, kwargs: dict, threads: int) -> None:
    try:
        torch.set_num_threads(threads)
        result = OPS[op](**kwargs)
        result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        conn.send(("ok", result))
    except BaseException as exc:  # report, never hang the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def _memory_sample(proc: psutil.Process) -> tuple[int, int]:
    """(rss, anonymous rss) now; file-backed pages are rss - anonymous."""
    info = proc.memory_info()
    return info.rss, info.rss - info.shared


# Threads of every measured process: --threads, or what torch picks in a fresh process.
THREADS = [torch.get_num_threads()]


def run_isolated(op: str, **kwargs) -> dict:
    """Run one operation in a fresh forked process; add its peak RSS and sampled peak anonymous memory.

    The fork starts from this small orchestrating process (libraries imported, nothing held),
    the same floor for every operation; `noop` measures that floor."""
    ctx, started = mp.get_context("fork"), time.perf_counter()
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child_main, args=(sender, op, kwargs, THREADS[0]))
    child.start()
    sender.close()
    peak_anon, watched = 0, psutil.Process(child.pid)
    while not receiver.poll(0.02):
        try:
            peak_anon = max(peak_anon, _memory_sample(watched)[1])
        except psutil.Error:
            pass
        if not child.is_alive() and not receiver.poll(0.2):
            break
    try:
        status, payload = receiver.recv()
    except EOFError:
        status, payload = "error", f"process died (exit code {child.exitcode}, killed for memory?)"
    child.join()
    if status == "error":
        print(f"  ! {op}: {payload}", file=sys.stderr)
        return {"error": payload}
    print(f"  {op}: {payload['seconds']:.2f} s of {time.perf_counter() - started:.2f} s, "
          f"peak RSS {payload['peak_rss'] / MiB:.0f} MiB", file=sys.stderr)
    return {**payload, "peak_anon": peak_anon}


# Runs a command and reports its peak RSS. The measuring process is this small one, not the
# benchmark: a child forked from a large process would count the parent's pages (shared until
# exec) in its own ru_maxrss.
# It times the command itself too, so its own start-up is not counted, and reports the command's
# CPU seconds (user, system): beside the wall time they say whether a pass was waiting or working.
LAUNCHER = ("import resource, subprocess, sys, time; start = time.perf_counter(); code = subprocess.call(sys.argv[1:]); "
            "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
            "print(u.ru_maxrss * 1024, time.perf_counter() - start, u.ru_utime, u.ru_stime, "
            "file=sys.stderr); sys.exit(code)")


def run_process(command: list[str]) -> dict:
    """One command as a fresh process, start-up included: wall seconds, its peak RSS (ru_maxrss, through
    a small launcher), and the peak of its anonymous memory sampled from outside."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # a user's Python caches bytecode: start-up is measured that way
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, *command], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env, cwd=ROOT)
    launcher, peak_anon = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak_anon = max([peak_anon] + [_memory_sample(c)[1] for c in launcher.children()])
        except psutil.Error:
            pass
        time.sleep(0.01)
    lines = proc.stderr.read().decode(errors="replace").strip().splitlines()
    proc.stderr.close()
    name = " ".join(Path(command[1]).name if i == 1 else c for i, c in enumerate(command[:4]))
    if proc.returncode:
        error = lines[-2] if len(lines) > 1 else f"exit code {proc.returncode}"
        print(f"  ! {name}: {error}", file=sys.stderr)
        return {"error": error}
    fields = lines[-1].split()
    peak_rss, seconds, user, system = int(fields[0]), float(fields[1]), float(fields[2]), float(fields[3])
    print(f"  {name}: {seconds:.2f} s, CPU {user:.2f} + {system:.2f} s, peak RSS {peak_rss / MiB:.0f} MiB",
          file=sys.stderr)
    return {"seconds": seconds, "cpu_user": user, "cpu_system": system, "peak_rss": peak_rss, "peak_anon": peak_anon}


def store_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fusion.cli", *args]


def official_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.official_baseline", *args]


# ---------------------------------------------------------------- the figures

def median_of(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else None


def summarize(runs: list[dict]) -> dict:
    """Median time, largest peak memory, every run kept."""
    errors = [r["error"] for r in runs if "error" in r]
    good = [r for r in runs if "error" not in r]
    return {"seconds": median_of(good, "seconds"), "cpu_user": median_of(good, "cpu_user"),
            "cpu_system": median_of(good, "cpu_system"),
            "peak_rss": max((r["peak_rss"] for r in good), default=None),
            "peak_anon": max((r["peak_anon"] for r in good), default=None),
            "runs": runs, **({"errors": errors} if errors else {})}


def official_need(wl: Workload, tasks: int) -> int:
    """Rough peak of the in-memory peer: base, T task vectors, their sum, unified, temporaries,
    one loaded fine-tune, and T bool masks of one byte per parameter."""
    return (tasks + 5) * wl.checkpoint_bytes + tasks * wl.fused_numel


class Bench:
    """The run's state: workload, scratch space, options, and the clock of the official side."""

    def __init__(self, wl: Workload, scratch: Path, args: argparse.Namespace):
        self.wl, self.scratch, self.args = wl, scratch, args
        self.official_limit = int(args.official_max_gib * GiB)
        self.deadline = time.monotonic() + args.official_budget_min * 60 if args.official_budget_min else None

    def ckpts(self, tasks: int) -> list[str]:
        return self.wl.checkpoints[:tasks]

    def official_blocked(self, tasks: int) -> str | None:
        """Why an official-style run at T tasks is not made (memory or the time budget), or None."""
        need, free = official_need(self.wl, tasks), psutil.virtual_memory().available
        if need > min(self.official_limit, 0.8 * free):
            return (f"not run: needs about {need / GiB:.1f} GiB; limit {self.official_limit / GiB:.1f} GiB, "
                    f"{free / GiB:.1f} GiB available")
        if self.deadline and time.monotonic() > self.deadline:
            return f"not run: the official side's time budget ({self.args.official_budget_min} min) was spent"
        return None

    def store_unify(self, tasks: int, tag: str, dtype: str | None = None) -> tuple[dict, Path]:
        out = self.scratch / f"store-{tag}"
        options = ["--dtype", dtype] if dtype else []
        return run_process(store_command("unify", "-q", "--device", "cpu", "--rescaler", self.args.rescaler, *options,
                                         "--store", str(out), "--base", self.wl.base, *self.ckpts(tasks))), out

    def official_unify(self, tasks: int, tag: str) -> tuple[dict, Path]:
        out = self.scratch / f"official-{tag}"
        blocked = self.official_blocked(tasks)
        if blocked:
            return {"skipped": blocked}, out
        return run_process(official_command("unify", self.wl.base, str(out), *self.ckpts(tasks))), out


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def measure_unify(bench: Bench, tasks: int, repeats: int) -> dict:
    """Both sides, interleaved; sizes from the first run; the first run's folders are kept."""
    store_runs, official_runs, kept = [], [], {}
    for r in range(repeats):
        print(f"unify T={tasks} run {r + 1}/{repeats}", file=sys.stderr)
        result, store_dir = bench.store_unify(tasks, f"T{tasks}-r{r}")
        store_runs.append(result)
        official, official_dir = bench.official_unify(tasks, f"T{tasks}-r{r}")
        official_runs.append(official)
        if r == 0:
            kept = {"store_dir": store_dir, "official_dir": official_dir,
                    "store_bytes": dir_bytes(store_dir) if "error" not in result else None,
                    "official_bytes": dir_bytes(official_dir) if "seconds" in official else None}
        else:
            remove_tree(store_dir), remove_tree(official_dir)
    skipped = next((o["skipped"] for o in official_runs if "skipped" in o), None)
    official = {"skipped": skipped} if skipped else summarize(official_runs)
    return {"tasks": tasks, "store": summarize(store_runs), "official": official, **kept}


def measure_add(bench: Bench, unified: dict) -> dict:
    """The continual step on what unify left: add task T+1 to the store of T, and to the
    official-style state of T. Both folders are removed afterwards."""
    tasks, store_dir, official_dir = unified["tasks"], unified.pop("store_dir"), unified.pop("official_dir")
    checkpoint = bench.wl.checkpoints[tasks]
    print(f"add task {tasks + 1} to T={tasks}", file=sys.stderr)
    store = {"error": "no store to add to"} if "error" in unified["store"] else run_process(
        store_command("add", "-q", "--device", "cpu", "--store", str(store_dir), checkpoint))
    store_bytes = dir_bytes(store_dir) if "error" not in store else None
    official = {"skipped": unified["official"].get("skipped", "not run: no official state to add to")}
    if "seconds" in unified["official"]:
        out = bench.scratch / f"official-T{tasks + 1}-added"
        blocked = bench.official_blocked(tasks + 1)
        official = {"skipped": blocked} if blocked else run_process(
            official_command("add", bench.wl.base, str(official_dir), checkpoint, str(out)))
        remove_tree(out)
    remove_tree(store_dir), remove_tree(official_dir)
    return {"tasks": tasks + 1, "store": store, "official": official, "store_bytes": store_bytes}


def measure_decouple(bench: Bench, store_dir: Path, repeats: int) -> dict:
    """Rebuild task 1 as one safetensors file vs copying one checkpoint, both synced."""
    src = bench.wl.checkpoints[0]
    runs: dict[str, list] = {"decouple": [], "copy": [], "load_save": []}
    for r in range(repeats):
        print(f"decouple run {r + 1}/{repeats}", file=sys.stderr)
        for name in runs:
            out = bench.scratch / f"{name}-{r}.safetensors"
            kwargs = {"store_dir": str(store_dir), "task": 1, "out": str(out)} if name == "decouple" else {"src": src, "dst": str(out)}
            runs[name].append(run_isolated("store_decouple" if name == "decouple" else name, **kwargs))
            out.unlink(missing_ok=True)
    return {name: summarize(r) for name, r in runs.items()}


def measure_decouple_size(params: int, work: Path, args: argparse.Namespace) -> dict:
    """Decouple one task at `params` parameters to a file and to a folder, each beside a synced copy of
    the same output bytes (the first decouple's output, read once into the page cache as the store
    and the base are), in alternating order; medians of the times and of the paired ratios."""
    folder = work / f"decouple-{params}"
    folder.mkdir(parents=True, exist_ok=True)
    wl = write_workload(folder, model_plan(params), 1, args.seed)
    store = folder / "store"
    remove_tree(store)
    unified = run_process(store_command("unify", "-q", "--device", "cpu", "--rescaler", args.rescaler,
                                        "--store", str(store), "--base", wl.base, *wl.checkpoints))
    result = {"params": wl.params, "checkpoint_bytes": wl.checkpoint_bytes, "unify": unified}
    if "error" in unified:
        return result
    scratch = folder / "runs"
    remove_tree(scratch), scratch.mkdir()
    sources = {"file": scratch / "source.safetensors", "folder": scratch / "source"}
    for kind, source in sources.items():  # the outputs the copies copy; also each side's warm-up
        run_isolated("decouple_to", store_dir=str(store), task=1, out=str(source))
    inputs = [wl.base, *map(str, store.rglob("*.safetensors"))]
    warm_page_cache(inputs + [str(p) for s in sources.values() for p in ([s] if s.is_file() else s.iterdir())])
    result["output_bytes"] = {kind: dir_bytes(s) if s.is_dir() else s.stat().st_size for kind, s in sources.items()}
    runs = {kind: {"decouple": [], "copy": []} for kind in sources}
    for r in range(args.repeats):
        print(f"decouple {fmt_params(wl.params)} run {r + 1}/{args.repeats}", file=sys.stderr)
        for kind, source in sources.items():
            out = scratch / (f"out-{kind}" + (".safetensors" if kind == "file" else ""))
            order = ("decouple", "copy") if (r + (kind == "folder")) % 2 == 0 else ("copy", "decouple")
            for side in order:  # neither side always goes first
                if side == "decouple":
                    runs[kind][side].append(run_isolated("decouple_to", store_dir=str(store), task=1, out=str(out)))
                else:
                    runs[kind][side].append(run_isolated("copy_synced", src=str(source), dst=str(out)))
                remove_tree(out) if out.is_dir() else out.unlink(missing_ok=True)
    for kind, sides in runs.items():
        paired = [d["seconds"] / c["seconds"] for d, c in zip(sides["decouple"], sides["copy"])
                  if "seconds" in d and "seconds" in c]
        result[kind] = {side: {**summarize(r), "cpu": median_of(r, "cpu")} for side, r in sides.items()}
        result[kind]["ratio"] = statistics.median(paired) if paired else None
        result[kind]["paired_ratios"] = paired
    remove_tree(scratch), remove_tree(store)
    return result


def measure_decouple_sizes(args: argparse.Namespace, work: Path) -> dict:
    sizes = [parse_count(p) for p in args.decouple_params.split(",") if p.strip() and parse_count(p)]
    return {"command": "python -m benchmarks.fusion_store " + " ".join(sys.argv[1:]), "repeats": args.repeats,
            "loadavg_start": os.getloadavg(), "rows": [measure_decouple_size(n, work, args) for n in sizes],
            "loadavg_end": os.getloadavg()}


def measure_checks(bench: Bench, store_dir: Path, tasks: int, repeats: int) -> dict:
    """What checking every read costs: decouple and add, with the checksums and without, interleaved."""
    runs: dict[str, list] = {"decouple": [], "decouple_unchecked": [], "add": [], "add_unchecked": []}
    checkpoint = bench.wl.checkpoints[tasks]

    def one(r: int, checked: bool) -> None:
        suffix = "" if checked else "_unchecked"
        out = bench.scratch / f"checks-{r}-{checked}.safetensors"
        runs["decouple" + suffix].append(run_isolated("store_decouple", store_dir=str(store_dir), task=1,
                                                      out=str(out), checked=checked))
        out.unlink(missing_ok=True)
        runs["add" + suffix].append(run_isolated("store_add_copy", store_dir=str(store_dir), checkpoint=checkpoint,
                                                 scratch=str(bench.scratch), checked=checked))

    one(-1, True), one(-1, False)  # warm-up, not counted: page cache and fresh memory as a user's runs find them
    for name in runs:
        runs[name].clear()
    for r in range(repeats):
        print(f"checks run {r + 1}/{repeats}", file=sys.stderr)
        for checked in ((True, False) if r % 2 == 0 else (False, True)):  # neither side always goes first
            one(r, checked)
    result = {name: summarize(r) for name, r in runs.items()}
    for op in ("decouple", "add"):
        checked, unchecked = result[op]["seconds"], result[op + "_unchecked"]["seconds"]
        result[op + "_overhead"] = checked / unchecked - 1 if checked and unchecked else None
    return result


def measure_startup(work: Path, repeats: int) -> dict:
    """`condu-fuse --help` and a unify of tiny checkpoints, each a fresh process."""
    from fusion.testing.checkpoints import tiny_base, tiny_finetune, write_checkpoint

    tiny = work / "tiny"
    base = tiny_base()
    paths = [str(write_checkpoint(base, tiny / "base.safetensors"))]
    paths += [str(write_checkpoint(tiny_finetune(base, seed=i), tiny / f"ft{i}.safetensors")) for i in range(2)]
    runs: dict[str, list] = {"help": [], "tiny_unify": []}
    run_process(store_command("--help"))  # the first run writes the bytecode caches a user's later runs find
    for r in range(repeats):
        runs["help"].append(run_process(store_command("--help")))
        store = tiny / f"store-{r}"
        runs["tiny_unify"].append(run_process(store_command("unify", "-q", "--store", str(store), "--base", *paths)))
        remove_tree(store)
    return {name: summarize(r) for name, r in runs.items()}


def measure_bounds(bench: Bench, tasks: int) -> dict:
    """The rates a pass is made of: reading checkpoints from the page cache (one thread)."""
    result = run_isolated("read_rate", paths=bench.ckpts(tasks))
    return {"read_gbps": result["bytes"] / result["seconds"] / 1e9 if "seconds" in result else None}


# ---------------------------------------------------------------- derived figures and checks

def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def storage_row(bench: Bench, tasks: int, made_by: str, store_bytes: int | None,
                official_bytes: int | None, dtype: str = "float32") -> dict:
    """Store size vs the bound, T separate checkpoints and the official bool-mask layout."""
    one = bench.wl.checkpoint_bytes if dtype == "float32" else bench.wl.checkpoint_bytes / 2
    per_task_share = 32 if dtype == "float32" else 16  # a mask bit is 1/32 of an fp32 value, 1/16 of a bf16 one
    bound = (1 + tasks / per_task_share) * one * 1.01
    return {"tasks": tasks, "made_by": made_by, "dtype": dtype, "store_bytes": store_bytes, "bound_bytes": bound,
            "within_bound": store_bytes is not None and store_bytes <= bound,
            "separate_bytes": tasks * one,
            "official_bytes": official_bytes or (official_layout_estimate(bench.wl, tasks) if dtype == "float32" else None),
            "official_measured": official_bytes is not None}


def storage_rows(bench: Bench, unify: list[dict], adds: list[dict], bf16: dict | None) -> list[dict]:
    rows = [storage_row(bench, u["tasks"], "unify", u.get("store_bytes"), u.get("official_bytes")) for u in unify]
    rows += [storage_row(bench, a["tasks"], "add", a.get("store_bytes"), None) for a in adds]
    if bf16:
        rows.append(storage_row(bench, bf16["tasks"], "unify", bf16["store_bytes"], None, dtype="bfloat16"))
    return sorted(rows, key=lambda r: (r["dtype"] != "float32", r["tasks"]))


def official_layout_estimate(wl: Workload, tasks: int) -> int:
    """Computed when not measured: fp32 unified delta plus one bool byte per fused parameter per task."""
    return wl.fused_numel * 4 + tasks * wl.fused_numel


def memory_verdict(rows: list[dict], checkpoint_bytes: int) -> dict:
    """At most 1 GiB everywhere, and flat: growth per added task under 5% of one checkpoint."""
    verdict = {}
    for op in ("unify", "add"):
        peaks = [(r[op].get("tasks", r["tasks"]), r[op]["store"].get("peak_rss")) for r in rows]
        peaks = [(t, p) for t, p in peaks if p]
        if not peaks:
            continue
        (t0, p0), (t1, p1) = peaks[0], peaks[-1]
        per_task = (p1 - p0) / (t1 - t0) if t1 > t0 else 0.0
        verdict[op] = {"max_peak_rss": max(p for _, p in peaks), "growth_per_task": per_task,
                       "growth_per_task_of_checkpoint": per_task / checkpoint_bytes,
                       "within_1_gib": max(p for _, p in peaks) <= TARGET_PEAK,
                       "flat": per_task <= 0.05 * checkpoint_bytes}
    return verdict


def machine_facts() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "torch_threads": THREADS[0], "memory_gib": round(psutil.virtual_memory().total / GiB, 1),
            "platform": platform.platform(), "loadavg_start": os.getloadavg()}


# ---------------------------------------------------------------- output

def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.0f} MiB" if n >= 100 * MiB else f"{n / MiB:.2f} MiB"


def fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s"


def fmt_params(n: int) -> str:
    """64M, 500M, 64K: parameter counts as the options spell them (binary multiples)."""
    return f"{n / MiB:.0f}M" if n >= MiB else f"{n / 1024:.0f}K"


def fmt_x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def side_cell(side: dict, key: str, fmt) -> str:
    """A table cell: the value, or why there is none."""
    if "skipped" in side:
        return "not run (memory)"
    if "error" in side or side.get("errors") and side.get(key) is None:
        return "error"
    return fmt(side.get(key))


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def run_times(side: dict) -> str:
    return ", ".join(f"{r['seconds']:.2f}" for r in side.get("runs", []) if "seconds" in r) or "-"


def speed_section(res: dict) -> list[str]:
    u = res["unify_speed"]
    rows = [[f"unify, T = {u['tasks']}", side_cell(u["store"], "seconds", fmt_s),
             side_cell(u["official"], "seconds", fmt_s), fmt_x(res["speedup"]), f">= {TARGET_SPEEDUP:.0f}x"]]
    return ["## Unify speed (a fresh process each: start-up, read, fuse, write, fsync)", ""] + table(
        ["operation", "condu-fuse unify", "official-style", "speed-up", "target"], rows) + [
        "", f"Every run, in order (s): store {run_times(u['store'])}; official-style {run_times(u['official'])}. "
            "The speed-up is the ratio of the medians. Both sides are timed as the commands a user runs, "
            "process start-up included (`import torch` for the official-style side; numpy and the cpu kernel's "
            f"backend, `{res.get('backend', 'numba')}`, for the store, built or compiled once before the first run)."
    ] + cpu_lines(u)


def cpu_lines(u: dict) -> list[str]:
    """CPU seconds beside wall seconds: how many cores each side kept busy."""
    lines = []
    for label, side in (("condu-fuse unify", u["store"]), ("official-style", u["official"])):
        if side.get("cpu_user") is None or not side.get("seconds"):
            continue
        cpu = side["cpu_user"] + side["cpu_system"]
        lines.append(f"- {label}: {cpu:.2f} CPU-s ({side['cpu_user']:.2f} user, {side['cpu_system']:.2f} system) "
                     f"in {side['seconds']:.2f} s: {cpu / side['seconds']:.2f} of {os.cpu_count()} cores busy on average.")
    return [""] + lines if lines else []


def checks_section(res: dict) -> list[str]:
    c = res["checks"]
    pct = lambda x: "-" if x is None else f"{100 * x:+.1f}%"  # noqa: E731
    rows = [[op, side_cell(c[op], "seconds", fmt_s), side_cell(c[op + "_unchecked"], "seconds", fmt_s),
             pct(c[op + "_overhead"]), f"<= {100 * TARGET_CHECKS:.0f}%"] for op in ("decouple", "add")]
    return ["## What checking every read costs", ""] + table(
        ["operation", "checked (the product)", "unchecked", "cost", "target"], rows) + [
        "", "Unchecked: the same code with the store's files and the base opened without their block checksums "
            "(a switch of the benchmark only). In-process times (each run a forked process), medians of "
            f"{len(c['decouple'].get('runs', []))} runs in alternating order after one warm-up run of each: on this "
            "virtual machine the first touch of fresh memory and page-cache refills cost tenths of a second at "
            "random, and whichever side ran first paid them."]


def startup_section(res: dict) -> list[str]:
    st = res["startup"]
    rows = [[name, side_cell(st[key], "seconds", fmt_s), side_cell(st[key], "peak_rss", fmt_bytes),
             f"< {TARGET_STARTUP} s"] for name, key in (("condu-fuse --help", "help"),
                                                         ("condu-fuse unify, tiny checkpoints", "tiny_unify"))]
    return ["## Start-up of the command line (CPU path, no torch)", ""] + table(
        ["command", "time", "peak RSS", "target"], rows)


def bounds_section(res: dict) -> list[str]:
    b = res["bounds"]
    gb = lambda x: "-" if x is None else f"{x:.2f} GB/s"  # noqa: E731
    return ["## What bounds a pass", "",
            f"- reading checkpoints out of the page cache, one thread: {gb(b['read_gbps'])}; a pass reads every "
            "checkpoint whole (and the base, and for add the stored state), on two reader threads;",
            f"- fsync'd writes (a plain copy of one checkpoint, synced): {gb(b['fsync_write_gbps'])}; a pass writes "
            "the unified delta and the triggers and starts their writeback as it goes, so the final fsync waits for "
            "the tail only;",
            "- the kernel: `benchmarks/results/kernels.md` (two threads). On two cores the reads, the "
            "kernel and the writes share the CPU: the pipeline overlaps them, it cannot add cores."]


def memory_section(res: dict) -> list[str]:
    rows = [[str(r["tasks"]), side_cell(r["unify"]["store"], "peak_rss", fmt_bytes),
             side_cell(r["unify"]["store"], "peak_anon", fmt_bytes),
             side_cell(r["unify"]["official"], "peak_rss", fmt_bytes),
             f"{r['tasks']} -> {r['add']['tasks']}", side_cell(r["add"]["store"], "peak_rss", fmt_bytes),
             side_cell(r["add"]["store"], "peak_anon", fmt_bytes),
             side_cell(r["add"]["official"], "peak_rss", fmt_bytes)] for r in res["memory"]]
    lines = ["## Peak resident memory (target: store <= 1 GiB, flat in T)", ""]
    lines += table(["unify T", "store", "store (anon)", "official-style", "add", "store", "store (anon)",
                    "official-style"], rows)
    lines += ["", "Every figure is a whole process (`condu-fuse` or the official-style script), its libraries "
                  f"included: `condu-fuse --help` alone peaks at {fmt_bytes(res['startup']['help'].get('peak_rss'))}."]
    for op, v in res["memory_verdict"].items():
        lines.append(f"- store {op}: max {fmt_bytes(v['max_peak_rss'])}, growth {fmt_bytes(v['growth_per_task'])} "
                     f"per added task ({100 * v['growth_per_task_of_checkpoint']:.1f}% of a checkpoint); "
                     f"<= 1 GiB: {'yes' if v['within_1_gib'] else 'NO'}, flat: {'yes' if v['flat'] else 'NO'}")
    return lines


def storage_section(res: dict) -> list[str]:
    rows = [[str(r["tasks"]), r["made_by"], r["dtype"], fmt_bytes(r["store_bytes"]), fmt_bytes(r["bound_bytes"]),
             "yes" if r["within_bound"] else "NO", fmt_bytes(r["separate_bytes"]),
             fmt_bytes(r["official_bytes"]) + ("" if r["official_measured"] or r["official_bytes"] is None else " (computed)")]
            for r in res["storage"]]
    lines = ["## Storage (the base is kept once outside the store and is not counted on any side)", ""]
    return lines + table(["T", "made by", "dtype", "store", "bound", "within", "T separate checkpoints", "official layout"], rows) + [
        "", "Bound: (1 + T/32) x one fp32 checkpoint + 1%; bf16: (1 + T/16) x one bf16 checkpoint + 1%."]


def decouple_section(res: dict) -> list[str]:
    d = res["decouple"]
    rows = [[name, side_cell(d[name], "seconds", fmt_s), side_cell(d[name], "peak_rss", fmt_bytes)]
            for name in ("decouple", "copy", "load_save")]
    return ["## Decouple one task to a safetensors file (synced)", ""] + table(["operation", "time", "peak RSS"], rows) + [
        "", f"Decouple runs at {fmt_x(res['decouple_vs_copy'])} of plain copy speed "
            f"and {fmt_x(res['decouple_vs_load_save'])} of safetensors load+save speed. "
            "What bounds it: a copy reads one checkpoint and writes one; decouple reads two "
            "checkpoint-sized inputs (the base and the unified delta) plus the task's mask bits, "
            "computes theta0 + lambda * M * u, and writes one."]


def decouple_sizes_section(res: dict) -> list[str]:
    sizes = res.get("decouple_sizes")
    if not sizes or not sizes["rows"]:
        return []
    rows = []
    for row in sizes["rows"]:
        for kind in ("file", "folder"):
            if kind not in row:
                rows.append([fmt_params(row["params"]), kind, row["unify"].get("error", "not run"), "", "", "", ""])
                continue
            d, c = row[kind]["decouple"], row[kind]["copy"]
            rows.append([fmt_params(row["params"]), kind, fmt_bytes(row["output_bytes"][kind]), fmt_s(d["seconds"]),
                         fmt_s(c["seconds"]), fmt_x(row[kind]["ratio"]),
                         f"{fmt_s(d['cpu'])} / {fmt_s(c['cpu'])}"])
    load = f"{sizes['loadavg_start'][0]:.1f} at the start and {sizes['loadavg_end'][0]:.1f} at the end"
    return ["## Decouple against a synced copy of the same bytes, by model size", ""] + table(
        ["parameters", "to", "output", "decouple", "cp + sync", "ratio (median of pairs)", "CPU decouple / copy"],
        rows) + ["", f"Command: `{sizes['command']}`. One task of an fp32 store (T = 1): decouple reads the base "
                 "and the unified delta (twice the output's bytes) and the mask, checks every block, rebuilds and "
                 "writes; the copy copies the decoupled output itself (read from the page cache, as decouple's "
                 f"inputs are) and fsyncs it. Runs of each: {sizes['repeats']}, paired and in alternating order, "
                 f"each its own process; the load average of the machine was {load}."]


def targets_section(res: dict) -> list[str]:
    """One line per figure of the issue: measured, target, met or not."""
    verdict, storage = res["memory_verdict"], res["storage"]
    worst_peak = max((v["max_peak_rss"] for v in verdict.values()), default=None)
    flat = all(v["flat"] for v in verdict.values()) if verdict else None
    yes = {True: "yes", False: "NO", None: "-"}
    rows = [[f"unify T = {res['unify_speed']['tasks']}, store vs official-style", fmt_x(res["speedup"]),
             f">= {TARGET_SPEEDUP:.0f}x", yes[None if res["speedup"] is None else res["speedup"] >= TARGET_SPEEDUP]],
            ["peak RSS of unify and add, every T", fmt_bytes(worst_peak), "<= 1 GiB, flat in T",
             yes[None if worst_peak is None else worst_peak <= TARGET_PEAK and flat]],
            ["store size, every T and dtype", f"{sum(r['within_bound'] for r in storage)}/{len(storage)} within",
             "(1 + T/32) x fp32 + 1%", yes[all(r["within_bound"] for r in storage)]],
            ["decouple one task vs plain copy", fmt_x(res["decouple_vs_copy"]), "a large fraction", "-"]]
    for op in ("decouple", "add"):
        cost = res["checks"][op + "_overhead"]
        rows.append([f"checking every read in {op}", "-" if cost is None else f"{100 * cost:+.1f}%",
                     f"<= {100 * TARGET_CHECKS:.0f}%", yes[None if cost is None else cost <= TARGET_CHECKS]])
    for row in (res.get("decouple_sizes") or {}).get("rows", []):
        for kind in ("file", "folder"):
            x = row.get(kind, {}).get("ratio")
            rows.append([f"decouple {fmt_params(row['params'])} to a {kind} vs cp + sync of it", fmt_x(x),
                         f"<= {TARGET_DECOUPLE}x", yes[None if x is None else x <= TARGET_DECOUPLE]])
    for name, key in (("condu-fuse --help", "help"), ("tiny unify, process", "tiny_unify")):
        t = res["startup"][key].get("seconds")
        rows.append([name, fmt_s(t), f"< {TARGET_STARTUP} s", yes[None if t is None else t < TARGET_STARTUP]])
    return ["## Figures against the targets", ""] + table(["figure", "measured", "target", "met"], rows)


def markdown(res: dict) -> str:
    cfg, wl = res["config"], res["workload"]
    check = res.get("equality") or {}
    lines = ["# ConDU store figures", "",
             f"Workload: a base and T fine-tuned fp32 checkpoints of {wl['params'] / MiB:.1f}M parameters "
             f"({fmt_bytes(wl['checkpoint_bytes'])} each, {wl['tensors']} tensors). Store rescaler: "
             f"`{cfg['rescaler']}` (the official rule, so both sides compute the same state). "
             f"Times are medians of {cfg['repeats']} runs; each run is its own process.", "",
             f"Command: `{res['command']}`", "",
             f"Same answer: unified delta bit-equal to the official-style one: {check.get('unified_bit_equal', '-')}; "
             f"task 1 rebuilt by both, largest difference relative to the weights: "
             f"{check.get('task1_max_rel_error', '-')}.", ""]
    for section in (targets_section, speed_section, memory_section, checks_section, startup_section,
                    storage_section, decouple_section, decouple_sizes_section, bounds_section):
        lines += section(res) + [""]
    lines += ["## Notes", ""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for op, side, style in (("unify", "store", "o-"), ("add", "store", "s-"),
                            ("unify", "official", "o--"), ("add", "official", "s--")):
        pts = [(r[op].get("tasks", r["tasks"]), r[op][side]["peak_rss"] / GiB)
               for r in res["memory"] if r[op][side].get("peak_rss")]
        if pts:
            label = f"{'store' if side == 'store' else 'official-style'} {op}" + (" (T-1 -> T)" if op == "add" else "")
            ax.plot(*zip(*pts), style, label=label)
    ax.axhline(TARGET_PEAK / GiB, color="grey", linestyle=":", label="1 GiB target")
    ticks = sorted({r["tasks"] for r in res["memory"]} | {r["add"]["tasks"] for r in res["memory"]})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("tasks T")
    ax.set_ylabel("peak RSS (GiB)")
    ax.set_title(f"Peak memory, {res['workload']['params'] / MiB:.0f}M-parameter checkpoints")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(res: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{RESULT_NAME}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    (out_dir / f"{RESULT_NAME}.md").write_text(markdown(res))
    plot(res, out_dir / f"{RESULT_NAME}.png")


# ---------------------------------------------------------------- the run

FULL = {"params": "64M", "tasks": "2,4,8,16", "unify_tasks": 8, "bf16_tasks": 8, "repeats": 3,
        "decouple_params": "500M"}
# Tiny tensors on one thread: hand-offs between threads would cost more than the work.
QUICK = {"params": "64K", "tasks": "2,4", "unify_tasks": 4, "bf16_tasks": 2, "repeats": 1, "threads": 1,
         "decouple_params": "64K"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fusion_store", description=__doc__.splitlines()[0])
    p.add_argument("--params", help="parameters a checkpoint, e.g. 64M (binary multiples; default 64M, quick 64K)")
    p.add_argument("--tasks", help="T values of the memory and storage sweep (default 2,4,8,16; quick 2,4)")
    p.add_argument("--unify-tasks", type=int, help="T of the unify speed comparison (default 8; quick 4)")
    p.add_argument("--bf16-tasks", type=int, help="T of the bf16 store size, 0 to skip (default 8; quick 2)")
    p.add_argument("--repeats", type=int, help="runs of each timed operation, median taken (default 3; quick 1)")
    p.add_argument("--rescaler", default="tensor-mean", help="store rescaler mode")
    p.add_argument("--official-max-gib", type=float, default=10.0,
                   help="skip official-style runs estimated to need more memory than this")
    p.add_argument("--official-budget-min", type=float, default=None,
                   help="stop starting official-style runs after this many minutes (default: no limit)")
    p.add_argument("--workdir", default=None, help="where checkpoints and stores go (default: a tmp dir, removed)")
    p.add_argument("--results-dir", default=None, help="results folder (default benchmarks/results; required "
                   "with --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads in every measured process "
                   "(default: torch's own choice)")
    p.add_argument("--quick", action="store_true", help="64K parameters, T = 2, 4, one run each, one thread "
                   "(with --results-dir)")
    p.add_argument("--decouple-params", help="model sizes of the decouple-vs-copy rows, e.g. 64M,500M; 0 to skip "
                   "(default 500M; quick 64K)")
    p.add_argument("--decouple-only", action="store_true", help="measure only the decouple-vs-copy rows and put "
                   "them into the results json and md already in --results-dir (the other figures stay)")
    p.add_argument("--from-json", help="measure nothing: write the md and png again from a saved json")
    args = p.parse_args(argv)
    args.results_dir = str(results_folder(p, args.results_dir, quick=args.quick))
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.task_list = sorted({int(t) for t in args.tasks.split(",")})
    return args


def sweep_order(args: argparse.Namespace) -> list[int]:
    """The speed T first (its figures matter most), then the others, largest last."""
    return [args.unify_tasks] + [t for t in args.task_list if t != args.unify_tasks]


def speed_figures(bench: Bench, unified: dict, res: dict) -> None:
    """At the speed T: the ratio, the same-answer check, and decouple (before add changes the store)."""
    res["unify_speed"] = {k: v for k, v in unified.items() if not k.endswith("_dir")}
    res["speedup"] = ratio(unified["official"].get("seconds"), unified["store"].get("seconds"))
    if "error" not in unified["store"] and "seconds" in unified["official"]:
        res["equality"] = run_isolated("compare", store_dir=str(unified["store_dir"]), base=bench.wl.base,
                                       official_dir=str(unified["official_dir"]), scratch=str(bench.scratch))
    res["decouple"] = measure_decouple(bench, unified["store_dir"], bench.args.repeats)
    d = res["decouple"]
    res["decouple_vs_copy"] = ratio(d["copy"]["seconds"], d["decouple"]["seconds"])
    res["decouple_vs_load_save"] = ratio(d["load_save"]["seconds"], d["decouple"]["seconds"])
    res["checks"] = measure_checks(bench, unified["store_dir"], unified["tasks"], bench.args.repeats + 2)
    res["bounds"] = measure_bounds(bench, unified["tasks"])
    copy = d["copy"].get("seconds")
    res["bounds"]["fsync_write_gbps"] = bench.wl.checkpoint_bytes / copy / 1e9 if copy else None


def measure_bf16(bench: Bench, tasks: int) -> dict:
    print(f"bf16 store, T={tasks}", file=sys.stderr)
    result, out = bench.store_unify(tasks, f"bf16-T{tasks}", dtype="bfloat16")
    size = dir_bytes(out) if "error" not in result else None
    remove_tree(out)
    return {"tasks": tasks, "store": result, "store_bytes": size}


def warm_page_cache(paths: list[str]) -> None:
    """Read every input once, so that every measured run finds it in the page cache (a reused
    --workdir may have been pushed out since it was written)."""
    buffer = bytearray(16 * MiB)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def kernel_backend() -> str:
    """Build (or compile) the cpu kernel's backend once, untimed, as a user's first run would; its name."""
    done = subprocess.run([sys.executable, "-c", "from fusion.kernels.cpu import KERNEL; KERNEL.warm(); "
                           "print(KERNEL.backend.NAME)"], capture_output=True, text=True, check=True, cwd=ROOT)
    return done.stdout.strip()


def run(args: argparse.Namespace, work: Path) -> dict:
    plans = model_plan(parse_count(args.params))
    most = max(args.task_list + [args.unify_tasks, args.bf16_tasks]) + 1  # add puts one more on the largest
    print(f"base + {most} checkpoints of {parse_count(args.params) / MiB:.1f}M parameters in {work}", file=sys.stderr)
    wl = write_workload(work, plans, most, args.seed)
    warm_page_cache([wl.base, *wl.checkpoints])
    backend = kernel_backend()
    scratch = work / "runs"
    remove_tree(scratch), scratch.mkdir()
    bench = Bench(wl, scratch, args)
    res = {"command": "python -m benchmarks.fusion_store " + " ".join(sys.argv[1:]), "config": vars(args),
           "machine": machine_facts(), "workload": asdict(wl), "backend": backend,
           "startup": measure_startup(work, max(args.repeats, 5))}
    unify, adds, bf16 = {}, {}, None
    for t in sweep_order(args):
        unify[t] = measure_unify(bench, t, args.repeats if t == args.unify_tasks else 1)
        if t == args.unify_tasks:
            speed_figures(bench, unify[t], res)
        adds[t] = measure_add(bench, unify[t])
        if t == args.unify_tasks and args.bf16_tasks:
            bf16 = measure_bf16(bench, args.bf16_tasks)
    res["memory"] = [{"tasks": t, "unify": {"store": unify[t]["store"], "official": unify[t]["official"]},
                      "add": {"tasks": adds[t]["tasks"], "store": adds[t]["store"], "official": adds[t]["official"]}}
                     for t in args.task_list]
    res["memory_verdict"] = memory_verdict(res["memory"], wl.checkpoint_bytes)
    res["storage"] = storage_rows(bench, [unify[t] for t in args.task_list], [adds[t] for t in args.task_list], bf16)
    res["decouple_sizes"] = measure_decouple_sizes(args, work)
    res["machine"]["loadavg_end"] = os.getloadavg()
    res["notes"] = notes(res, args)
    return res


def decouple_only(args: argparse.Namespace, work: Path) -> dict:
    """The results already in --results-dir, with the decouple-vs-copy rows measured again."""
    saved = Path(args.results_dir) / f"{RESULT_NAME}.json"
    if not saved.is_file():
        raise SystemExit(f"{saved}: no results to add the decouple rows to; run the full benchmark first")
    res = json.loads(saved.read_text())
    kernel_backend()
    res["decouple_sizes"] = measure_decouple_sizes(args, work)
    return res


def notes(res: dict, args: argparse.Namespace) -> list[str]:
    m = res["machine"]
    out = [f"Machine: {m['cpus']} CPUs, {m['memory_gib']} GiB, torch {m['torch']} with {m['torch_threads']} threads "
           f"in each measured process; the load average (other work on the machine) was "
           f"{m['loadavg_start'][0]:.1f} at the start and {m['loadavg_end'][0]:.1f} at the end.",
           "Each side reads inputs that were just written, from the page cache: this compares compute and "
           "write paths, not disk reads. Writes are synced (fsync) on both sides.",
           "Peak RSS is the process's own ru_maxrss: it includes the imported libraries and any "
           "memory-mapped file pages it touched; 'anon' is the sampled peak of anonymous memory only.",
           "Add is the continual step on what unify left: task T+1 joins the store of T tasks; the "
           "official-style add likewise rebuilds its T saved tasks from bool masks and unifies again."]
    skipped = {}
    for r in res["memory"]:
        for op in ("unify", "add"):
            why = r[op]["official"].get("skipped")
            if why:
                skipped.setdefault(why.split(";")[0].split("(")[0].strip(), []).append(f"{op} T={r[op].get('tasks', r['tasks'])}")
    for why, where in skipped.items():
        out.append(f"Official-style runs {why}: {', '.join(where)}. Nothing is filled in for them "
                   f"(limits: --official-max-gib {args.official_max_gib}, --official-budget-min {args.official_budget_min}).")
    return out


def preload_libraries() -> None:
    """Import once here, so every forked process starts from the same floor, without import time."""
    import benchmarks.official_baseline  # noqa: F401
    import safetensors.torch  # noqa: F401
    try:
        import fusion  # noqa: F401
    except ImportError as exc:  # reported by each store operation instead
        print(f"fusion does not import: {exc}", file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
        write_results(res, Path(args.results_dir))
        print(markdown(res))
        return 0
    preload_libraries()
    THREADS[0] = args.threads or THREADS[0]
    # This process stays on one thread, so no OpenMP pool exists when it forks the measured ones.
    torch.set_num_threads(1)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="condu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        res = decouple_only(args, work) if args.decouple_only else run(args, work)
    finally:
        if not args.workdir:
            remove_tree(work)
    write_results(res, Path(args.results_dir))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
