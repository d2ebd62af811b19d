"""The continual loop: train each task, update the ConDU stores, evaluate every method on every task.

Run folder layout::

    base.safetensors                    theta0, the base of every store
    checkpoints/individual/NN-task.safetensors   fine-tuned from theta0 (individual, task arithmetic, ConDU)
    checkpoints/sequential/NN-task.safetensors   fine-tuned from the previous one (sequential, MagMax)
    stores/<rescaler>/                  one ConDU store per rescaler mode in the config
    pixels/<task>-test-N-side.npy       uint8 test pixels, when evaluation.pixel_cache is on
    (the `gated` aggregate also reads each learned task's held-out `val` split; gating.py)
    state.json                          after each task, written atomically: the resume point
    results.json, results.md, heatmap-<method>.png   when the run is complete

A run interrupted after task k resumes at task k+1: checkpoints, stores and matrix rows on disk
are reused, and a step whose store update already landed is not added twice.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from . import baselines, gating, metrics
from .config import MethodConfig, RunConfig
from .data import TaskSpec, as_dataset, load_split, resolve_task
from .inference import ModelRunner, accuracy, combine_routed, rows_selecting, top_k_experts
from .models import Clip, image_size, load_clip, resolve_device, state_dict_cpu
from .prototypes import compute_prototypes, dataset_features, routing_weights
from .train import finetune, save_checkpoint

STATE_VERSION = 1
PROTOTYPES = "prototypes"  # the tensor name under which a task's (C, D) prototypes are stored


# ---------------------------------------------------------------- small helpers


def write_json(data: dict, path: Path) -> None:
    """Atomic JSON write: temporary file, fsync, rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def config_fingerprint(config: RunConfig) -> dict:
    """What a resumed run must share with the interrupted one."""
    return json.loads(json.dumps({
        "model": config.model, "tasks": [asdict(t) for t in config.tasks],
        "methods": [asdict(m) for m in config.methods], "training": asdict(config.training),
        "evaluation": asdict(config.evaluation), "image_size": config.image_size,
        "fusion_kernel": config.fusion_kernel,
    }))


def needs(config: RunConfig) -> dict:
    """Which checkpoints and stores the selected methods share."""
    kinds = {m.kind for m in config.methods}
    return {
        "individual": bool(kinds & {"individual", "task_arithmetic", "condu"}),
        "sequential": bool(kinds & {"sequential", "magmax"}),
        "rescalers": sorted({m.rescaler for m in config.methods if m.kind == "condu"}),
    }


def store_sizes(info: dict) -> dict:
    """Bytes on disk of a store next to its base and T separate fine-tuned checkpoints."""
    return {"tasks": len(info["tasks"]), "base_bytes": info["base"]["bytes"], **info["sizes"],
            "separate_checkpoints_bytes": info["separate_checkpoints_bytes"], "savings": info["savings"]}


def fidelity_of(store) -> list[dict]:
    """Per stored task: its name and its reconstruction fidelity (cosine, relative L2)."""
    return [{"task": t.name, **t.fidelity} for t in store.tasks]


# ---------------------------------------------------------------- the run


def _process_state():
    """accelerate's view of the processes: one on a plain run, several under `accelerate launch`."""
    from accelerate import PartialState

    return PartialState()


class ContinualRun:
    """One run folder: its config, its on-disk state, and the models it trains and evaluates."""

    def __init__(self, config: RunConfig, out: str | os.PathLike, *, progress: bool = True,
                 clip: Clip | None = None):
        self.config, self.root, self.progress = config, Path(out), progress
        self.root.mkdir(parents=True, exist_ok=True)
        self.processes = _process_state()
        device = self.processes.device if config.device == "auto" else resolve_device(config.device)
        self.clip = clip or load_clip(config.model, device=device)
        self.theta0 = state_dict_cpu(self.clip.model)
        self.specs: list[TaskSpec] = [resolve_task(t) for t in config.tasks]
        self.side = config.image_size or image_size(self.clip.processor)
        self.plan = needs(config)
        ev = config.evaluation
        self.runner = ModelRunner(self.clip, self.theta0, cache_size=ev.cache_size, batch_size=ev.batch_size,
                                  num_workers=config.training.num_workers, progress=progress)
        self._tests: dict[int, object] = {}
        self._base_eval: dict[int, tuple] = {}
        self._held_out: dict[int, torch.Tensor] = {}
        self.state = self._load_state()

    # -- paths ----------------------------------------------------------------------------

    @property
    def base_path(self) -> Path:
        return self.root / "base.safetensors"

    def checkpoint(self, kind: str, i: int) -> Path:
        return self.root / "checkpoints" / kind / f"{i + 1:02d}-{self.specs[i].name}.safetensors"

    def store_dir(self, rescaler: str) -> Path:
        return self.root / "stores" / rescaler

    # -- state ----------------------------------------------------------------------------

    def _load_state(self) -> dict:
        path = self.root / "state.json"
        fingerprint = config_fingerprint(self.config)
        if not path.exists():
            return {"version": STATE_VERSION, "config": fingerprint, "completed": 0,
                    "rows": {m.name: [] for m in self.config.methods}, "fidelity": {}, "seconds": {},
                    "routing": {}, "stores": {}}
        state = json.loads(path.read_text())
        if state.get("config") != fingerprint:
            raise ValueError(f"{path}: this run folder was made with another config; "
                             "use a new --out folder, or the same config and --methods to resume")
        return state

    def _save_state(self) -> None:
        write_json(self.state, self.root / "state.json")

    # -- data -----------------------------------------------------------------------------

    def test_set(self, j: int):
        if j not in self._tests:
            split = load_split(self.specs[j], "test", image_size=self.side, seed=self.config.training.seed,
                               limit=self.config.evaluation.max_test)
            cache = self.root / "pixels" / f"{self.specs[j].name}-test-{len(split)}-{self.side}.npy"
            dataset = as_dataset(split, self.clip.processor, self.side, num_workers=self.config.training.num_workers,
                                 cache=cache if self.config.evaluation.pixel_cache else None)
            self._tests[j] = (dataset, torch.tensor(split.labels))
        return self._tests[j]

    def train_set(self, i: int):
        split = load_split(self.specs[i], "train", image_size=self.side, seed=self.config.training.seed)
        return as_dataset(split, self.clip.processor, self.side)

    def base_eval(self, j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """theta0's logits (N, C), features (N, D) and the labels (N,) on task j's test set (cached)."""
        if j not in self._base_eval:
            dataset, labels = self.test_set(j)
            self.runner.activate("theta0")
            logits, feats = self.runner.logits(dataset, self.specs[j].class_names, self.specs[j].templates,
                                               desc=f"eval theta0 on {self.specs[j].name}")
            self._base_eval[j] = (logits, feats, labels)
        return self._base_eval[j]

    def held_out_features(self, s: int) -> torch.Tensor:
        """theta0's (N, D) features of task s's held-out calibration images (cached)."""
        if s not in self._held_out:
            try:
                split = load_split(self.specs[s], "val", image_size=self.side, seed=self.config.training.seed,
                                   limit=gating.CALIBRATION_IMAGES)
            except (ValueError, OSError):
                raise ValueError(f"task {self.specs[s].name!r}: the gated aggregate calibrates on held-out `val` "
                                 "images and found none; add a val/ folder beside train/ and test/ (a `val` split "
                                 "for a saved dataset), or use --aggregate mean") from None
            self.runner.activate("theta0")
            self._held_out[s], _ = dataset_features(self.clip, as_dataset(split, self.clip.processor, self.side),
                                                    batch_size=self.config.evaluation.batch_size)
        return self._held_out[s]

    # -- training ---------------------------------------------------------------------------

    def _train(self, kind: str, i: int, start: dict, train_set) -> Path:
        path = self.checkpoint(kind, i)
        if not path.exists():
            settings = self.config.task_training(self.config.tasks[i])
            began = time.perf_counter()
            finetune(self.clip, start, self.specs[i], train_set, settings, path,
                     seed=settings.seed + i, progress=self.progress)
            self.state["seconds"][f"train/{kind}/{i + 1}"] = time.perf_counter() - began
            self.runner.invalidate()
        return path

    def train_step(self, i: int, train_set) -> None:
        if self.plan["individual"]:
            self._train("individual", i, self.theta0, train_set)
        if self.plan["sequential"]:
            start = self.theta0 if i == 0 else load_file(str(self.checkpoint("sequential", i - 1)))
            self._train("sequential", i, start, train_set)

    # -- ConDU stores -----------------------------------------------------------------------

    def prototypes(self, i: int, train_set) -> torch.Tensor:
        """(C, D) prototypes of task i, computed with theta0 (REFERENCE.md)."""
        self.runner.activate("theta0")
        feats, labels = dataset_features(self.clip, train_set, batch_size=self.config.evaluation.batch_size,
                                         desc=f"prototypes {self.specs[i].name}" if self.progress else None)
        return compute_prototypes(self.clip, feats, labels, self.specs[i].class_names, self.specs[i].templates)

    def store_step(self, i: int, protos: torch.Tensor) -> None:
        """Unify (first task) or add task i to every store; skip what an interrupted run already did."""
        from fusion import Store

        name, ckpt = self.specs[i].name, self.checkpoint("individual", i)
        for rescaler in self.plan["rescalers"]:
            began = time.perf_counter()
            path = self.store_dir(rescaler)
            if not (path / "condu.json").exists():
                store = Store.unify(path, self.base_path, [ckpt], names=[name], rescaler=rescaler,
                                    kernel=self.config.fusion_kernel)
            else:
                store = Store.open(path, kernel=self.config.fusion_kernel)
                if name not in [t.name for t in store.tasks]:
                    store.add(ckpt, name=name)
            if not store.task(name).has_prototypes:
                store.save_prototypes(name, {PROTOTYPES: protos.contiguous()})
            self.state["seconds"][f"store/{rescaler}/{i + 1}"] = time.perf_counter() - began
            self.state["fidelity"].setdefault(rescaler, []).append(fidelity_of(store))
            self.state["stores"][rescaler] = store_sizes(store.info())

    def open_store(self, rescaler: str):
        from fusion import Store

        return Store.open(self.store_dir(rescaler), kernel=self.config.fusion_kernel)

    # -- evaluation -------------------------------------------------------------------------

    def eval_model(self, key, build, j: int) -> float:
        """Accuracy on task j of one model, given by a cache key and a builder of its weights."""
        self.runner.activate(key, build)
        dataset, labels = self.test_set(j)
        logits, _ = self.runner.logits(dataset, self.specs[j].class_names, self.specs[j].templates,
                                       desc=f"eval {key[0]} on {self.specs[j].name}")
        return accuracy(logits, labels)

    def zero_shot_row(self) -> list[float]:
        return [accuracy(self.base_eval(j)[0], self.base_eval(j)[2]) for j in range(len(self.specs))]

    def one_model_row(self, key, build) -> list[float]:
        return [self.eval_model(key, build, j) for j in range(len(self.specs))]

    def individual_row(self, i: int) -> list[float]:
        zero = self.zero_shot_row()
        return [self.eval_model(("individual", j), lambda j=j: load_file(str(self.checkpoint("individual", j))), j)
                if j <= i else zero[j] for j in range(len(self.specs))]

    def merged_row(self, method: MethodConfig, i: int) -> list[float]:
        if method.kind == "sequential":
            return self.one_model_row(("sequential", i), lambda: load_file(str(self.checkpoint("sequential", i))))
        if method.kind == "task_arithmetic":
            paths = [self.checkpoint("individual", t) for t in range(i + 1)]
            return self.one_model_row(("task_arithmetic", method.alpha, i),
                                      lambda: baselines.task_arithmetic(self.theta0, paths, alpha=method.alpha))
        paths = [self.checkpoint("sequential", t) for t in range(i + 1)]
        return self.one_model_row(("magmax", method.scale, i),
                                  lambda: baselines.magmax(self.theta0, paths, scale=method.scale))

    def routes(self, store, method: MethodConfig, i: int, routed: list[int],
               thresholds: torch.Tensor | None = None) -> dict[int, tuple]:
        """Per routed task j: each test image's top-K experts among tasks 1..i+1, and their weights;
        with per-expert thresholds, the experts that do not pass theirs are taken out (-1)."""
        protos = [store.load_prototypes(t + 1)[PROTOTYPES] for t in range(i + 1)]  # T x (C_t, D)
        top_k = method.top_k or self.config.evaluation.top_k
        routes = {j: top_k_experts(routing_weights(self.base_eval(j)[1], protos), top_k) for j in routed}
        if thresholds is None:
            return routes
        return {j: (gating.gate_selection(sel, values, thresholds), values) for j, (sel, values) in routes.items()}

    def gate_thresholds(self, store, method: MethodConfig, i: int) -> torch.Tensor:
        """The gated aggregate's (i + 1,) taus at step i, from held-out images of tasks 0..i only."""
        protos = [store.load_prototypes(t + 1)[PROTOTYPES] for t in range(i + 1)]
        weights = {s: routing_weights(self.held_out_features(s), protos) for s in range(i + 1)}
        thresholds = gating.expert_thresholds(weights, i + 1)
        self.state.setdefault("gates", {}).setdefault(method.name, []).append(gating.recorded(thresholds))
        return thresholds

    def expert_pass(self, store, method: MethodConfig, i: int, t: int, routes: dict) -> tuple[float | None, dict]:
        """Load expert t once: its own task's accuracy (with task identity) and its logits on the
        test images of every routed task that selected it, and only on those."""
        wanted = [j for j in routes if (routes[j][0] == t).any()]
        if not wanted and method.agnostic:
            return None, {}
        key, build = ("condu", method.rescaler, i, t), (lambda: self.load_expert(store, t))
        own = None if method.agnostic else self.eval_model(key, build, t)
        self.runner.activate(key, build)
        logits = {}
        for j in wanted:
            rows, _ = rows_selecting(routes[j][0], t)
            logits[j], _ = self.runner.logits(self.test_set(j)[0], self.specs[j].class_names,
                                              self.specs[j].templates, rows=rows)
        return own, logits

    def condu_row(self, method: MethodConfig, i: int) -> list[float]:
        """Seen tasks with identity: their decoupled expert; the rest: theta0 + top-K routed experts."""
        store = self.open_store(method.rescaler)
        routed = [j for j in range(len(self.specs)) if method.agnostic or j > i]
        aggregate = method.aggregate or self.config.evaluation.aggregate
        thresholds = self.gate_thresholds(store, method, i) if aggregate == "gated" else None
        routes = self.routes(store, method, i, routed, thresholds)
        acc, expert_logits = {}, {j: {} for j in routed}
        for t in range(i + 1):  # each expert is loaded once per step
            acc[t], logits = self.expert_pass(store, method, i, t, routes)
            for j, values in logits.items():
                expert_logits[j][t] = values
        for j in routed:
            logits0, _, labels = self.base_eval(j)
            acc[j] = accuracy(combine_routed(logits0, *routes[j], expert_logits[j], aggregate), labels)
        if method.agnostic:
            self.state["routing"].setdefault(method.name, []).append(self.routing_hits(routes, i))
        return [acc[j] for j in range(len(self.specs))]

    def routing_hits(self, routes: dict, i: int) -> list[float | None]:
        """% of each seen task's test images whose first expert is that task's own (None: unseen)."""
        return [100.0 * (routes[j][0][:, 0] == j).double().mean().item() if j <= i else None
                for j in range(len(self.specs))]

    @staticmethod
    def load_expert(store, t: int) -> dict[str, torch.Tensor]:
        """Task t's (0-based) full model as the store decouples it."""
        return store.load_task(t + 1)

    def row(self, method: MethodConfig, i: int) -> list[float]:
        if method.kind == "zero_shot":
            return self.zero_shot_row()
        if method.kind == "individual":
            return self.individual_row(i)
        if method.kind == "condu":
            return self.condu_row(method, i)
        return self.merged_row(method, i)

    # -- the loop ---------------------------------------------------------------------------

    def step(self, i: int) -> None:
        """Train task i, update the stores, evaluate every method's row i, save the state."""
        train_set = self.train_set(i)
        self.train_step(i, train_set)
        if self.plan["rescalers"]:
            self.store_step(i, self.prototypes(i, train_set))
        for method in self.config.methods:
            began = time.perf_counter()
            self.state["rows"][method.name].append(self.row(method, i))
            self.state["seconds"][f"eval/{method.name}/{i + 1}"] = time.perf_counter() - began
        self.runner.cache.clear()
        self.state["completed"] = i + 1
        self._save_state()

    def run(self, *, stop_after: int | None = None) -> dict | None:
        """Run (or resume) the loop; return the results, or None when stopped after `stop_after` tasks.

        Under `accelerate launch` every process trains; the main one alone updates the stores,
        evaluates and writes, while the others wait for it at the end of each task.
        """
        main = self.processes.is_main_process
        if main and not self.base_path.exists():
            save_checkpoint(self.theta0, self.base_path)
        total = len(self.specs)
        bar = tqdm(range(self.state["completed"], total), desc="tasks", disable=not self.progress or not main,
                   initial=self.state["completed"], total=total)
        for i in bar:
            bar.set_postfix(task=self.specs[i].name)
            self.step(i) if main else self.train_step(i, self.train_set(i))
            self.processes.wait_for_everyone()
            if stop_after is not None and i + 1 >= stop_after and i + 1 < total:
                return None
        return self.finish() if main else None

    def finish(self) -> dict:
        results = build_results(self.config, self.state, [s.name for s in self.specs])
        write_outputs(results, self.root)
        return results


# ---------------------------------------------------------------- results


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


def build_results(config: RunConfig, state: dict, tasks: list[str]) -> dict:
    matrices = {name: rows for name, rows in state["rows"].items()}
    return {
        "tasks": tasks,
        "methods": {m.name: asdict(m) for m in config.methods},
        "matrices": matrices,
        "summary": {name: metrics.summarize(rows) for name, rows in matrices.items()},
        "fidelity": fidelity_summary(state["fidelity"], tasks),
        "routing_top1": state.get("routing", {}),
        "gates": state.get("gates", {}),
        "stores": state.get("stores", {}),
        "seconds": state["seconds"],
        "cost": cost_summary(state["seconds"]),
        "config": state["config"],
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
    parts = ["# Continual learning results\n", metrics.markdown_table(results["summary"])]
    for name, matrix in results["matrices"].items():
        parts.append(f"\n## {name}: accuracy matrix (rows: after step i; columns: task j)\n")
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
    (root / "results.md").write_text(results_markdown(results), encoding="utf-8")
    for name, matrix in results["matrices"].items():
        metrics.heatmap(matrix, results["tasks"], root / f"heatmap-{name}.png", title=name)
    return metrics.markdown_table(results["summary"])


def report(root: str | os.PathLike) -> str:
    """Rebuild the table, markdown and plots from a run folder's saved results."""
    root = Path(root)
    if not (root / "results.json").exists():
        raise ValueError(f"{root}: no results.json; finish the run with `condu-cl run` first")
    return write_outputs(json.loads((root / "results.json").read_text()), root)


def run(config: RunConfig, out: str | os.PathLike, *, progress: bool = True, stop_after: int | None = None,
        clip: Clip | None = None) -> dict | None:
    """Run or resume the continual loop of `config` in the folder `out`."""
    return ContinualRun(config, out, progress=progress, clip=clip).run(stop_after=stop_after)
