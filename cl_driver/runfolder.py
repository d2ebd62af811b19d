"""Where a run keeps what it makes: one folder, the same names on every resume.

    base.safetensors                    theta0, the base of every store
    base-adapter/                       LoRA runs instead: the initial adapter every task starts from,
                                        the base of every store (theta0 is CLIP with it merged)
    checkpoints/<chain>/NN-task/        one fine-tune a task of each chain of training.CHAINS:
                                        `individual` from theta0 (individual, task arithmetic, ConDU),
                                        `sequential` from the previous one (sequential, MagMax); a model
                                        folder naming theta0 as its base (checkpoints.py), in LoRA runs
                                        an adapter folder
    stores/<rescaler>/                  one ConDU store per rescaler mode the methods read
    pixels/<task>-test-N-side.npy       uint8 test pixels, when evaluation.pixel_cache is on
    state.json                          the resume point, written after each task (state.py)
    results.json, results.md, heatmap-<method>.png   when the run is complete (results.py)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunFolder:
    root: Path
    task_names: tuple[str, ...]  # in the run's order

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    def checkpoint(self, chain: str, i: int) -> Path:
        """Task i's (0-based) fine-tune of `chain`: a folder, or a lone .safetensors file where an
        older run wrote one."""
        folder = self.root / "checkpoints" / chain / f"{i + 1:02d}-{self.task_names[i]}"
        lone_file = folder.with_name(folder.name + ".safetensors")
        return lone_file if lone_file.is_file() else folder

    def store(self, rescaler: str) -> Path:
        return self.root / "stores" / rescaler

    def pixels(self, task: str, count: int, side: int) -> Path:
        return self.root / "pixels" / f"{task}-test-{count}-{side}.npy"
