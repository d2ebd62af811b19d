"""How `condu-fuse` ends: a refusal is one line and status 1, Ctrl-C one line and 130 with the store
whole, a bug its traceback and status 2; and invariants that guard written bytes are real checks."""

import ast
import signal
import time
from pathlib import Path

import pytest

from fusion import Store
from fusion.store import faults
from fusion.store.front import Store as FrontStore

from .store.helpers import OPTS, REPO, child_stopped_at, models, run
from .store.ondisk import disk_state

BEFORE_SWAP = ["pass-chunk", "files-written", "backup-written"]


@pytest.fixture
def store(tmp_path):
    base_path, paths, _, _ = models(tmp_path, 3)
    return Store.unify(tmp_path / "s", base_path, paths[:2], **OPTS)


def _interrupt():
    raise KeyboardInterrupt


def _only_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("condu-fuse: error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("point", BEFORE_SWAP)
def test_ctrl_c_before_the_swap_is_one_line_and_the_store_is_unchanged(store, tmp_path, point):
    before = disk_state(store.path)
    with faults.inject(point, _interrupt):
        result = run(["add", tmp_path / "task3.safetensors", "--store", store.path, "-q"], tmp_path)
    assert result.exit_code == 130
    assert _only_line(result).endswith("interrupted; the store is unchanged")
    assert disk_state(store.path) == before


def test_ctrl_c_after_the_swap_says_the_change_was_committed(store, tmp_path):
    with faults.inject("manifest-swapped", _interrupt):
        result = run(["add", tmp_path / "task3.safetensors", "--store", store.path, "-q"], tmp_path)
    assert result.exit_code == 130
    assert _only_line(result).endswith("interrupted after the change was committed; generation 1 is the store's")
    assert store.generation == 1 and len(store.tasks) == 3 and store.verify().ok


def test_ctrl_c_in_a_read_is_one_line(store, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(FrontStore, "info", interrupted)
    result = run(["info", "--store", store.path], tmp_path)
    assert result.exit_code == 130 and _only_line(result).endswith("interrupted; the store is unchanged")


def test_an_unexpected_exception_is_a_bug_with_its_traceback(store, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        return 1 / 0

    monkeypatch.setattr(FrontStore, "info", broken)
    result = run(["info", "--store", store.path], tmp_path)
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "ZeroDivisionError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("condu-fuse: this is a bug")


def test_a_refusal_is_still_one_line_and_status_1(store, tmp_path):
    result = run(["decouple", "--task", "9", "--store", store.path, "-o", tmp_path / "x.safetensors"], tmp_path)
    assert result.exit_code == 1 and "task" in _only_line(result)


@pytest.mark.parametrize("point", [*BEFORE_SWAP, "manifest-swapped"])
def test_a_real_sigint_at_every_point_prints_one_line_and_exits_130(store, tmp_path, point):
    """A real SIGINT, as a terminal sends it, while the command waits at a point of the change."""
    before = disk_state(store.path)
    marker = tmp_path / "reached"
    argv = ["add", str(tmp_path / "task3.safetensors"), "--store", str(store.path), "--name", "victim", "-q"]
    proc = child_stopped_at(point, marker, f"from fusion.cli import main; main({argv!r})")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    Path(str(marker) + ".release").touch()  # a chunk in flight on the pass's writer thread finishes
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    if point == "manifest-swapped":
        assert "committed" in stderr and store.task("victim").number == 3
    else:
        assert stderr.strip().endswith("interrupted; the store is unchanged")
        assert disk_state(store.path) == before
    assert store.verify().ok


@pytest.mark.parametrize("module", ["fusion/io/writer.py", "fusion/io/reader.py", "fusion/store/transaction.py"])
def test_no_assert_guards_written_bytes(module):
    """`python -O` strips asserts: the checks that guard what is written must be real ones."""
    tree = ast.parse((Path(REPO) / module).read_text())
    asserts = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Assert)]
    assert asserts == [], f"{module}: assert at lines {asserts}; raise InvariantError (or InputError) instead"
