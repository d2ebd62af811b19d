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
