"""`condu-fuse`: the ConDU store from the command line, a thin layer over `fusion.Store`.

    condu-fuse unify --base BASE [--store DIR] [--rescaler model|tensor-mean|tensor] CKPT...
    condu-fuse add [--store DIR] CKPT [--name NAME]
    condu-fuse decouple --task N|NAME [--store DIR] -o OUT
    condu-fuse remove --task N|NAME [--store DIR]
    condu-fuse info [--store DIR] [--json]
    condu-fuse verify [--store DIR]

Each command parses, makes one library call and prints. Errors print one line on stderr,
`condu-fuse: error: ...`, and exit with status 1.
"""

from __future__ import annotations

import functools
import json
import sys

import click

from . import __version__
from .kernels import KERNELS
from .rescale import RESCALER_MODES
from .store import PASS_ELEMENTS, Store

DEFAULT_STORE = "./condu-store"
DTYPES = ("float32", "float16", "bfloat16")


def _fail(message: str) -> None:
    click.echo(f"condu-fuse: error: {' '.join(str(message).split())}", err=True)
    sys.exit(1)


def _one_line_errors(command):
    """Turn the library's ValueError/OSError into one clear line on stderr and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (ValueError, OSError) as err:
            _fail(str(err))

    return wrapper


def _store_option(command):
    return click.option("--store", "store", default=DEFAULT_STORE, show_default=True,
                        type=click.Path(file_okay=False), help="The store folder.")(command)


def _quiet_option(command):
    return click.option("--quiet/--no-quiet", "-q", default=False, help="No progress bars.")(command)


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def _rescaler_text(rescaler) -> str:
    if isinstance(rescaler, dict):
        values = list(rescaler.values()) or [0.0]
        return f"{min(values):.3f}..{max(values):.3f} ({len(values)} tensors)"
    return f"{rescaler:.4f}"


def _fidelity_text(fidelity: dict) -> tuple[str, str]:
    rel = fidelity.get("rel_l2")
    return f"{fidelity['cosine']:.4f}", "-" if rel is None else f"{rel:.4f}"


def format_info(info: dict) -> str:
    """The readable table `condu-fuse info` prints."""
    lines = [f"store       {info['store']}  (generation {info['generation']})",
             f"base        {info['base']['path']}",
             f"rescaler    {info['rescaler']}    fused: {info['tensors']} tensors, {info['fused_parameters']:,} parameters",
             "",
             f"{'#':>3}  {'name':<24} {'rescaler':<26} {'density':>8} {'cosine':>8} {'rel_l2':>8} {'at gen':>6}  private"]
    for t in info["tasks"]:
        cosine, rel = _fidelity_text(t["fidelity"])
        private = ", ".join(t["private"]) or "-"
        lines.append(f"{t['index']:>3}  {t['name']:<24} {_rescaler_text(t['rescaler']):<26} {t['mask_density']:>8.3f} "
                     f"{cosine:>8} {rel:>8} {t['fidelity']['generation']:>6}  {private}")
    sizes = info["sizes"]
    lines += ["",
              f"size        {_size(sizes['total'])}: unified {_size(sizes['unified'])}, triggers {_size(sizes['triggers'])}, "
              f"private {_size(sizes['private'])}, prototypes {_size(sizes['prototypes'])}",
              f"vs {len(info['tasks'])} separate checkpoints: {_size(info['separate_checkpoints_bytes'])}"
              + (f"  ({info['savings']:.2f}x smaller)" if info["savings"] else "")]
    return "\n".join(lines)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=__version__, message="condu-fuse %(version)s")
def main():
    """ConDU model fusion: one unified delta plus a bit mask and a rescaler per task."""


@main.command()
@click.option("--base", required=True, type=click.Path(exists=True), help="The pre-trained checkpoint (file or folder).")
@_store_option
@click.option("--rescaler", type=click.Choice(RESCALER_MODES), default="model", show_default=True)
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help="Unified delta dtype (default: the base's).")
@click.option("--missing", type=click.Choice(["error", "zero"]), default="error", show_default=True,
              help="A base tensor a checkpoint lacks: an error, or an unchanged tensor.")
@click.option("--name", "names", multiple=True, help="Task names, one per checkpoint (default: their names).")
@click.option("--kernel", type=click.Choice(KERNELS), default=None, help="Fusion kernel (default: fastest).")
@click.option("--chunk", type=int, default=None,
              help=f"Elements per chunk and task (default: {PASS_ELEMENTS:,} shared by the tasks).")
@_quiet_option
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(exists=True))
@_one_line_errors
def unify(base, store, rescaler, dtype, missing, names, kernel, chunk, quiet, checkpoints):
    """Create a store from BASE and one or more checkpoints (one-shot unify)."""
    result = Store.unify(store, base, checkpoints, names=list(names) or None, rescaler=rescaler, dtype=dtype,
                         missing=missing, kernel=kernel, chunk=chunk, progress=not quiet)
    click.echo(f"unified {len(result.tasks)} task(s) into {store}")


@main.command()
@_store_option
@click.option("--name", default=None, help="Task name (default: the checkpoint's name).")
@_quiet_option
@click.argument("checkpoint", type=click.Path(exists=True))
@_one_line_errors
def add(store, name, quiet, checkpoint):
    """Add CHECKPOINT as a new task: the ConDU continual step."""
    record = Store.open(store).add(checkpoint, name=name, progress=not quiet)
    click.echo(f"added task {record.index} ({record.name}) to {store}")


@main.command()
@click.option("--task", required=True, help="Task number (from 1) or name.")
@_store_option
@click.option("-o", "--out", required=True, type=click.Path(), help="OUT.safetensors, or a model folder.")
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help="Output dtype (default: the base's).")
@_quiet_option
@_one_line_errors
def decouple(task, store, out, dtype, quiet):
    """Rebuild one task's full model."""
    path = Store.open(store).decouple(task, out, dtype=dtype, progress=not quiet)
    click.echo(f"wrote {path}")


@main.command()
@click.option("--task", required=True, help="Task number (from 1) or name.")
@_store_option
@_quiet_option
@_one_line_errors
def remove(task, store, quiet):
    """Drop a task and re-unify the others."""
    opened = Store.open(store)
    name = opened.task(task).name
    opened.remove(task, progress=not quiet)
    click.echo(f"removed task {name} from {store}")


@main.command()
@_store_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_one_line_errors
def info(store, as_json):
    """Tasks, rescalers, mask density, fidelity, sizes and savings."""
    report = Store.open(store).info()
    click.echo(json.dumps(report, indent=2) if as_json else format_info(report))


@main.command()
@_store_option
@_one_line_errors
def verify(store):
    """Check every file's sha256 and the manifest's consistency."""
    problems = Store.open(store).verify()
    for problem in problems:
        click.echo(problem)
    if problems:
        _fail(f"{len(problems)} problem(s) in {store}")
    click.echo(f"{store}: ok")


if __name__ == "__main__":
    main()
