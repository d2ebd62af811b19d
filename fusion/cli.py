"""`condu-fuse`: the ConDU store from the command line, a thin layer over `fusion.Store`.

    condu-fuse unify [--base BASE] CKPT...        a store from one-shot unify (default ./condu-store)
    condu-fuse add CKPT [--name NAME]             the continual step
    condu-fuse decouple --task N|NAME [-o OUT]    a task's full model (default: ./<name>/)
    condu-fuse remove --task N|NAME               drop a task; the others keep their numbers
    condu-fuse info [--json]                      tasks, rescalers, fidelity, sizes
    condu-fuse verify [--json]                    read everything, check every block, per task
    condu-fuse set-base PATH                      point the store at a moved base (same content)
    condu-fuse repair                             restore condu.json from its backup
    condu-fuse migrate                            a version 1 store to version 2

A checkpoint argument is a .safetensors file, a model folder, a PEFT adapter folder or a hub id
(`org/name[@revision]`). Without --base, unify takes the base the checkpoints record, and says
which record on stderr. Warnings (a task rebuilt farther from its fine-tune than the base is)
go to stderr too, one line each.

Each command parses, makes one library call and prints. Errors print one line on stderr,
`condu-fuse: error: ...`, and exit with status 1 (Ctrl-C: 130; a bug shows its traceback and exits 2). The library is imported inside the commands,
so `condu-fuse --help` starts at once.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import traceback

import click

from .constants import KERNELS, MISSING_MODES, RESCALER_MODES
from .errors import ConduError, Interrupted
from .threads import passive_waiting

passive_waiting()  # before numba (or torch, for CUDA) is imported: fusion.threads says why

DEFAULT_STORE = "./condu-store"
DTYPES = ("float32", "float16", "bfloat16")
UNIFIED_DTYPES = DTYPES + ("int8", "int4")  # fusion.dtypes.UNIFIED_NAMES: the compact mode's int8 / int4 blocks
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


EXIT_ERROR, EXIT_BUG, EXIT_INTERRUPTED = 1, 2, 130  # 130: killed by SIGINT, as shells report it


def _fail(message: str, status: int = EXIT_ERROR) -> None:
    click.echo(f"condu-fuse: error: {' '.join(str(message).split())}", err=True)
    sys.exit(status)


def _one_line_errors(command):
    """What the library refuses on purpose (ConduError) and what the system refuses (OSError, which
    names its file) as one line on stderr and exit status 1; Ctrl-C as one line and 130. Anything
    else is a bug: its traceback, a line saying so, and exit status 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except Interrupted as err:
            _fail(str(err), EXIT_INTERRUPTED)
        except KeyboardInterrupt:  # outside a change (reads, decouple's output): nothing was left behind
            _fail("interrupted; the store is unchanged", EXIT_INTERRUPTED)
        except (ConduError, OSError) as err:
            _fail(str(err))
        except (click.exceptions.ClickException, click.exceptions.Exit, SystemExit):
            raise
        except Exception:
            traceback.print_exc()
            click.echo("condu-fuse: this is a bug (the traceback above says where); please report it with "
                       "the command you ran", err=True)
            sys.exit(EXIT_BUG)

    return wrapper


def _store_option(command):
    return click.option("--store", "store", default=DEFAULT_STORE, show_default=True,
                        type=click.Path(file_okay=False), help="The store folder.")(command)


def _quiet_option(command):
    return click.option("--quiet/--no-quiet", "-q", default=False, help="No progress bars or notes.")(command)


def _checked_device(ctx, param, value: str) -> str:
    """--device checked where it is parsed, so its errors speak of the flag (the library's of `device=`)."""
    if value != "auto":  # auto never fails, and resolving it here would import torch for nothing
        from .device import resolve_device

        try:
            resolve_device(value, option="--device")
        except ValueError as err:
            _fail(str(err))
    return value


def _device_option(command):
    return click.option("--device", default="auto", show_default=True, callback=_checked_device,
                        help="Where the pass runs: auto (CUDA when there is one), cpu, cuda or cuda:N.")(command)


def _pass_report(store) -> str:
    """Where the last pass ran, and the device memory it held, when that was a GPU."""
    report = store.last_pass
    peak = report.get("peak_device_bytes")
    return f" on {report['device']}, peak device memory {_size(peak)}" if peak is not None else ""


def _warn_degraded(tasks: list[dict], generation: int) -> None:
    """One stderr line per task rebuilt farther from its fine-tune than the base is (TaskRecord.degraded)."""
    for t in tasks:
        if t["degraded"]:
            fidelity = t["fidelity"]
            at = f", measured at generation {fidelity['generation']}" if fidelity["generation"] != generation else ""
            click.echo(f"condu-fuse: warning: task {t['number']} ({t['name']}) is rebuilt farther from its fine-tune "
                       f"than the base is (rel_l2 {fidelity['rel_l2']:.3f}{at}); it is better served by its own "
                       "checkpoint or a store of its own kind", err=True)


def _inferred_base_notes(store) -> list[str]:
    """Which record the base came from, and, for adapters fused dense, how much factor space would save."""
    inferred, manifest = store.inferred_base, store.manifest()
    hub = manifest.base.hub
    commit = f" at commit {hub.commit[:12]}" if hub is not None and hub.commit else ""
    notes = [f"base: {inferred.base}{commit} ({inferred.said_by})"]
    estimate, dense = inferred.factor_store_bytes, store.info()["sizes"]["total"]
    if estimate and manifest.space == "dense" and estimate < dense:
        notes.append(f"note: every checkpoint is a LoRA adapter of one configuration; if they share an initial "
                     f"adapter, fused in factor space they take about {_size(estimate)} instead of this dense "
                     f"store's {_size(dense)} ({dense / estimate:.1f}x smaller): unify again with --base <their "
                     "initial adapter folder>")
    return notes


def _allow_degrade_option(command):
    return click.option("--allow-degrade/--no-allow-degrade", default=False,
                        help="Make the change even if it would damage a stored task or store an absurd delta; "
                             "the store's history records it.")(command)


def _warn_allowed(store) -> None:
    """One stderr line per damage the change just made was let through with (--allow-degrade)."""
    manifest = store.manifest()
    if manifest.history and manifest.history[-1].generation == manifest.generation:
        for message in manifest.history[-1].allowed:
            click.echo(f"condu-fuse: warning: allowed: {message}", err=True)


def _task_option(command):
    return click.option("--task", required=True, help="Task number or name (see `condu-fuse info`).")(command)


def parse_size(text: str) -> int:
    """Bytes from `5GB`, `500MiB`, `2G` or a plain number (decimal units are powers of 1000)."""
    match = _SIZE.match(text)
    if not match:
        raise click.BadParameter(f"{text!r} is not a size; use e.g. 5GB, 500MiB or 1000000")
    number, unit = float(match[1]), (match[2] or "B").upper()
    power = "BKMGT".index(unit[0])
    return int(number * (1024 if "I" in unit else 1000) ** power)


def _open(store: str, **options):
    from .store import Store

    return Store.open(store, **options)


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


def _hub_text(hub: dict | None) -> str:
    """`org/name@revision (commit 0123456789ab)`: a hub record as `info` shows it."""
    text = hub["id"] + (f"@{hub['revision']}" if hub["revision"] else "")
    return text + (f" (commit {hub['commit'][:12]})" if hub["commit"] else "")


def _number(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


SPACE_TEXT = {
    "dense": "dense: the base is a model; a task is a full checkpoint or a LoRA adapter as scaling * B @ A",
    "factors": "factor space: the base is a LoRA adapter; every task is an adapter of its configuration",
}


def _own_dtype_text(dtype, base_dtypes: list[str]) -> list[str]:
    """A task whose own dtype is not the base's says what decouple writes it in (one per tensor: all of them)."""
    own = sorted(set(dtype.values())) if isinstance(dtype, dict) else [dtype] if dtype else []
    return [f"own dtype {'/'.join(own)}"] if own and own != base_dtypes else []


def _blocks_text(info: dict) -> str:
    """How a block-quantized unified delta is kept, for info's header."""
    block = info.get("quant_block")
    return f" (blocks of {block} elements, each with a float32 scale)" if block else ""


def format_info(info: dict) -> str:
    """The readable table `condu-fuse info` prints."""
    base = info["base"]
    lines = [f"store       {info['store']}  (generation {info['generation']}, format v{info['version']})",
             f"space       {SPACE_TEXT[info['space']]}",
             f"base        {base['path']}" + (f"  (hub {_hub_text(base['hub'])})" if base.get("hub") else ""),
             f"rescaler    {info['rescaler']}    fused: {info['tensors']} tensors, {info['fused_parameters']:,} "
             f"parameters, unified delta in {', '.join(info['unified_dtypes'])}{_blocks_text(info)}",
             "",
             f"{'#':>3}  {'name':<24} {'kind':<7} {'rescaler':<26} {'density':>8} {'cosine':>8} {'rel_l2':>8} "
             f"{'at gen':>6}  kept with it"]
    for t in info["tasks"]:
        kept = [*_own_dtype_text(t.get("dtype"), base.get("dtypes", [])),
                *(f"private {n}" for n in t["private"]), *(f"attachment {n}" for n in t["attachments"]),
                *(f"{len(t['zero_filled'])} zero-filled",) * bool(t["zero_filled"]),
                *(f"degraded by choice at gen {g}" for g in t.get("degraded_by_choice", [])),
                *([f"hub {_hub_text(t['hub'])}"] if t["hub"] else [])]
        lines.append(f"{t['number']:>3}  {t['name']:<24} {t['kind']:<7} {_rescaler_text(t['rescaler']):<26} "
                     f"{t['mask_density']:>8.3f} {_number(t['fidelity']['cosine']):>8} "
                     f"{_number(t['fidelity']['rel_l2']):>8} {t['fidelity']['generation']:>6}  {', '.join(kept) or '-'}")
    sizes, separate = info["sizes"], "adapters" if info["space"] == "factors" else "checkpoints"
    lines += ["",
              f"size        {_size(sizes['total'])}: unified {_size(sizes['unified'])}, triggers {_size(sizes['triggers'])}, "
              f"private {_size(sizes['private'])}, files {_size(sizes['files'])}, attachments {_size(sizes['attachments'])}",
              f"vs {len(info['tasks'])} separate {separate}: {_size(info['separate_checkpoints_bytes'])}"
              + (f"  ({info['savings']:.2f}x smaller)" if info["savings"] else "")]
    return "\n".join(lines)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="condu", message="condu-fuse %(version)s")
def main():
    """ConDU model fusion: one unified delta plus a bit mask and a rescaler per task."""


@main.command()
@click.option("--base", default=None,
              help="The pre-trained checkpoint: a .safetensors file, a model folder, a PEFT adapter folder (the "
                   "adapters' shared initialisation: fuse in factor space) or a hub id. Default: the base the "
                   "checkpoints record.")
@_store_option
@click.option("--rescaler", type=click.Choice(RESCALER_MODES), default="model", show_default=True)
@click.option("--dtype", "--unified-dtype", "dtype", type=click.Choice(UNIFIED_DTYPES), default=None,
              help="How the unified delta is stored (default: the base's dtype); int8 and int4 are the compact "
                   "mode: blocks of 64 elements, each with a float32 scale (8.5 or 4.5 bits an element).")
@click.option("--missing", type=click.Choice(MISSING_MODES), default="error", show_default=True,
              help="A base tensor a checkpoint lacks: an error, or an unchanged tensor.")
@click.option("--name", "names", multiple=True, help="Task names, one per checkpoint (default: their names).")
@click.option("--kernel", type=click.Choice(KERNELS), default=None, help="Fusion kernel (default: fastest).")
@click.option("--chunk", type=click.IntRange(min=8), default=None,
              help="Elements per chunk and task (default: 4Mi shared by the tasks).")
@_device_option
@_allow_degrade_option
@_quiet_option
@click.argument("checkpoints", nargs=-1, required=True)
@_one_line_errors
def unify(base, store, rescaler, dtype, missing, names, kernel, chunk, device, allow_degrade, quiet, checkpoints):
    """Create a store from BASE and one or more checkpoints (one-shot unify).

    CHECKPOINTS are .safetensors files, model folders, PEFT adapter folders or hub ids
    (org/name[@revision])."""
    from .store import Store

    result = Store.unify(store, base, checkpoints, names=list(names) or None, rescaler=rescaler, dtype=dtype,
                         missing=missing, kernel=kernel, chunk=chunk, progress=not quiet, device=device,
                         allow_degrade=allow_degrade)
    if base is None and not quiet:
        for note in _inferred_base_notes(result):
            click.echo(f"condu-fuse: {note}", err=True)
    tasks = ", ".join(f"{t.number} ({t.name})" for t in result.tasks)
    click.echo(f"unified {len(result.tasks)} task(s) into {store} ({result.manifest().space}): {tasks}"
               f"{_pass_report(result)}")
    _warn_allowed(result)
    _warn_degraded([t.as_dict() for t in result.tasks], result.generation)


@main.command()
@_store_option
@click.option("--name", default=None, help="Task name (default: the checkpoint's name).")
@click.option("--missing", type=click.Choice(MISSING_MODES), default=None,
              help="A base tensor the checkpoint lacks (default: the store's setting).")
@_device_option
@_allow_degrade_option
@_quiet_option
@click.argument("checkpoint")
@_one_line_errors
def add(store, name, missing, device, allow_degrade, quiet, checkpoint):
    """Add CHECKPOINT (a path, a PEFT adapter folder or a hub id) as a new task: the ConDU continual step."""
    opened = _open(store, device=device)
    record = opened.add(checkpoint, name=name, missing=missing, progress=not quiet, allow_degrade=allow_degrade)
    zero = f"; {len(record.zero_filled)} tensor(s) it lacks counted as unchanged" if record.zero_filled else ""
    click.echo(f"added task {record.number} ({record.name}) to {store}{zero}{_pass_report(opened)}")
    _warn_allowed(opened)
    _warn_degraded([t.as_dict() for t in opened.tasks], opened.generation)


@main.command()
@_task_option
@_store_option
@click.option("-o", "--out", default=None, help="OUT.safetensors, or a model folder (default: ./<task name>/).")
@click.option("--dtype", type=click.Choice(DTYPES), default=None,
              help="Output dtype (default: the task's own, as it was added; the base's where the store did not "
                   "record it).")
@click.option("--force/--no-force", default=False, help="Replace an existing output (never the store, base or sources).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 2GB or 500MiB.")
@_quiet_option
@_one_line_errors
def decouple(task, store, out, dtype, force, max_shard_size, quiet):
    """Rebuild one task's full model."""
    path = _open(store).decouple(task, out, dtype=dtype, force=force, progress=not quiet,
                                 max_shard_size=parse_size(max_shard_size))
    click.echo(f"wrote {path}")


@main.command()
@_task_option
@_store_option
@_device_option
@_allow_degrade_option
@_quiet_option
@_one_line_errors
def remove(task, store, device, allow_degrade, quiet):
    """Drop a task and re-unify the others; they keep their numbers."""
    opened = _open(store, device=device)
    gone = opened.remove(task, progress=not quiet, allow_degrade=allow_degrade)
    click.echo(f"removed task {gone.number} ({gone.name}) from {store}{_pass_report(opened)}")
    _warn_allowed(opened)


@main.command()
@_store_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_one_line_errors
def info(store, as_json):
    """Tasks, rescalers, mask density, fidelity, sizes and savings."""
    report = _open(store).info()
    if as_json:  # each task's "degraded" says it
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(format_info(report))
        _warn_degraded(report["tasks"], report["generation"])


@main.command()
@_store_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_one_line_errors
def verify(store, as_json):
    """Read every file and the base, check every block; say what is whole, per task."""
    health = _open(store).verify()
    if as_json:
        click.echo(json.dumps({"ok": health.ok, "shared": health.shared,
                               "tasks": [{"number": t.number, "name": t.name, "problems": p} for t, p in health.tasks],
                               "store": health.store}, indent=2))
    else:
        for problem in health.shared:
            click.echo(f"every task: {problem}")
        for task, problems in health.tasks:
            state = "whole" if health.whole(task) else "DAMAGED" if problems else "lost with the shared damage"
            click.echo(f"task {task.number} ({task.name}): {state}" + "".join(f"\n    {p}" for p in problems))
        for problem in health.store:  # the store's own: its backup manifest
            click.echo(f"store: {problem}")
    if not health.ok:
        _fail(f"{len(health.problems)} problem(s) in {store}")
    if not as_json:
        click.echo(f"{store}: ok")


@main.command("set-base")
@click.argument("path")
@_store_option
@_one_line_errors
def set_base(path, store):
    """Point the store at its base in a new place (a path or a hub id); accepted only if the content is the same."""
    _open(store).set_base(path)
    click.echo(f"{store}: base is now {path}")


@main.command()
@_store_option
@_one_line_errors
def repair(store):
    """Restore condu.json from condu.backup.json, or the backup from a whole condu.json."""
    from .store import Store

    click.echo(Store.repair(store))


@main.command()
@_store_option
@_one_line_errors
def migrate(store):
    """Rewrite a version 1 store as version 2 (checked first, in place)."""
    from .store.migrate import migrate as run

    click.echo(run(store))


if __name__ == "__main__":
    main()
