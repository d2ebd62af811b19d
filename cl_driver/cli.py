"""`condu-cl`: continual learning of CLIP with ConDU, from a YAML config.

    condu-cl run CONFIG.yaml [--methods a,b] [--out DIR] [--data-root DIR] [--aggregate mean|weighted|gated] [--top-k K]
    condu-cl report DIR
    condu-cl predict DIR IMAGES... [--task NAME | --labels a,b,c] [--aggregate A] [--top-k K] [--top N] [--json]
    condu-cl prepare mtil --root DOWNLOADS --out DATA [--download]
    condu-cl prepare datasets SOURCE --out DATA/TASK [--image-column image] [--label-column label]
    condu-cl prepare split FOLDER --out OUT [--test 0.2] [--val 0.1] [--seed 0]
    condu-cl demo

`-h` and `--help` work on every command.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

from fusion import RESCALER_MODES

from .config import AGGREGATES, load_config
from .processes import is_main_process, relaunch_command


def _fail(err: Exception) -> None:
    if is_main_process():  # every process of a launched run meets the same error; one says it
        click.echo(f"error: {err}", err=True)
    sys.exit(1)


def _say(message: str) -> None:
    click.echo(message, err=True)


def _progress_setup(progress: bool) -> bool:
    """Bars only on a terminal: no redraw escapes in a log (the loop then writes a line a task)."""
    from .console import bars_on_terminal, quiet_library_bars

    if not (progress and bars_on_terminal()):
        quiet_library_bars()
    return progress


def _relaunch_if_single_cpu_process() -> None:
    """`accelerate launch --cpu --num_processes N` starts one process: start the N it asked for."""
    command = relaunch_command()
    if command:
        _say("accelerate launch --cpu starts one process only; starting the processes it asked for with "
             "torch.distributed.run")
        sys.exit(subprocess.call(command))


def _set_threads(threads: int | None) -> None:
    """Small models on a busy CPU run much faster on fewer threads."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def _missing_package(err: ImportError, package: str, hint: str) -> None:
    _fail(ValueError(f"this command needs `{package}` ({err}); {hint}"))


def _names(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


HELP = {"help_option_names": ["-h", "--help"]}  # subcommands inherit it
PREPARE_EXTRA = "install the `prepare` extra: pip install -e '.[prepare]' (torchvision built for your torch)"


@click.group(context_settings=HELP)
def main() -> None:
    """Continual learning of Hugging Face CLIP with ConDU model fusion."""


@main.command()
@click.argument("config")
@click.option("--methods", help="comma-separated method names from the config (default: all)")
@click.option("--out", type=click.Path(file_okay=False), help="run folder (default: runs/<config name>)")
@click.option("--data-root", type=click.Path(file_okay=False), help="folder that relative task paths start from")
@click.option("--stop-after", type=int, help="stop after this many tasks (resume later with the same command)")
@click.option("--progress/--no-progress", default=True, help="progress bars on stderr")
@click.option("--threads", type=int, help="torch CPU threads (default: torch's choice)")
@click.option("--aggregate", type=click.Choice(AGGREGATES),
              help="routed logits: plain mean (the official rule), weighted by prototype similarity, or "
                   "gated (experts join only above a similarity calibrated on learned tasks' held-out images)")
@click.option("--top-k", type=click.IntRange(min=1), help="experts routed to besides theta0")
def run(config, methods, out, data_root, stop_after, progress, threads, aggregate, top_k):
    """Run (or resume) the continual loop of CONFIG (a YAML file, or a shipped name such as mtil)."""
    from .loop import run as run_loop
    from .metrics import summary_table

    _relaunch_if_single_cpu_process()
    _set_threads(threads)
    try:
        cfg = load_config(config, data_root=data_root).select_methods(_names(methods))
        cfg = cfg.with_evaluation(aggregate=aggregate, top_k=top_k)
        out = out or str(Path("runs") / Path(config).stem)
        results = run_loop(cfg, out, progress=_progress_setup(progress), stop_after=stop_after, log=_say)
    except ValueError as err:
        _fail(err)
    if not is_main_process():
        return
    if results is None:
        click.echo(f"stopped after {stop_after} tasks; run the same command to resume ({out})")
        return
    click.echo(summary_table(results), nl=False)
    click.echo(f"results: {Path(out) / 'results.md'}")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def report(run_dir):
    """Rebuild results.md and the heat maps of RUN_DIR from its results.json; print the table."""
    from .results import report as make_report

    try:
        click.echo(make_report(run_dir), nl=False)
    except ValueError as err:
        _fail(err)


@main.command()
@click.argument("run_dir")
@click.argument("images", nargs=-1, required=True)
@click.option("--task", help="a learned task: its own expert scores its own classes")
@click.option("--labels", help="comma-separated class names of your own (zero-shot), routed over the learned experts")
@click.option("--aggregate", type=click.Choice(AGGREGATES), help="routed logits (default: the run's)")
@click.option("--top-k", type=click.IntRange(min=1), help="experts routed to besides theta0 (default: the run's)")
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True, help="classes shown per image")
@click.option("--rescaler", type=click.Choice(RESCALER_MODES),
              help="which of the run's ConDU stores (default: its first ConDU method's)")
@click.option("--json", "as_json", is_flag=True, help="print a JSON list: per image, its top classes and scores")
@click.option("--device", default="cpu", show_default=True, help="torch device: cpu, cuda, cuda:1, ...")
def predict(run_dir, images, task, labels, aggregate, top_k, top, rescaler, as_json, device):
    """Classify IMAGES with the continual model in RUN_DIR. With --task, that learned task's expert and
    classes; with --labels, those labels; with neither, every learned task's classes (each shown with
    its task). Routed predictions use theta0 plus the top-K experts by prototype similarity, as the
    run's evaluation does."""
    import json

    from .console import quiet_library_bars
    from .predict import ConduCLIP, format_predictions

    quiet_library_bars()
    try:
        if task and labels:
            raise ValueError("give --task (a learned task's classes) or --labels (your own), not both")
        model = ConduCLIP.from_run(run_dir, device=device, rescaler=rescaler)
        results = model.predict(list(images), _names(labels), task=task, top_k=top_k, aggregate=aggregate, top=top)
    except ValueError as err:
        _fail(err)
    except OSError as err:
        _fail(ValueError(f"{err.filename or run_dir}: {err.strerror or err}"))
    if as_json:
        click.echo(json.dumps([{"image": name, "predictions": result} for name, result in zip(images, results)],
                              indent=2))
    else:
        click.echo(format_predictions(images, results), nl=False)


@main.command()
@click.option("--out", type=click.Path(file_okay=False), default="runs/demo", show_default=True)
@click.option("--progress/--no-progress", default=True)
@click.option("--threads", type=int, help="torch CPU threads (default: torch's choice)")
def demo(out, progress, threads):
    """Run the quick mini benchmark with the shipped small CLIP and print the table."""
    from .config import packaged_config
    from .loop import run as run_loop
    from .metrics import summary_table

    _set_threads(threads)
    try:
        results = run_loop(load_config(packaged_config("mini_mtil_quick.yaml")), out,
                           progress=_progress_setup(progress), log=_say)
    except ValueError as err:
        _fail(err)
    click.echo(summary_table(results), nl=False)
    click.echo(f"results, matrices and heat maps: {out}")


@main.group()
def prepare():
    """Write datasets as the image folders that `folder` sources read."""


@prepare.command("mtil")
@click.option("--root", type=click.Path(file_okay=False), required=True, help="torchvision download folder")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="where the task folders go")
@click.option("--config", "config_name", default="mtil", show_default=True, help="config with the class names")
@click.option("--tasks", help="comma-separated task names (default: all of the config)")
@click.option("--download/--no-download", default=False, help="let torchvision download what is missing")
@click.option("--test-fraction", type=float, default=0.2, show_default=True,
              help="test share for datasets with a single split (Caltech101, EuroSAT, SUN397)")
@click.option("--seed", type=int, default=0, show_default=True)
def prepare_mtil(root, out, config_name, tasks, download, test_fraction, seed):
    """MTIL's datasets from torchvision into OUT/<task>/{train,test}/ (needs torchvision)."""
    from .prepare import prepare_torchvision

    try:
        cfg = load_config(config_name)
        chosen = _names(tasks) or [t.name for t in cfg.tasks]
        specs = {t.name: t for t in cfg.tasks}
        for name in chosen:
            if name not in specs:
                raise ValueError(f"{cfg.path}: no task {name!r}; choose from {', '.join(specs)}")
            counts = prepare_torchvision(name, specs[name].class_names, root, out, download=download,
                                         test_fraction=test_fraction, seed=seed)
            click.echo(f"{name}: {sum(counts['train'])} train, {sum(counts['test'])} test images")
    except ImportError as err:
        _missing_package(err, "torchvision", PREPARE_EXTRA)
    except ValueError as err:
        _fail(err)


@prepare.command("datasets")
@click.argument("source")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="the task's folder")
@click.option("--class-names", type=click.Path(exists=True, dir_okay=False),
              help="a text file with one class name a line (default: the label feature's names)")
@click.option("--image-column", default="image", show_default=True)
@click.option("--label-column", default="label", show_default=True)
@click.option("--train-split", default="train", show_default=True)
@click.option("--test-split", default="test", show_default=True)
def prepare_hf(source, out, class_names, image_column, label_column, train_split, test_split):
    """A Hugging Face dataset (a save_to_disk folder or a hub name) into OUT/{train,test}/."""
    from .prepare import dataset_class_names, load_datasets_source, prepare_datasets

    try:
        data = load_datasets_source(source)
        names = (Path(class_names).read_text().splitlines() if class_names
                 else dataset_class_names(data, label_column))
        counts = prepare_datasets(data, [n for n in names if n.strip()], out, image_column=image_column,
                                  label_column=label_column, splits={"train": train_split, "test": test_split})
        click.echo(f"{out}: {sum(counts['train'])} train, {sum(counts['test'])} test images")
    except ImportError as err:
        _missing_package(err, "datasets", "pip install datasets")
    except ValueError as err:
        _fail(err)


@prepare.command("split")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), required=True, help="a new folder for train/, test/, val/")
@click.option("--test", type=float, default=0.2, show_default=True, help="share of each class held out for testing")
@click.option("--val", type=float, default=0.1, show_default=True,
              help="share held out for validation (0: no val/)")
@click.option("--seed", type=int, default=0, show_default=True, help="the shuffle's seed")
def prepare_split(folder, out, test, val, seed):
    """FOLDER/<class>/* into OUT/{train,test,val}/<class>/: per class, seeded, as hard links where
    possible (else copies); the same cut as a folder source's `split`. Refuses an existing OUT."""
    from .prepare import write_split

    try:
        counts = write_split(folder, out, test=test, val=val, seed=seed)
    except ValueError as err:
        _fail(err)
    except OSError as err:
        _fail(ValueError(f"{err.filename or out}: {err.strerror or err}; nothing was written to {out}"))
    parts = ", ".join(f"{sum(n)} {split}" for split, n in counts.items())
    click.echo(f"{out}: {parts} images in {len(counts['train'])} classes")


if __name__ == "__main__":
    main()
