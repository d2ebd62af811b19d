"""GPU check and throughput of the Triton kernels (fusion/kernels/triton_kernels.py).

On a CUDA machine (H100/H200, a CUDA build of torch, triton and the project's other
dependencies; under 3 minutes, Triton compilation included), from the repository root:

    python -m benchmarks.gpu_kernels --out benchmarks/results

Without a GPU (the Triton interpreter on CPU, tiny sizes, under a minute):

    TRITON_INTERPRET=1 python -m benchmarks.gpu_kernels --quick --out /tmp/gpu_kernels

1. Checks: both kernels against fusion.reference (numpy, on host copies of the inputs) for a few
   shapes, task counts and dtypes: masks and unified values bit for bit, L1 sums to the bound of
   the kernels' float32 block partials (ceil(log2 block) float32 roundings, 6e-7 at block 1024).
   Lengths are not multiples of 8 or of the block; values sit on a small integer grid (exact
   zeros and sign ties), half of the cases scaled per column to arbitrary floats.
2. Throughput at T = 2, 8, 16 on 64M-element fp32 deltas, in GB/s of delta input (T * n * 4
   bytes; the continual step rebuilds T - 1 tasks from u, their packed masks and rescalers, so it
   reads fewer bytes than that), next to
   - `copy`: a torch clone of the same bytes, the device's copy bandwidth (it reads and writes
     them; the `traffic` columns count both directions for every row),
   - `naive`: whole-tensor torch written like the official ConDU/EMR code, on the same device.
   Timed with CUDA events: median of --repeats after --warmup calls.
3. A small sweep of block size and warps for elect at T = 8, to choose the defaults.
4. The store end to end: `condu-fuse unify` of T = 8 fp32 checkpoints written to a scratch
   folder, each command a fresh process (start-up included), `--device cuda` against
   `--device cpu`, with the peak device memory the pass reports (CUDA only).

Writes <out>/gpu_kernels.json and <out>/gpu_kernels.md; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import results_folder
from fusion import reference
from fusion.kernels import triton_kernels
from fusion.kernels.triton_kernels import KERNEL, TritonKernel

M = 1 << 20
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# (T_old, T_new, n, delta dtype, unified dtype) of the checks; T_old = None checks elect on T_new rows.
FULL_CHECKS = [
    (None, 1, 13, "fp32", "fp32"), (None, 2, 100_003, "fp16", "fp32"), (None, 8, 1_000_003, "fp32", "bf16"),
    (None, 8, 4_099, "bf16", "fp16"), (None, 16, 1_000_001, "fp32", "fp32"), (None, 33, 2_053, "fp32", "fp32"),
    (1, 1, 100_003, "fp32", "fp32"), (7, 1, 1_000_003, "fp32", "bf16"), (15, 1, 1_000_001, "fp32", "fp32"),
    (4, 0, 4_099, "fp32", "fp16"), (6, 2, 100_003, "bf16", "fp32"), (0, 2, 9, "fp16", "fp32"),
]
QUICK_CHECKS = [
    (None, 1, 13, "fp32", "fp32"), (None, 8, 1_100, "fp16", "bf16"), (None, 3, 2_051, "bf16", "fp16"),
    (2, 1, 1_030, "fp32", "bf16"), (3, 0, 77, "fp32", "fp32"), (0, 2, 9, "fp16", "fp32"),
]


# ---- data ---------------------------------------------------------------------------------------


def grid_deltas(t: int, n: int, *, seed: int, dtype: torch.dtype, jitter: bool) -> torch.Tensor:
    """(t, n) small integers / 64 with many exact zeros and ties; `jitter` scales each column by
    an arbitrary factor in [1, 2) (ties stay ties, rounding to fp16/bf16 starts to matter)."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(-8, 9, (t, n), generator=gen).float() / 64  # (t, n)
    values = torch.where(torch.rand((t, n), generator=gen) < 0.3, 0.0, values)
    if jitter:
        values = values * (1 + torch.rand(n, generator=gen))  # (t, n)
    return values.to(dtype)


def host(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's values in host memory for the reference: fp16/bf16 as float32 (exact), others as they are."""
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor).numpy()


def stored_state(rows: torch.Tensor, *, seed: int):
    """u, packed masks and rescalers in [0.5, 2) of `rows` unified by the reference, as CPU tensors."""
    state = reference.elect(host(rows))
    gen = torch.Generator().manual_seed(seed)
    rescalers = torch.rand(rows.shape[0], generator=gen, dtype=torch.float64) + 0.5
    return torch.from_numpy(state.unified), torch.from_numpy(state.packed_masks), rescalers


# ---- checks -------------------------------------------------------------------------------------


def l1_rtol(block: int) -> float:
    """The float32 tree sum of `block` nonnegative summands: at most ceil(log2 block) roundings."""
    return max(1, math.ceil(math.log2(block))) * 2.0**-24


def compare(result, expected, *, block: int) -> list[str]:
    """What differs between a kernel result (tensors) and the reference's (numpy); empty: they agree."""
    problems = []
    unified = host(result.unified)
    if not np.array_equal(unified.view(np.int32), expected.unified.view(np.int32)):
        problems.append(f"unified differs at {int((unified.view(np.int32) != expected.unified.view(np.int32)).sum())} elements")
    masks = host(result.packed_masks)
    if not np.array_equal(masks, expected.packed_masks):
        problems.append(f"masks differ in {int((masks != expected.packed_masks).sum())} bytes")
    for name in ("delta_l1", "masked_l1"):
        got, want = host(getattr(result, name)), getattr(expected, name)
        if not np.allclose(got, want, rtol=l1_rtol(block), atol=1e-30):
            problems.append(f"{name} off by {float((np.abs(got - want) / np.maximum(np.abs(want), 1e-30)).max()):.2e} relative")
    return problems


def run_check(case, device: torch.device, seed: int) -> dict:
    t_old, t_new, n, dtype_name, unified_name = case
    dtype, unified_dtype = DTYPES[dtype_name], DTYPES[unified_name]
    new = grid_deltas(t_new, n, seed=seed, dtype=dtype, jitter=seed % 2 == 0)  # (T_new, n)
    start = time.perf_counter()
    if t_old is None:
        result = KERNEL.elect(new.to(device), unified_dtype=unified_dtype)
        expected = reference.elect(host(new), unified_dtype=unified_dtype)
    else:
        old = grid_deltas(max(t_old, 1), n, seed=seed + 1, dtype=torch.float32, jitter=True)[:t_old]
        stored = stored_state(old, seed=seed) if t_old else (torch.zeros(n), torch.zeros((0, -(-n // 8)), dtype=torch.uint8),
                                                              torch.zeros(0, dtype=torch.float64))
        result = KERNEL.continual(*[x.to(device) for x in (*stored, new)], unified_dtype=unified_dtype)
        expected = reference.continual_chunk(*[host(x) for x in (*stored, new)], unified_dtype=unified_dtype)
    seconds = time.perf_counter() - start  # includes Triton compilation on first use
    problems = compare(result, expected, block=KERNEL.block)
    kind = "elect" if t_old is None else "continual"
    return {"kernel": kind, "t_old": t_old, "t_new": t_new, "numel": n, "dtype": dtype_name,
            "unified_dtype": unified_name, "ok": not problems, "problems": problems, "first_call_s": seconds}


# ---- timing -------------------------------------------------------------------------------------


def time_median(fn, device: torch.device, *, repeats: int, warmup: int) -> float:
    """Median seconds of fn: CUDA events on GPU, wall clock on CPU (the interpreter)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def naive_elect(rows: list[torch.Tensor]):
    """EMR/ConDU as the official code writes it: whole tensors, bool masks, per-task means."""
    stacked = torch.stack(rows)  # (T, n): a full copy
    flag = (stacked.mean(0) > 0) * 2 - 1  # (n,) int64; a zero mean elects -1
    largest = torch.zeros_like(rows[0])
    masks, scales = [], []
    for delta in rows:
        mask = (delta * flag) > 0  # (n,) bool
        masks.append(mask)
        magnitude = torch.abs(mask * delta)
        largest = torch.where(magnitude > largest, magnitude, largest)
        scales.append(torch.mean(torch.abs(delta)))
    unified = largest * flag
    rescalers = [s / torch.mean(torch.abs(unified * m)) for s, m in zip(scales, masks)]
    return unified, masks, rescalers


def naive_continual(unified: torch.Tensor, masks: list[torch.Tensor], rescalers: list, new: torch.Tensor):
    """The official continual step: rebuild every stored task whole, then unify from scratch."""
    return naive_elect([unified * m * r for m, r in zip(masks, rescalers)] + [new])


def measure(t: int, n: int, device: torch.device, *, repeats: int, warmup: int) -> dict:
    """elect, continual (T - 1 stored + 1 new), copy and naive on (T, n) fp32 deltas."""
    gen = torch.Generator(device=device).manual_seed(t)
    deltas = torch.randn((t, n), generator=gen, device=device) * 1e-3  # (T, n) fp32
    deltas[:, ::7] = 0.0  # some exact zeros, as fine-tunes that left entries alone
    input_bytes = deltas.numel() * 4
    record = {"tasks": t, "numel": n, "input_bytes": input_bytes}
    seconds = {"elect": time_median(lambda: KERNEL.elect(deltas), device, repeats=repeats, warmup=warmup)}
    # The stored state: the first T - 1 rows' masks of an elect over all T (the same kernel, already
    # compiled; what the masks hold does not change the cost), rescalers by the `model` rule.
    state = KERNEL.elect(deltas)
    rescalers = state.delta_l1[: t - 1] / state.masked_l1[: t - 1].clamp(min=1e-30)  # (T - 1,)
    old = (state.unified, state.packed_masks[: t - 1].contiguous(), rescalers)
    seconds["continual"] = time_median(lambda: KERNEL.continual(*old, deltas[t - 1:]), device, repeats=repeats, warmup=warmup)
    seconds["copy"] = time_median(deltas.clone, device, repeats=repeats, warmup=warmup)
    rows = list(deltas.unbind(0))
    seconds["naive_elect"] = time_median(lambda: naive_elect(rows), device, repeats=max(repeats // 2, 1), warmup=1)
    unified, masks, naive_rescalers = naive_elect(rows[: t - 1]) if t > 1 else (rows[0] * 0, [], [])
    seconds["naive_continual"] = time_median(lambda: naive_continual(unified, masks, naive_rescalers, rows[-1]),
                                             device, repeats=max(repeats // 2, 1), warmup=1)
    record["seconds"] = seconds
    record["gbps"] = {name: input_bytes / s / 1e9 for name, s in seconds.items()}
    record["traffic_gbps"] = traffic_gbps(t, n, seconds)
    return record


def traffic_gbps(t: int, n: int, seconds: dict) -> dict:
    """Bytes each op reads plus writes, per second: the HBM traffic, for comparison with the copy."""
    outputs = n * 4 + t * -(-n // 8) + 0  # unified + packed masks (the L1 partials are small)
    elect_bytes = t * n * 4 + outputs
    continual_bytes = n * 4 + (t - 1) * -(-n // 8) + n * 4 + outputs  # u, old masks, one new delta
    return {"elect": elect_bytes / seconds["elect"] / 1e9, "continual": continual_bytes / seconds["continual"] / 1e9,
            "copy": 2 * t * n * 4 / seconds["copy"] / 1e9}


def sweep_blocks(t: int, n: int, device: torch.device, configs, *, repeats: int, warmup: int) -> list[dict]:
    """elect at T = t through kernels of other block sizes and warp counts."""
    deltas = torch.randn((t, n), device=device) * 1e-3  # (T, n)
    rows = []
    for block, warps in configs:
        kernel = TritonKernel(block=block, num_warps=warps)
        seconds = time_median(lambda: kernel.elect(deltas), device, repeats=repeats, warmup=warmup)
        rows.append({"block": block, "num_warps": warps, "gbps": deltas.numel() * 4 / seconds / 1e9})
    return rows


# ---- report (torch and the standard library only: the GPU machine may lack the benchmark extras) ---


def markdown_table(headers, rows) -> str:
    """A GitHub markdown table; floats with 3 significant digits."""
    def cell(value) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def write_results(data: dict, text: str, out_dir: str) -> list[Path]:
    """<out_dir>/gpu_kernels.json and .md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_kernels.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "gpu_kernels.md").write_text(text.rstrip() + "\n")
    return [out / "gpu_kernels.json", out / "gpu_kernels.md"]


def machine_info() -> dict:
    return {"host": platform.node(), "cpu": platform.processor() or platform.machine(), "logical_cpus": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def device_info(device: torch.device) -> dict:
    import triton

    info = {"device": str(device), "triton": triton.__version__, "interpreted": triton_kernels.is_interpreted()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count)
    return info


def markdown(data: dict) -> str:
    checks = markdown_table(["kernel", "T_old", "T_new", "n", "dtype", "unified", "ok", "first call s"],
                            [[c["kernel"], "-" if c["t_old"] is None else c["t_old"], c["t_new"], c["numel"], c["dtype"],
                              c["unified_dtype"], "yes" if c["ok"] else "NO: " + "; ".join(c["problems"]),
                              c["first_call_s"]] for c in data["checks"]])
    rows = []
    for r in data["throughput"]:
        g, traffic = r["gbps"], r["traffic_gbps"]
        rows.append([r["tasks"], f"{r['numel'] // M}M" if r["numel"] >= M else r["numel"], g["elect"], g["continual"],
                     g["copy"], g["naive_elect"], g["naive_continual"], g["elect"] / g["naive_elect"],
                     g["continual"] / g["naive_continual"], f"{100 * traffic['elect'] / traffic['copy']:.0f}%",
                     f"{100 * traffic['continual'] / traffic['copy']:.0f}%"])
    table = markdown_table(["T", "n", "elect GB/s", "continual GB/s", "copy GB/s", "naive elect GB/s",
                            "naive continual GB/s", "elect / naive", "continual / naive", "elect traffic / copy",
                            "continual traffic / copy"], rows)
    sweep = markdown_table(["block", "warps", "elect GB/s"], [[s["block"], s["num_warps"], s["gbps"]] for s in data["sweep"]])
    store = data.get("store")
    store_text = ("not run (no CUDA device)" if not store else markdown_table(
        ["T", "n", "cuda s", "cpu s", "cpu / cuda", "cuda output"],
        [[store["tasks"], store["numel"], store["cuda_s"], store["cpu_s"], store["cpu_s"] / store["cuda_s"],
          store["cuda_output"]]]))
    dev = data["device"]
    return "\n\n".join([
        "# Triton kernels on " + dev.get("name", dev["device"] + (" (Triton interpreter)" if dev["interpreted"] else "")),
        f"Command: `{data['command']}`. Device: {dev}.",
        f"## Checks against fusion.reference (masks and unified bit for bit, L1 to {l1_rtol(data['default_block']):.1e})",
        checks,
        "## Throughput (GB/s of delta input, T * n * 4 bytes; fp32; median of "
        + ("CUDA-event timings)" if dev["device"].startswith("cuda") else "wall-clock timings)"),
        "`copy` is a torch clone of the deltas. `traffic / copy` compares bytes read plus written per second "
        "with the clone's (which reads and writes every byte): how close each kernel gets to the device's "
        "memory bandwidth.", table,
        "## Block size and warps, elect at T = 8", sweep,
        "## The store end to end: `condu-fuse unify`, fresh processes, files in the page cache", store_text,
    ])


# ---- the store end to end -------------------------------------------------------------------------


def write_workload(folder: Path, numel: int, tasks: int, seed: int = 0) -> list[Path]:
    """A base and `tasks` fine-tunes of 8 fp32 tensors of numel / 8 elements each, as .safetensors."""
    from fusion.io import save

    rng = np.random.default_rng(seed)
    shapes = {f"layer.{k}.weight": (numel // 8 // 1024, 1024) for k in range(8)}
    base = {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}
    paths = [folder / "base.safetensors"]
    save(base, paths[0])
    for t in range(tasks):
        tuned = {name: w + np.float32(1e-3) * rng.standard_normal(w.shape, dtype=np.float32) for name, w in base.items()}
        paths.append(folder / f"task{t + 1}.safetensors")
        save(tuned, paths[-1])
    return paths


def time_unify(paths: list[Path], store: Path, device: str) -> tuple[float, str]:
    """Seconds of one `condu-fuse unify` process, and what it printed."""
    import shutil
    import subprocess

    shutil.rmtree(store, ignore_errors=True)
    command = [sys.executable, "-m", "fusion.cli", "unify", "-q", "--device", device, "--store", str(store),
               "--base", str(paths[0]), *map(str, paths[1:])]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, done.stdout.strip()


def store_row(numel: int, tasks: int, *, repeats: int, devices=("cuda", "cpu")) -> dict:
    """unify T tasks from files on each device (`cuda_s`, `cpu_s`): medians of `repeats` fresh
    processes, and what the first device's last run printed."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        paths = write_workload(Path(scratch), numel, tasks)
        runs = {device: [time_unify(paths, Path(scratch) / f"store-{device}", device) for _ in range(repeats)]
                for device in devices}
    row = {"tasks": tasks, "numel": numel, "cuda_output": runs[devices[0]][-1][1]}
    return row | {f"{device}_s": statistics.median(r[0] for r in runs[device]) for device in devices}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", "--results-dir", default=None,
                        help="folder for gpu_kernels.json and .md (default benchmarks/results; required with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the Triton interpreter on CPU")
    parser.add_argument("--numel", type=int, default=None, help="elements per task (default 64M, 4096 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per op (default 10, 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    args.out = str(results_folder(parser, args.out, quick=args.quick, option="--out"))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not triton_kernels.is_interpreted():
        print("no CUDA device: run with TRITON_INTERPRET=1 (and --quick) to try the script on CPU", file=sys.stderr)
        return 2
    numel = args.numel or (4096 if args.quick else 64 * M)
    repeats = args.repeats or (2 if args.quick else 10)
    warmup = 1 if args.quick else args.warmup
    data = {"command": " ".join(["python -m benchmarks.gpu_kernels", *(argv if argv is not None else sys.argv[1:])]),
            "device": device_info(device), "machine": machine_info(), "default_block": KERNEL.block,
            "default_num_warps": KERNEL.num_warps, "repeats": repeats, "warmup": warmup,
            "checks": [], "throughput": [], "sweep": []}
    for seed, case in enumerate(QUICK_CHECKS if args.quick else FULL_CHECKS):
        c = run_check(case, device, seed)
        data["checks"].append(c)
        print(f"check {c['kernel']:9s} T_old={c['t_old']} T_new={c['t_new']} n={c['numel']} {c['dtype']}->{c['unified_dtype']}: "
              + ("ok" if c["ok"] else "FAILED " + "; ".join(c["problems"])) + f" ({c['first_call_s']:.1f} s)", flush=True)
    write_results(data, markdown(data), args.out)  # the checks survive a later crash
    for t in (2, 8, 16):
        data["throughput"].append(measure(t, numel, device, repeats=repeats, warmup=warmup))
        g = data["throughput"][-1]["gbps"]
        print(f"T={t:2d} n={numel}: elect {g['elect']:.1f} GB/s, continual {g['continual']:.1f} GB/s, copy {g['copy']:.1f} GB/s, "
              f"naive elect {g['naive_elect']:.1f} GB/s, naive continual {g['naive_continual']:.1f} GB/s", flush=True)
        write_results(data, markdown(data), args.out)
    configs = [(256, 2), (1024, 4)] if args.quick else [(512, 4), (1024, 4), (2048, 8), (4096, 8)]
    data["sweep"] = sweep_blocks(8, numel, device, configs, repeats=repeats, warmup=warmup)
    if device.type == "cuda":
        # Each of the workload's 8 tensors needs one 1024-wide row at least: the quick size has none.
        data["store"] = store_row(max(numel, 8 * 1024), 8, repeats=1 if args.quick else 3)
        print(f"store unify T=8: cuda {data['store']['cuda_s']:.2f} s, cpu {data['store']['cpu_s']:.2f} s", flush=True)
    text = markdown(data)
    print(text)
    for path in write_results(data, text, args.out):
        print(f"wrote {path}")
    failed = [c for c in data["checks"] if not c["ok"]]
    if failed:
        print(f"{len(failed)} of {len(data['checks'])} checks FAILED", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
