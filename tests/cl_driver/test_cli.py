import os
import subprocess
import sys

import yaml
from click.testing import CliRunner

from cl_driver.cli import main

from tests.cl_driver.helpers import tiny_config_dict


def test_run_then_report(tiny_model, tiny_data, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tiny_data, tiny_model)))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(config), "--methods", "zero_shot", "--out", str(out), "--no-progress",
                                   "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "| zero-shot |" in result.output and (out / "results.md").exists()
    assert f"config: {config}" in result.output and "Accuracy in %" in result.output
    (out / "heatmap-zero_shot.png").unlink()
    report = CliRunner().invoke(main, ["report", str(out)])
    assert report.exit_code == 0 and "| zero-shot |" in report.output
    assert (out / "heatmap-zero_shot.png").exists()


def test_errors_are_one_line_and_a_non_zero_exit(tiny_model, tiny_data, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tiny_data, tiny_model)))
    result = CliRunner().invoke(main, ["run", str(config), "--methods", "nope", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "error: " in result.output and "unknown ['nope']" in result.output
    missing = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert missing.exit_code == 1 and "no results.json" in missing.output


def test_module_entry_point_shows_the_commands():
    done = subprocess.run([sys.executable, "-m", "cl_driver.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for command in ("run", "report", "prepare", "demo"):
        assert command in done.stdout


def test_prepare_without_torchvision_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # importing it raises ImportError
    result = CliRunner().invoke(main, ["prepare", "mtil", "--root", str(tmp_path), "--out", str(tmp_path / "o"),
                                       "--tasks", "mnist"])
    assert result.exit_code == 1 and "needs `torchvision`" in result.output
    assert "install the `prepare` extra: pip install -e '.[prepare]'" in result.output
    unknown = CliRunner().invoke(main, ["prepare", "mtil", "--root", str(tmp_path), "--out", str(tmp_path),
                                        "--tasks", "imagenet"])
    assert unknown.exit_code == 1 and "no task 'imagenet'" in unknown.output


def test_a_log_gets_plain_lines_and_a_resumed_run_says_what_it_reused(tiny_model, tiny_data, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tiny_data, tiny_model, methods=["zero_shot", "individual"])))
    command = ["run", str(config), "--out", str(tmp_path / "out"), "--threads", "1"]
    first = CliRunner().invoke(main, command + ["--stop-after", "1"])  # stderr here is no terminal: a log
    assert first.exit_code == 0, first.output
    assert "task 1/3 colors: done in" in first.stderr and "stopped after 1 tasks" in first.output
    second = CliRunner().invoke(main, command)
    assert second.exit_code == 0, second.output
    assert "reused the finished work of 1 task(s) (colors)" in second.stderr and "continuing at task 2 of 3" in second.stderr
    assert "task 1/3" not in second.stderr and "task 3/3 light: done in" in second.stderr
    for output in (first.output, second.output):
        assert "\r" not in output and "\x1b[" not in output  # no bar redraws, no cursor escapes
    again = CliRunner().invoke(main, command)
    assert "reused the finished work of 3 task(s)" in again.stderr and "nothing left to train" in again.stderr


def test_a_hub_id_runs_from_the_cache_and_is_recorded(tiny_model, tiny_data, tmp_path, monkeypatch):
    import json

    from tests.hub_cache import add_to_cache

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    add_to_cache(tmp_path / "hf" / "hub", "org/tiny-clip", "c" * 40, tiny_model, refs=("main",))
    raw = tiny_config_dict(tiny_data, "org/tiny-clip@main", methods=["zero_shot"])
    (tmp_path / "hub.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(main, ["run", str(tmp_path / "hub.yaml"), "--out", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 0, result.output
    model = json.loads((tmp_path / "out" / "results.json").read_text())["model"]
    assert (model["hub_id"], model["revision"], model["commit"]) == ("org/tiny-clip", "main", "c" * 40)


def test_an_uncached_model_id_offline_is_one_line(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "hub.yaml").write_text(yaml.safe_dump(tiny_config_dict(tiny_data, "org/absent", methods=["zero_shot"])))
    result = CliRunner().invoke(main, ["run", str(tmp_path / "hub.yaml"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith("error: org/absent: ")
    assert "not in the hub cache" in result.output and "unset HF_HUB_OFFLINE" in result.output
    assert not (tmp_path / "out").exists()  # bad input changes nothing on disk


def test_mtil_without_network_is_one_line(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    env.pop("HF_HUB_OFFLINE", None)
    done = subprocess.run([sys.executable, "-m", "cl_driver.cli", "run", "mtil", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: openai/clip-vit-base-patch16: ") and done.stderr.count("\n") == 1
    assert "no connection to the hub" in done.stderr


def _commands(group, path=()):
    """Every command's words, the group's own first: (), ("run",), ("prepare", "mtil"), ..."""
    import click

    yield path
    for name, command in getattr(group, "commands", {}).items():
        yield from _commands(command, path + (name,)) if isinstance(command, click.Group) else [path + (name,)]


def test_dash_h_is_help_everywhere():
    words = list(_commands(main))
    assert {("run",), ("report",), ("prepare", "split"), ("prepare", "mtil")} <= set(words)
    for command in words:
        short, long = (CliRunner().invoke(main, [*command, flag]) for flag in ("-h", "--help"))
        assert short.exit_code == 0 and short.output == long.output, (command, short.output)
        assert "-h, --help" in short.output


def test_prepare_split_prints_its_counts_and_refuses_an_existing_out(tmp_path):
    from PIL import Image

    for name in ("cat", "dog"):
        (tmp_path / "mine" / name).mkdir(parents=True)
        for k in range(5):
            Image.new("RGB", (4, 4), (k, 0, 0)).save(tmp_path / "mine" / name / f"{k}.png")
    command = ["prepare", "split", str(tmp_path / "mine"), "--out", str(tmp_path / "out"), "--test", "0.4"]
    done = CliRunner().invoke(main, command)
    assert done.exit_code == 0, done.output
    assert done.output == f"{tmp_path / 'out'}: 4 train, 4 test, 2 val images in 2 classes\n"
    again = CliRunner().invoke(main, command)
    assert again.exit_code == 1 and again.output.count("\n") == 1
    assert again.output.startswith(f"error: {tmp_path / 'out'}: exists and is not empty")
