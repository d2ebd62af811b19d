"""Training on several processes, for real: two CPU processes (gloo) under torch.distributed.run
and under `accelerate launch --cpu`, against one process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cl_driver.config import parse_config
from cl_driver.loop import run

from tests.cl_driver.distributed_worker import watch_batches
from tests.cl_driver.helpers import tiny_config_dict

WORKER = Path(__file__).with_name("distributed_worker.py")
METHODS = ["zero_shot", "individual", "sequential", {"kind": "condu", "rescaler": "model"}]
ONE_IMAGE = 100 / 15  # the smallest test set (3 classes x 5 images): one image is this many points


def two_task_config(tiny_data, tiny_model, tmp_path) -> Path:
    raw = tiny_config_dict(tiny_data, tiny_model, methods=METHODS)
    raw["tasks"] = raw["tasks"][:2]  # the quick loop, on two tasks
    path = tmp_path / "two-tasks.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def child_env() -> dict:
    repo = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def single(tiny_data, tiny_model, tmp_path_factory):
    """The same loop in this one process, every training batch recorded."""
    tmp = tmp_path_factory.mktemp("single")
    config = two_task_config(tiny_data, tiny_model, tmp)
    batches = []
    import cl_driver.train as train

    drawn = train._batches
    watch_batches(batches)
    try:
        results = run(parse_config(yaml.safe_load(config.read_text()), where=str(config)), tmp / "out",
                      progress=False)
    finally:
        train._batches = drawn
    return results, batches


def test_two_processes_split_each_batch_and_only_the_main_one_writes(tiny_data, tiny_model, tmp_path, single):
    config, out, traces = two_task_config(tiny_data, tiny_model, tmp_path), tmp_path / "out", tmp_path / "traces"
    traces.mkdir()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(WORKER), str(config), str(out), str(traces)],
                          capture_output=True, text=True, timeout=900, env=child_env())
    assert done.returncode == 0, done.stderr[-3000:]
    main, other = (json.loads((traces / f"rank{r}.json").read_text()) for r in (0, 1))
    assert main["world_size"] == other["world_size"] == 2

    # exactly one process wrote: the main one wrote the run, the other nothing at all
    assert other["writes"] == [] and other["matrices"] is None
    written = {part for p in main["writes"] for part in Path(p).relative_to(out.resolve()).parts[:1]}
    assert {"checkpoints", "stores", "state.json", "results.json"} <= written

    # both trained on every step, on different halves of the batch one process draws alone
    single_results, single_batches = single
    assert len(main["batches"]) == len(other["batches"]) == len(single_batches) == 2 * 2 * 6  # tasks x kinds x steps
    for mine, theirs, whole in zip(main["batches"], other["batches"], single_batches):
        assert len(mine) == len(theirs) == len(whole) // 2
        assert not set(mine) & set(theirs) and sorted(mine + theirs) == sorted(whole)

    # and the accuracy matrices are the single process's, within float rounding of the gradients
    for name, matrix in single_results["matrices"].items():
        for row, expected in zip(main["matrices"][name], matrix):
            assert row == pytest.approx(expected, abs=ONE_IMAGE + 1e-9), name


def test_accelerate_launch_on_cpu_really_starts_two_processes(tiny_data, tiny_model, tmp_path):
    config = two_task_config(tiny_data, tiny_model, tmp_path)
    accelerate = Path(sys.executable).with_name("accelerate")
    done = subprocess.run([str(accelerate), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "cl_driver.cli", "run",
                           str(config), "--methods", "individual", "--stop-after", "1", "--out", str(tmp_path / "out"),
                           "--no-progress"], capture_output=True, text=True, timeout=900, env=child_env())
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert output.count("2 processes (gloo)") == 1  # said once, by the main process of two
    assert output.count("stopped after 1 tasks") == 1
    assert (tmp_path / "out" / "checkpoints" / "individual" / "01-colors" / "model.safetensors").exists()


@pytest.mark.parametrize("parent, expected", [
    (["python", "/bin/accelerate", "launch", "--cpu", "--num_processes", "4", "-m", "cl_driver.cli", "run", "c.yaml"], 4),
    (["python", "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "-m", "cl_driver.cli"], 2),
    (["python", "/bin/accelerate", "launch", "--cpu", "-m", "cl_driver.cli", "run", "c.yaml"], None),  # one process
    (["python", "/bin/accelerate", "launch", "--cpu", "--num_processes", "4", "--mpirun_hostfile", "hosts",
      "-m", "cl_driver.cli"], None),  # mpirun starts them all itself
    (["bash", "-c", "condu-cl run c.yaml"], None),  # not accelerate
])
def test_relaunch_only_what_accelerate_launch_cpu_left_out(monkeypatch, parent, expected):
    import types

    import psutil

    from cl_driver.processes import relaunch_command

    for name, value in (("ACCELERATE_USE_CPU", "True"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29511")):
        monkeypatch.setenv(name, value)
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(psutil.Process, "parent", lambda self: types.SimpleNamespace(cmdline=lambda: parent))
    command = relaunch_command(["run", "c.yaml"])
    if expected is None:
        assert command is None
        return
    assert command == [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={expected}", "--nnodes=1",
                       "--node_rank=0", "--master_addr=127.0.0.1", "--master_port=29511", "-m", "cl_driver.cli",
                       "run", "c.yaml"]
    monkeypatch.setenv("RANK", "0")  # a process the relaunch started: never again
    assert relaunch_command(["run", "c.yaml"]) is None
