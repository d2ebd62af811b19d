"""Fixtures of the cl_driver tests: a tiny CLIP, tiny tasks, one shared full run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.cl_driver.helpers import TASKS, build_tiny_clip, write_task_folder, tiny_config_dict


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny-data")
    for task in TASKS:
        write_task_folder(root, task)
    return root


@pytest.fixture(scope="session")
def tiny_config(tiny_model, tiny_data):
    from cl_driver.config import parse_config

    return parse_config(tiny_config_dict(tiny_data, tiny_model), where="tiny.yaml")


@pytest.fixture(scope="session")
def full_run(tiny_config, tmp_path_factory):
    """The whole loop with every method, run once for the session's tests."""
    from cl_driver.loop import run

    out = tmp_path_factory.mktemp("run-full")
    return out, run(tiny_config, out, progress=False)


def _small_run(tiny_model, tiny_data, out, **training):
    """A run of sequential fine-tuning and ConDU only: every kind of folder condu-cl writes, little else."""
    from cl_driver.config import parse_config
    from cl_driver.loop import run

    raw = tiny_config_dict(tiny_data, tiny_model, methods=["sequential", {"kind": "condu", "rescaler": "model"}],
                           iterations=3)
    raw["training"].update(training)
    run(parse_config(raw, where="tiny-small.yaml"), out, progress=False)
    return out


@pytest.fixture(scope="session")
def small_run(tiny_model, tiny_data, tmp_path_factory) -> Path:
    """Whole-model fine-tunes (from theta0 and sequential) and a store, in a run folder."""
    return _small_run(tiny_model, tiny_data, tmp_path_factory.mktemp("run-small"))


@pytest.fixture(scope="session")
def small_lora_run(tiny_model, tiny_data, tmp_path_factory) -> Path:
    """The same with LoRA: adapter folders, the initial adapter, a factor-space store."""
    return _small_run(tiny_model, tiny_data, tmp_path_factory.mktemp("run-small-lora"), train_part="lora",
                      lora={"rank": 4, "init_std": 0.01})
