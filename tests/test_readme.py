"""The README's examples run as printed.

Every fenced `bash`/`sh`/`shell` or `python` block of README.md runs here, in order, in one fresh
folder that tests/readme_fixtures.py fills with tiny stand-ins of every model and hub id the
examples name, or is preceded by `<!-- not run by tests: REASON -->`. Shell blocks run under
`bash -euo pipefail` with the venv's bin first on PATH (as after `source .venv/bin/activate`),
traced, so each command is seen to run; Python blocks run with the venv's python. Indented blocks
and output blocks (no info string, or `text`) are not commands.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
VENV_BIN = REPO / ".venv" / "bin" if (REPO / ".venv" / "bin" / "python").exists() else Path(sys.executable).parent

SHELL = {"bash", "sh", "shell"}
PYTHON = {"python", "py", "python3"}
# Commands in a form this file cannot run (prompts mixed with output, other shells): each needs a reason.
SHOWN_ONLY = {"console", "shell-session", "sh-session", "pycon", "ipython", "zsh", "fish", "powershell", "ps1",
              "bat", "cmd"}
OUTPUT = {"", "text"}
# The walk-through, LoRA adapters, hub ids, the store's Python API and the in-memory one.
MIN_RUN = 5
# The README's `condu-fuse info` examples: the section each sits in -> the store whose info it shows.
INFO_EXAMPLES = {"Fuse checkpoints of any model: `condu-fuse`": "condu-store", "LoRA adapters (PEFT)": "lora-store"}
INFO_HEADER = re.compile(r"^\s+#\s+name\s")

FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")  # CommonMark's fences
SKIP = re.compile(r"^<!--\s*not run by tests\b(?P<rest>.*?)-->\s*$")
DONE = "readme block finished"
TRACE_PROLOGUE = 'exec 9>"$README_TRACE"; BASH_XTRACEFD=9; PS4="+ "; set -x\n'
PYTHON_RUNNER = """\
import sys
names = {"__name__": "__main__"}
exec(compile(sys.argv[1], "<readme_fixtures.PYTHON_NAMES>", "exec"), names)
exec(compile("\\n" * int(sys.argv[3]) + sys.argv[2], "README.md", "exec"), names)
print(sys.argv[4])
"""


@dataclass(frozen=True)
class Block:
    line: int  # the opening fence's line, 1-based
    heading: str
    lang: str
    source: str
    skip: str | None  # the skip comment's reason ("" when it gives none); None without a comment

    @property
    def is_command(self) -> bool:
        return self.lang in SHELL | PYTHON | SHOWN_ONLY

    @property
    def runs(self) -> bool:
        return self.lang in SHELL | PYTHON and self.skip is None

    @property
    def id(self) -> str:
        return f"{re.sub(r'[^a-z0-9]+', '-', self.heading.lower()).strip('-')}-L{self.line}"


def _skip_reason(comment: str) -> str | None:
    match = SKIP.match(comment.strip())
    if match is None:
        return None
    rest = match["rest"].strip()
    return rest[1:].strip() if rest.startswith(":") else ""


def parse(text: str) -> tuple[list[Block], list[int]]:
    """The fenced blocks of a markdown text, and the lines of skip comments that precede no block."""
    lines = text.splitlines()
    blocks, stray, heading, i = [], [], "", 0
    pending: tuple[int, str] | None = None  # (line, reason) of a skip comment not yet followed by a block
    while i < len(lines):
        line, fence = lines[i], FENCE.match(lines[i])
        if fence is None:
            if line.startswith("#"):
                heading = line.lstrip("#").strip()
            if line.strip():
                if pending is not None:
                    stray.append(pending[0])
                reason = _skip_reason(line)
                pending = None if reason is None else (i + 1, reason)
            i += 1
            continue
        end, indent = i + 1, len(fence["indent"])
        while end < len(lines) and not lines[end].strip().startswith(fence["fence"]):
            end += 1
        # a fence indented n spaces strips up to n from each line of its content
        source = "\n".join(line[indent:] if line.startswith(fence["indent"]) else line.lstrip()
                           for line in lines[i + 1:end])
        reason = None if pending is None else pending[1]
        blocks.append(Block(i + 1, heading, fence["info"].lower(), source + "\n", reason))
        pending, i = None, end + 1
    return blocks, stray + ([pending[0]] if pending else [])


def problems(text: str) -> list[str]:
    """Why a block neither runs nor says why not, and skip comments that skip nothing."""
    blocks, stray = parse(text)
    out = [f"line {n}: a skip comment that precedes no command block" for n in stray]
    for b in blocks:
        if b.skip is not None and not b.is_command:
            out.append(f"line {b.line}: a skip comment before a block that is not a command (info {b.lang!r})")
        elif b.skip == "":
            out.append(f"line {b.line}: the skip comment gives no reason: <!-- not run by tests: REASON -->")
        elif b.lang in SHOWN_ONLY and b.skip is None:
            out.append(f"line {b.line}: a ```{b.lang}``` block is never run: write it as ```bash``` (commands only) "
                       "or ```python```, or precede it with <!-- not run by tests: REASON -->")
    return out


BLOCKS, _ = parse(README.read_text())
RUNNABLE = [b for b in BLOCKS if b.runs]


def simple_commands(source: str) -> list[list[str]]:
    """A shell block's simple commands as words, without leading variable assignments."""
    out = []
    for line in source.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split, lexer.commenters = True, "#"
        words: list[str] = []
        for token in [*lexer, ";"]:
            if token in {";", "&&", "||", "|", "&"}:
                out += [words] if words else []
                words = []
            elif words or not re.match(r"^[A-Za-z_]\w*=", token):
                words.append(token)
    return out


def _words(line: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError:  # bash quotes some words as $'...', which shlex does not read
        return line.split()


def traced_commands(trace: str) -> list[str]:
    """The command words bash's trace shows at the top level (PS4 "+ "; nested levels repeat "+")."""
    words = [_words(line[2:]) for line in trace.splitlines() if line.startswith("+ ")]
    return [next((w for w in ws if not re.match(r"^[A-Za-z_]\w*=", w)), "") for ws in words]


def missing_commands(source: str, trace: str) -> list[str]:
    """The block's commands, by command word, that the trace does not show running, in order."""
    seen, missing = iter(traced_commands(trace)), []
    for words in simple_commands(source):
        if words[0] not in seen:  # consumes the trace up to the match: order counts
            missing.append(" ".join(words))
    return missing


def named_outputs(block: Block) -> tuple[list[str], list[str]]:
    """What the block says it writes: (stores: `--store`, `./condu-store` by default, Store.unify's
    folder; outputs: `-o`, Store.decouple's)."""
    if block.lang in PYTHON:
        return (re.findall(r'Store\.unify\(\s*"([^"]+)"', block.source),
                re.findall(r'\.decouple\(\s*[^,()]+,\s*"([^"]+)"', block.source))
    stores, outputs = [], []
    for words in simple_commands(block.source):
        if words[0] == "condu-fuse":
            options = dict(zip(words, words[1:]))
            stores.append(options.get("--store", "condu-store"))
            outputs += [options[o] for o in ("-o", "--out") if o in options]
    return stores, outputs


def example_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment of a user who ran `source .venv/bin/activate`, offline, with the fixture's hub cache."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "PYTHONPATH", "PYTHONHOME"}}
    env.update(extra, PATH=os.pathsep.join([str(VENV_BIN), env.get("PATH", "")]), VIRTUAL_ENV=str(VENV_BIN.parent))
    return env


@dataclass(frozen=True)
class Ran:
    block: Block
    returncode: int
    stdout: str
    stderr: str
    trace: str = ""

    @property
    def finished(self) -> bool:
        """It exited 0 having run every command (shell) or reached its end (Python)."""
        if self.returncode != 0:
            return False
        if self.block.lang in SHELL:
            return bool(simple_commands(self.block.source)) and not missing_commands(self.block.source, self.trace)
        return self.stdout.rstrip().endswith(DONE)

    def report(self) -> str:
        return (f"README.md line {self.block.line} ({self.block.lang}), exit {self.returncode}:\n{self.block.source}"
                f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}--- trace\n{self.trace}")


def run_block(block: Block, workspace: Path, scratch: Path, env: dict[str, str]) -> Ran:
    if block.lang in PYTHON:
        from tests.readme_fixtures import PYTHON_NAMES

        done = subprocess.run([str(VENV_BIN / "python"), "-c", PYTHON_RUNNER, PYTHON_NAMES, block.source,
                               str(block.line), DONE], cwd=workspace, env=env, capture_output=True, text=True,
                              timeout=600)
        return Ran(block, done.returncode, done.stdout, done.stderr)
    script, trace = scratch / f"L{block.line}.sh", scratch / f"L{block.line}.trace"
    script.write_text(TRACE_PROLOGUE + block.source)
    done = subprocess.run(["bash", "-euo", "pipefail", str(script)], cwd=workspace,
                          env={**env, "README_TRACE": str(trace)}, capture_output=True, text=True, timeout=600)
    return Ran(block, done.returncode, done.stdout, done.stderr, trace.read_text() if trace.exists() else "")


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """Every runnable block, in order, in one fresh workspace: (workspace, env, {line: Ran})."""
    from tests.readme_fixtures import build_workspace  # torch, transformers and peft: only when run

    workspace, scratch = tmp_path_factory.mktemp("readme"), tmp_path_factory.mktemp("readme-blocks")
    env = example_env(build_workspace(workspace))
    return workspace, env, {b.line: run_block(b, workspace, scratch, env) for b in RUNNABLE}


# -- the README's blocks --------------------------------------------------------------------------------


def test_every_command_block_runs_or_says_why_not():
    assert problems(README.read_text()) == []


def test_the_readme_has_the_runnable_examples_it_should():
    shown = "\n".join(f"line {b.line}: {b.lang}, {b.skip or 'runs'}" for b in BLOCKS if b.is_command)
    assert len(RUNNABLE) >= MIN_RUN, shown
    assert {b.lang for b in RUNNABLE} >= {"bash", "python"}, shown


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_block_runs_as_printed(readme_run, block):
    workspace, _, results = readme_run
    ran = results[block.line]
    assert ran.returncode == 0, ran.report()
    if block.lang in SHELL:
        assert missing_commands(block.source, ran.trace) == [], ran.report()
    assert ran.finished, ran.report()
    stores, outputs = named_outputs(block)
    for name in outputs:
        assert (workspace / name).exists(), f"{name} is missing after the block\n{ran.report()}"
    for name in stores:
        assert (workspace / name / "condu.json").is_file(), f"{name} is not a store\n{ran.report()}"


def test_at_least_the_expected_blocks_ran_to_the_end(readme_run):
    _, _, results = readme_run
    finished = [line for line, ran in results.items() if ran.finished]
    assert len(finished) >= MIN_RUN, {line: ran.report() for line, ran in results.items() if not ran.finished}


# -- the info examples -----------------------------------------------------------------------------------


def shape(line: str) -> str:
    """A line of `info` with its values blanked: sizes, numbers and paths vary, the layout does not."""
    line = re.sub(r"\b[\d.,]+ (?:B|KiB|MiB|GiB|TiB)\b", "<size>", line)
    return " ".join(re.sub(r"\S*[\d/]\S*", "<v>", word) for word in line.split())


def format_mismatches(example: str, real: str) -> list[str]:
    """The example's lines whose shape does not appear in the real output, in the example's order."""
    shapes, missing = iter([shape(line) for line in real.splitlines()]), []
    for line in filter(str.strip, example.splitlines()):
        if shape(line) not in shapes:
            missing.append(line)
    return missing


def info_examples() -> list[Block]:
    return [b for b in BLOCKS if b.lang in OUTPUT and any(INFO_HEADER.match(line) for line in b.source.splitlines())]


def test_every_info_example_is_checked():
    assert info_examples() and {b.heading for b in info_examples()} <= set(INFO_EXAMPLES)


@pytest.mark.parametrize("block", info_examples(), ids=[b.id for b in info_examples()])
def test_info_example_has_the_format_info_prints(readme_run, block):
    workspace, env, _ = readme_run
    store = INFO_EXAMPLES[block.heading]
    real = subprocess.run(["condu-fuse", "info", "--store", store], cwd=workspace, env=env, capture_output=True,
                          text=True, timeout=300)
    assert real.returncode == 0, real.stderr
    header = next(line for line in block.source.splitlines() if INFO_HEADER.match(line))
    assert header in real.stdout.splitlines(), (header, real.stdout)
    assert format_mismatches(block.source, real.stdout) == [], real.stdout


# -- the checks themselves -------------------------------------------------------------------------------

SAMPLE = """\
# Title

```bash
echo runs
```

<!-- not run by tests: needs a GPU -->
```bash
nvidia-smi
```

<!-- not run by tests -->
```python
import torch
```

```console
$ condu-fuse info
```

    indented: condu-fuse info

```text
output
```

<!-- not run by tests: stray -->
Some text.

```
store  x
```
<!-- not run by tests: before output -->
```
out
```
- a list item:

  ```bash
  echo in a list
  ```
"""


def test_parse_finds_blocks_reasons_and_headings():
    blocks, stray = parse(SAMPLE)
    assert [(b.line, b.lang, b.skip) for b in blocks] == [
        (3, "bash", None), (8, "bash", "needs a GPU"), (13, "python", ""), (17, "console", None), (23, "text", None),
        (30, "", None), (34, "", "before output"), (39, "bash", None)]
    assert [b.runs for b in blocks] == [True, False, False, False, False, False, False, True]
    assert blocks[0].heading == "Title" and blocks[0].source == "echo runs\n" and stray == [27]
    assert blocks[-1].source == "echo in a list\n"


def test_problems_name_each_block_without_a_reason():
    assert problems(SAMPLE) == [
        "line 27: a skip comment that precedes no command block",
        "line 13: the skip comment gives no reason: <!-- not run by tests: REASON -->",
        "line 17: a ```console``` block is never run: write it as ```bash``` (commands only) or ```python```, "
        "or precede it with <!-- not run by tests: REASON -->",
        "line 34: a skip comment before a block that is not a command (info '')"]


def test_a_command_that_did_not_run_is_seen():
    source = "condu-fuse unify a/ b/   # make it\nX=1 condu-fuse add c/ && condu-fuse info\n"
    assert simple_commands(source) == [["condu-fuse", "unify", "a/", "b/"], ["condu-fuse", "add", "c/"],
                                       ["condu-fuse", "info"]]
    full = "+ condu-fuse unify a/ b/\n+ X=1\n+ condu-fuse add c/\n++ nested\n+ condu-fuse info\n"
    assert missing_commands(source, full) == []
    assert missing_commands(source, "+ condu-fuse unify a/ b/\n") == ["condu-fuse add c/", "condu-fuse info"]
    assert missing_commands(source, "") == ["condu-fuse unify a/ b/", "condu-fuse add c/", "condu-fuse info"]


def test_named_outputs_default_to_the_default_store():
    shell = Block(1, "", "bash", "condu-fuse unify --base b/ x/\ncondu-fuse decouple --task 1 -o out/ --store s\n",
                  None)
    python = Block(1, "", "python", 'store = Store.unify("st", "b/", [])\nstore.decouple("x", "x-out/")\n', None)
    assert named_outputs(shell) == (["condu-store", "s"], ["out/"])
    assert named_outputs(python) == (["st"], ["x-out/"])


def test_a_changed_info_format_is_seen():
    example = "base        /a/b\n  #  name   kind\n  1  sst2   model   0.96   -\n"
    real = ("store  /x\nbase        /tmp/y/base\n\n"
            "  #  name   kind\n  1  sst2   model   0.9810   -\n  2  b  model  1  -\n")
    assert format_mismatches(example, real) == []
    assert format_mismatches(example, real.replace("model   0.9810", "adapter 0.9810")) == [
        "  1  sst2   model   0.96   -"]
    assert format_mismatches("size   2.9 KiB: unified 1 B\n", "size   15.7 KiB: unified 376 B\n") == []
