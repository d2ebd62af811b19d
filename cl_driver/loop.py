"""The continual loop: train each task, update the ConDU stores, evaluate every method on every task.

Run folder layout::

    base.safetensors                    theta0, the base of every store
    base-adapter/                       LoRA runs instead: the initial adapter every task starts from,
                                        the base of every store (theta0 is CLIP with it merged)
    checkpoints/individual/NN-task/     fine-tuned from theta0 (individual, task arithmetic, ConDU): a model
                                        folder naming theta0 as its base (checkpoints.py); LoRA runs: an
                                        adapter folder
    checkpoints/sequential/NN-task/     fine-tuned from the previous one (sequential, MagMax)
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
from pathlib import Path

from functools import partial
from typing import Callable

import torch
from tqdm.auto import tqdm

from . import baselines, console, gating
from .config import MethodConfig, RunConfig
from .data import TaskSpec, as_dataset, few_shot, load_split, resolve_task
from .finetunes import finetunes_for, weights_file
from .inference import ModelRunner, accuracy, combine_routed, rows_selecting, top_k_experts
from .models import Clip, describe_model, image_size, load_clip, resolve_device, state_dict_cpu
from .processes import process_state
from .results import build_results, write_json, write_outputs
from .prototypes import compute_prototypes, dataset_features, routing_weights

STATE_VERSION = 1
PROTOTYPES = "prototypes"  # the attachment (and its tensor) that holds a task's (C, D) prototypes


# ---------------------------------------------------------------- small helpers


def config_fingerprint(config: RunConfig) -> dict:
    """What a resumed run must share with the interrupted one."""
    return config.model_dump(mode="json", exclude={"device", "path"})


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


def learned_prototypes(store, i: int) -> list[torch.Tensor]:
    """The (C_t, D) prototypes of tasks 1..i+1 of a store, in task order."""
    return [torch.from_numpy(store.attachment(t + 1, PROTOTYPES)[PROTOTYPES]) for t in range(i + 1)]


def fidelity_of(store) -> list[dict]:
    """Per stored task: its name and its reconstruction fidelity (cosine, relative L2)."""
    return [{"task": t.name, **t.fidelity} for t in store.tasks]


# ---------------------------------------------------------------- the run


class ContinualRun:
    """One run folder: its config, its on-disk state, and the models it trains and evaluates.

    Under a launcher every process makes one; all of them train, the main one alone writes,
    evaluates and reports (`log` is called on the main process only)."""

    def __init__(self, config: RunConfig, out: str | os.PathLike, *, progress: bool = True,
                 clip: Clip | None = None, log: Callable[[str], None] | None = None):
        self.config, self.root = config, Path(out)
        self.processes = process_state(cpu=resolve_device(config.device).type == "cpu")
        self.main = self.processes.is_main_process
        self.progress, self.bars = progress, progress and console.bars_on_terminal()
        self._log = log if (log and self.main) else (lambda message: None)
        self._check_batch_split()
        # `auto` and `cuda` take this process's own GPU under a launcher; `cuda:N` is taken as written
        device = self.processes.device if config.device in ("auto", "cuda") else resolve_device(config.device)
        with self.processes.main_process_first():  # one download of a hub id, then the cache
            self.clip = clip or load_clip(config.model, device=device)
        self.specs: list[TaskSpec] = [resolve_task(t) for t in config.tasks]
        self.side = config.image_size or image_size(self.clip.processor)
        self.plan = needs(config)
        self.state = self._load_state()
        self.finetunes = finetunes_for(self.root, state_dict_cpu(self.clip.model), config.training)
        if self.main:
            self.root.mkdir(parents=True, exist_ok=True)
            self.finetunes.write_base(self.clip)
        self.processes.wait_for_everyone()
        self.base_state = self.finetunes.base_state()
        self.theta0 = self.finetunes.weights(self.base_state)
        ev = config.evaluation
        self.runner = ModelRunner(self.clip, self.theta0, cache_size=ev.cache_size, batch_size=ev.batch_size,
                                  num_workers=config.training.num_workers, progress=self.bars)
        self._tests: dict[int, object] = {}
        self._base_eval: dict[int, tuple] = {}
        self._held_out: dict[int, torch.Tensor] = {}

    def _check_batch_split(self) -> None:
        count, batch = self.processes.num_processes, self.config.training.batch_size
        if batch % count:
            raise ValueError(f"{self.config.path}: training.batch_size: {batch} does not split evenly across "
                             f"{count} processes; make it a multiple of {count}")

    # -- paths ----------------------------------------------------------------------------

    @property
    def base_path(self) -> Path:
        """The base of every store: theta0, or the initial adapter in LoRA runs."""
        return self.finetunes.base_path

    def checkpoint(self, kind: str, i: int) -> Path:
        folder = self.root / "checkpoints" / kind / f"{i + 1:02d}-{self.specs[i].name}"
        lone_file = folder.with_name(folder.name + ".safetensors")  # run folders whose fine-tunes are lone files
        return lone_file if lone_file.is_file() else folder

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
        """Task i's training images: all of them, or `training.shots` of each class (seeded)."""
        settings = self.config.training
        split = load_split(self.specs[i], "train", image_size=self.side, seed=settings.seed)
        if settings.shots:
            split = few_shot(split, settings.shots, seed=settings.seed)
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

    def _train(self, kind: str, i: int, start: Path | None, train_set) -> Path:
        """Fine-tune task i from `start` (None: the base) unless an earlier attempt left its checkpoint."""
        path = self.checkpoint(kind, i)
        if path.exists():
            if i >= self.state["completed"]:
                self._log(f"reused {path.relative_to(self.root)}, trained before the interruption")
            return path
        settings = self.config.task_training(self.config.tasks[i])
        began = time.perf_counter()
        self.finetunes.train(self.clip, start, self.specs[i], train_set, settings, path, seed=settings.seed + i,
                             progress=self.bars)
        self.state["seconds"][f"train/{kind}/{i + 1}"] = time.perf_counter() - began
        self.runner.invalidate()
        return path

    def train_step(self, i: int, train_set) -> None:
        if self.plan["individual"]:
            self._train("individual", i, None, train_set)
        if self.plan["sequential"]:
            self._train("sequential", i, None if i == 0 else self.checkpoint("sequential", i - 1), train_set)

    def model_weights(self, checkpoint: Path) -> dict[str, torch.Tensor]:
        """The CLIP weights of a fine-tuned checkpoint."""
        return self.finetunes.weights(self.finetunes.fused_state(checkpoint))

    # -- ConDU stores -----------------------------------------------------------------------

    def prototypes(self, i: int, train_set) -> torch.Tensor:
        """(C, D) prototypes of task i, computed with theta0 (REFERENCE.md)."""
        self.runner.activate("theta0")
        feats, labels = dataset_features(self.clip, train_set, batch_size=self.config.evaluation.batch_size,
                                         desc=f"prototypes {self.specs[i].name}" if self.bars else None)
        return compute_prototypes(self.clip, feats, labels, self.specs[i].class_names, self.specs[i].templates)

    def store_step(self, i: int, protos: torch.Tensor) -> None:
        """Unify (first task) or add task i to every store; skip what an interrupted run already did."""
        from fusion import Store

        # A checkpoint file, or an adapter folder: with the initial adapter as base, the store
        # fuses adapters in factor space.
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
            if PROTOTYPES not in store.task(name).attachments:
                store.attach(name, PROTOTYPES, {PROTOTYPES: protos.contiguous()})
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
        return [self.eval_model(("individual", j), lambda j=j: self.model_weights(self.checkpoint("individual", j)), j)
                if j <= i else zero[j] for j in range(len(self.specs))]

    def merged(self, merge, checkpoints: list[Path]) -> dict[str, torch.Tensor]:
        """A merging baseline's model: `merge` applied in fusion's space, then made CLIP weights."""
        return self.finetunes.weights(merge(self.base_state, [weights_file(c) for c in checkpoints]))

    def merged_row(self, method: MethodConfig, i: int) -> list[float]:
        if method.kind == "sequential":
            return self.one_model_row(("sequential", i), lambda: self.model_weights(self.checkpoint("sequential", i)))
        if method.kind == "task_arithmetic":
            paths = [self.checkpoint("individual", t) for t in range(i + 1)]
            merge = partial(baselines.task_arithmetic, alpha=method.alpha)
            return self.one_model_row(("task_arithmetic", method.alpha, i), lambda: self.merged(merge, paths))
        paths = [self.checkpoint("sequential", t) for t in range(i + 1)]
        merge = partial(baselines.magmax, scale=method.scale)
        return self.one_model_row(("magmax", method.scale, i), lambda: self.merged(merge, paths))

    def routes(self, store, method: MethodConfig, i: int, routed: list[int],
               thresholds: torch.Tensor | None = None) -> dict[int, tuple]:
        """Per routed task j: each test image's top-K experts among tasks 1..i+1, and their weights;
        with per-expert thresholds, the experts that do not pass theirs are taken out (-1)."""
        protos = learned_prototypes(store, i)
        top_k = method.top_k or self.config.evaluation.top_k
        routes = {j: top_k_experts(routing_weights(self.base_eval(j)[1], protos), top_k) for j in routed}
        if thresholds is None:
            return routes
        return {j: (gating.gate_selection(sel, values, thresholds), values) for j, (sel, values) in routes.items()}

    def gate_thresholds(self, store, method: MethodConfig, i: int) -> torch.Tensor:
        """The gated aggregate's (i + 1,) taus at step i, from held-out images of tasks 0..i only."""
        protos = learned_prototypes(store, i)
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

    def load_expert(self, store, t: int) -> dict[str, torch.Tensor]:
        """Task t's (0-based) CLIP weights, from the state the store decouples: rebuilt straight onto
        the model's device for whole-model fine-tunes, on the host for adapters (merged there)."""
        device = next(self.clip.model.parameters()).device if self.finetunes.rebuilds_on_model_device else "cpu"
        return self.finetunes.weights(store.load_task(t + 1, device=device))

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

    def _announce(self) -> None:
        """Say how the run is spread over processes, and what a resumed run reuses."""
        count, batch = self.processes.num_processes, self.config.training.batch_size
        if count > 1:
            self._log(f"{count} processes ({self.processes.backend}): each task's global batch of {batch} is "
                      f"split {batch // count} per process; the main process writes and evaluates")
        done, total = self.state["completed"], len(self.specs)
        if done:
            names = ", ".join(s.name for s in self.specs[:done])
            rest = (f"continuing at task {done + 1} of {total}" if done < total
                    else "nothing left to train; the results are rebuilt from it")
            self._log(f"resumed {self.root}: reused the finished work of {done} task(s) ({names}): their "
                      f"checkpoints, stores and accuracy rows; {rest}")

    def run(self, *, stop_after: int | None = None) -> dict | None:
        """Run (or resume) the loop; return the results, or None when stopped after `stop_after` tasks
        (and in every process but the main one)."""
        self._announce()
        total = len(self.specs)
        bar = tqdm(range(self.state["completed"], total), desc="tasks", disable=not self.bars or not self.main,
                   initial=self.state["completed"], total=total)
        for i in bar:
            bar.set_postfix(task=self.specs[i].name)
            began = time.perf_counter()
            self.step(i) if self.main else self.train_step(i, self.train_set(i))
            self.processes.wait_for_everyone()
            if self.progress and not self.bars:
                self._log(f"task {i + 1}/{total} {self.specs[i].name}: done in {time.perf_counter() - began:.1f} s")
            if stop_after is not None and i + 1 >= stop_after and i + 1 < total:
                return None
        return self.finish() if self.main else None

    def finish(self) -> dict:
        results = build_results(self.config, self.state, [s.name for s in self.specs])
        results["model"] = describe_model(self.clip)
        write_outputs(results, self.root)
        return results


def run(config: RunConfig, out: str | os.PathLike, *, progress: bool = True, stop_after: int | None = None,
        clip: Clip | None = None, log: Callable[[str], None] | None = None) -> dict | None:
    """Run or resume the continual loop of `config` in the folder `out`; `log` receives what the
    run has to say (processes, reused work, one line a task when no progress bars show)."""
    return ContinualRun(config, out, progress=progress, clip=clip, log=log).run(stop_after=stop_after)
