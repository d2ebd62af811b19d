"""The continual loop: ConDU, and every baseline through the same loop.

For each task, in the config's order (REFERENCE.md, the continual iteration):

    train     its fine-tune in every chain a method reads: from theta0, or from the previous
              task's fine-tune (training.py)
    fuse      its class prototypes, computed with theta0, and its fine-tune from theta0 into every
              ConDU store: decouple the earlier tasks, unify all again (stores.py)
    evaluate  every method's row of the accuracy matrix (methods.py, evaluation.py)
    save      the run's state, the point a resumed run starts from (state.py)

then the results (results.py). The parts: runfolder.py (where each thing is written), taskdata.py
(the tasks' images and theta0's outputs, loaded once), inference.py (running models; the routed
rule), finetunes.py (what a fine-tune is on disk, whole model or LoRA).

A run interrupted after task k resumes at task k+1: checkpoints, stores and matrix rows on disk
are reused, and a step whose store update already landed is not added twice.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from . import console
from .config import RunConfig
from .data import TaskSpec, resolve_task
from .evaluation import Evaluation
from .finetunes import finetunes_for
from .inference import ModelRunner
from .methods import Method, make_methods
from .models import Clip, describe_model, image_size, load_clip, resolve_device, state_dict_cpu
from .processes import process_state
from .prototypes import compute_prototypes, dataset_features
from .results import build_results, write_outputs
from .runfolder import RunFolder
from .state import load_state, save_state
from .stores import fidelity_of, fuse_task, store_sizes
from .taskdata import TaskData
from .training import Training, chains_needed


class ContinualRun:
    """One run folder: its config, its state, and the parts that train, fuse and evaluate.

    Under a launcher every process makes one; all of them train, the main one alone writes,
    evaluates and reports (`log` is called on the main process only)."""

    def __init__(self, config: RunConfig, out: str | os.PathLike, *, progress: bool = True,
                 clip: Clip | None = None, log: Callable[[str], None] | None = None):
        self.config = config
        self.processes = process_state(cpu=resolve_device(config.device).type == "cpu")
        self.main = self.processes.is_main_process
        self.progress, self.bars = progress, progress and console.bars_on_terminal()
        self._log = log if (log and self.main) else (lambda message: None)
        self._check_batch_split()
        # `auto` and `cuda` take this process's own GPU under a launcher; `cuda:N` is taken as written
        device = self.processes.device if config.device in ("auto", "cuda") else resolve_device(config.device)
        with self.processes.main_process_first():  # one download of a hub id, then the cache
            self.clip = clip or load_clip(config.model, device=device)
        self.folder = RunFolder(Path(out), tuple(t.name for t in config.tasks))
        self.methods: list[Method] = make_methods(config.methods)
        self.chains = chains_needed(m.chains for m in self.methods)
        self.rescalers = sorted({m.store for m in self.methods if m.store})
        self.state = load_state(self.folder.state, config)  # before anything is written: a refusal changes nothing
        with self.processes.main_process_first():  # the main process records each task's split; a resumed run reads it
            self.specs: list[TaskSpec] = [resolve_task(t, record_dir=self.folder.root / "splits") for t in config.tasks]
        self.finetunes = finetunes_for(self.folder.root, state_dict_cpu(self.clip.model), config.training)
        if self.main:
            self.folder.root.mkdir(parents=True, exist_ok=True)
            self.finetunes.write_base(self.clip)
        self.processes.wait_for_everyone()
        base_state = self.finetunes.base_state()
        ev = config.evaluation
        self.runner = ModelRunner(self.clip, self.finetunes.weights(base_state), cache_size=ev.cache_size,
                                  batch_size=ev.batch_size, num_workers=config.training.num_workers,
                                  progress=self.bars)
        side = config.image_size or image_size(self.clip.processor)
        self.data = TaskData(config, self.specs, self.clip, side, self.folder, self.runner)
        self.training = Training(config, self.specs, self.clip, self.finetunes, self.folder, progress=self.bars)
        self.evaluation = Evaluation(config, self.specs, self.clip, self.runner, self.data, self.finetunes,
                                     self.folder, base_state)

    def _check_batch_split(self) -> None:
        count, batch = self.processes.num_processes, self.config.training.batch_size
        if batch % count:
            raise ValueError(f"{self.config.path}: training.batch_size: {batch} does not split evenly across "
                             f"{count} processes; make it a multiple of {count}")

    # -- one task ---------------------------------------------------------------------------

    def step(self, i: int) -> None:
        """Task i: train, fuse, evaluate every method's row i, save the state."""
        train_set = self.data.train_set(i)
        self.train(i, train_set)
        if self.rescalers:
            self.fuse(i, self.prototypes(i, train_set))
        for method in self.methods:
            self.evaluate(method, i)
        self.runner.cache.clear()
        self.state.completed = i + 1
        save_state(self.state, self.folder.state)

    def train(self, i: int, train_set) -> None:
        """Task i's fine-tune in every chain; one an interrupted run finished is kept."""
        for chain in self.chains:
            seconds = self.training.fine_tune(chain, i, train_set)
            if seconds is not None:
                self.state.seconds[f"train/{chain}/{i + 1}"] = seconds
                self.runner.invalidate()  # training changed the model's weights in place
            elif i >= self.state.completed:
                path = self.folder.checkpoint(chain, i).relative_to(self.folder.root)
                self._log(f"reused {path}, trained before the interruption")

    def prototypes(self, i: int, train_set) -> torch.Tensor:
        """(C, D) prototypes of task i, computed with theta0 (REFERENCE.md)."""
        self.runner.activate("theta0")
        feats, labels = dataset_features(self.clip, train_set, batch_size=self.config.evaluation.batch_size,
                                         desc=f"prototypes {self.specs[i].name}" if self.bars else None)
        return compute_prototypes(self.clip, feats, labels, self.specs[i].class_names, self.specs[i].templates)

    def fuse(self, i: int, prototypes: torch.Tensor) -> None:
        """ConDU's continual step in every store: task i's fine-tune from theta0, with its prototypes."""
        checkpoint = self.folder.checkpoint("individual", i)
        for rescaler in self.rescalers:
            began = time.perf_counter()
            store = fuse_task(self.folder.store(rescaler), self.finetunes.base_path, checkpoint, self.specs[i].name,
                              prototypes, rescaler=rescaler, kernel=self.config.fusion_kernel)
            self.state.seconds[f"store/{rescaler}/{i + 1}"] = time.perf_counter() - began
            self.state.fidelity.setdefault(rescaler, []).append(fidelity_of(store))
            self.state.stores[rescaler] = store_sizes(store.info())

    def evaluate(self, method: Method, i: int) -> None:
        """The method's row i, and what it measured on the way, into the state."""
        name, began = method.config.name, time.perf_counter()
        row = method.row(self.evaluation, i)
        self.state.rows[name].append(row.accuracy)
        if row.gates is not None:
            self.state.gates.setdefault(name, []).append(row.gates)
        if row.routing is not None:
            self.state.routing.setdefault(name, []).append(row.routing)
        self.state.seconds[f"eval/{name}/{i + 1}"] = time.perf_counter() - began

    # -- the run ----------------------------------------------------------------------------

    def _announce(self) -> None:
        """Say how the run is spread over processes, and what a resumed run reuses."""
        count, batch = self.processes.num_processes, self.config.training.batch_size
        if count > 1:
            self._log(f"{count} processes ({self.processes.backend}): each task's global batch of {batch} is "
                      f"split {batch // count} per process; the main process writes and evaluates")
        done, total = self.state.completed, len(self.specs)
        if done:
            names = ", ".join(s.name for s in self.specs[:done])
            rest = (f"continuing at task {done + 1} of {total}" if done < total
                    else "nothing left to train; the results are rebuilt from it")
            self._log(f"resumed {self.folder.root}: reused the finished work of {done} task(s) ({names}): their "
                      f"checkpoints, stores and accuracy rows; {rest}")

    def run(self, *, stop_after: int | None = None) -> dict | None:
        """Run (or resume) the loop; return the results, or None when stopped after `stop_after` tasks
        (and in every process but the main one)."""
        self._announce()
        total = len(self.specs)
        bar = tqdm(range(self.state.completed, total), desc="tasks", disable=not self.bars or not self.main,
                   initial=self.state.completed, total=total)
        for i in bar:
            bar.set_postfix(task=self.specs[i].name)
            began = time.perf_counter()
            self.step(i) if self.main else self.train(i, self.data.train_set(i))
            self.processes.wait_for_everyone()
            if self.progress and not self.bars:
                self._log(f"task {i + 1}/{total} {self.specs[i].name}: done in {time.perf_counter() - began:.1f} s")
            if stop_after is not None and i + 1 >= stop_after and i + 1 < total:
                return None
        return self.finish() if self.main else None

    def finish(self) -> dict:
        results = build_results(self.config, self.state, [s.name for s in self.specs])
        results["model"] = describe_model(self.clip)
        write_outputs(results, self.folder.root)
        return results


def run(config: RunConfig, out: str | os.PathLike, *, progress: bool = True, stop_after: int | None = None,
        clip: Clip | None = None, log: Callable[[str], None] | None = None) -> dict | None:
    """Run or resume the continual loop of `config` in the folder `out`; `log` receives what the
    run has to say (processes, reused work, one line a task when no progress bars show)."""
    return ContinualRun(config, out, progress=progress, clip=clip, log=log).run(stop_after=stop_after)
