"""The processes of a run: one process group for the whole run, made by `accelerate`.

Under `accelerate launch` or `torchrun` every process trains its share of each batch; the main
process alone writes, evaluates and reports, while the others wait for it at the end of each task.
A plain `condu-cl run` is one process and needs none of this.

`accelerate launch --cpu --num_processes N` starts one process only (accelerate's multi-CPU path
goes through mpirun): `relaunch_command` notices that and gives the torch.distributed.run command
that starts the N processes asked for.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

# The other processes wait at a barrier while the main one evaluates every method after a task,
# which takes long on MTIL: the process group's timeout must outlast it.
MAIN_PROCESS_WAIT = timedelta(hours=24)


def process_state(cpu: bool):
    """accelerate's view of the processes; the first call makes the run's process group
    (gloo on CPU, NCCL on GPUs)."""
    from accelerate import PartialState

    return PartialState(cpu=cpu, timeout=MAIN_PROCESS_WAIT)


def is_main_process() -> bool:
    """True in a plain run, and in the main process of a launched one."""
    rank = os.environ.get("RANK")
    return rank is None or int(rank) == 0


def _launch_arguments(argv: list[str]):
    """The options of an `accelerate launch` command line, parsed by accelerate's own parser."""
    from accelerate.commands.launch import launch_command_parser

    starts = [i for i, word in enumerate(argv) if word in ("launch", "accelerate.commands.launch")]
    if not starts:  # `accelerate launch ...` or `python -m accelerate.commands.launch ...`
        return None
    args, _ = launch_command_parser().parse_known_args(argv[starts[0] + 1:])
    return args


def relaunch_command(argv: list[str] | None = None) -> list[str] | None:
    """The torch.distributed.run command for this same command line, when this process is the
    single one that `accelerate launch --cpu --num_processes N` (N > 1) started; else None."""
    env = os.environ
    launched_on_cpu = env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if not launched_on_cpu or "RANK" in env or "WORLD_SIZE" in env or "MASTER_ADDR" not in env:
        return None
    import psutil

    args = _launch_arguments(psutil.Process().parent().cmdline())
    if args is None or (args.num_processes or 1) <= 1 or args.mpirun_hostfile:  # mpirun starts them all
        return None
    machines = args.num_machines or 1
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.num_processes // machines}",
            f"--nnodes={machines}", f"--node_rank={args.machine_rank or 0}", f"--master_addr={env['MASTER_ADDR']}",
            f"--master_port={env['MASTER_PORT']}", "-m", "cl_driver.cli", *(argv or sys.argv[1:])]
