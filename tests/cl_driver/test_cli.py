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
    unknown = CliRunner().invoke(main, ["prepare", "mtil", "--root", str(tmp_path), "--out", str(tmp_path),
                                        "--tasks", "imagenet"])
    assert unknown.exit_code == 1 and "no task 'imagenet'" in unknown.output
