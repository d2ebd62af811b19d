"""requirements.lock against pyproject.toml: the lock's header, its digest of pyproject's
dependency tables, and the check that the two agree (tests/test_packaging.py runs it).

`make lock` runs uv to write the pins, then stamps the header with this module:

    python -m tests.lockfile stamp requirements.lock --command "uv pip compile ..." --uv "uv 0.13.9"

Only the standard library is needed to stamp (tomli on Python 3.10); `check` needs `packaging`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

DIGEST_KEY = "pyproject-digest"
COMMAND_KEY = "command"


def dependency_tables(pyproject: dict) -> dict:
    """What the resolution depends on: requires-python, the core and extras, and uv's pins (torch)."""
    project = pyproject.get("project", {})
    return {
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
        "tool.uv": pyproject.get("tool", {}).get("uv", {}),
    }


def digest(pyproject: dict) -> str:
    """sha256 of the dependency tables as canonical JSON: comments and layout do not count."""
    canonical = json.dumps(dependency_tables(pyproject), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def header(pyproject: dict, command: str, uv_version: str) -> str:
    """The lock's first lines: what it is for, the command that made it, and the digest."""
    return "\n".join([
        "# The pinned versions every install takes (pip install -c requirements.lock ...; see the Makefile).",
        f"# Made from pyproject.toml by `make lock`, which runs {uv_version}:",
        f"#   {COMMAND_KEY}: {command}",
        "# and then writes this header (tests/lockfile.py). Edit pyproject.toml, then `make lock`; never this file.",
        f"# {DIGEST_KEY}: {digest(pyproject)}",
        "",
    ])


def stamp(lock: Path, pyproject: dict, command: str, uv_version: str) -> None:
    """Replace the lock's leading comment block with a fresh header."""
    lines = lock.read_text().splitlines(keepends=True)
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    lock.write_text(header(pyproject, command, uv_version) + "".join(lines))


@dataclass
class Lock:
    """A parsed lock: pins by normalized name (one per marker branch), and the header's fields."""

    pins: dict[str, list[tuple[str, str | None]]] = field(default_factory=dict)  # name -> [(version, marker)]
    top_level: set[str] = field(default_factory=set)  # names uv annotated `via <project> (pyproject.toml)`
    fields: dict[str, str] = field(default_factory=dict)  # header `# key: value` lines
    unpinned: list[str] = field(default_factory=list)  # requirement lines that are not `name==version`


_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)\s*(?:;\s*([^#]+?))?\s*(?:#\s*via\s+(.*))?$")
_FIELD = re.compile(r"^#\s+([a-z-]+):\s+(.*)$")


def parse_lock(text: str, project: str) -> Lock:
    """Pins of a `uv pip compile --annotation-style line` file, with the header's fields."""
    from packaging.utils import canonicalize_name

    lock = Lock()
    source = f"{project} (pyproject.toml)"
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            found = _FIELD.match(line)
            if found:
                lock.fields[found[1]] = found[2]
            continue
        found = _PIN.match(line)
        if found is None:
            lock.unpinned.append(line)
            continue
        name = canonicalize_name(found[1])
        lock.pins.setdefault(name, []).append((found[2], found[3]))
        if source in [via.strip() for via in (found[4] or "").split(",")]:
            lock.top_level.add(name)
    return lock


def _requirements(pyproject: dict) -> list[tuple[str, str]]:
    """(where, requirement) for the core and every extra."""
    project = pyproject["project"]
    found = [("dependencies", text) for text in project.get("dependencies", [])]
    for extra, texts in project.get("optional-dependencies", {}).items():
        found += [(f"[{extra}]", text) for text in texts]
    return found


def _lowest_python(requires_python: str) -> str | None:
    """3.10 from '>=3.10': the version uv resolves from."""
    found = re.fullmatch(r"\s*>=\s*(\d+\.\d+)(?:\.0)?\s*", requires_python or "")
    return found and found[1]


def check(pyproject: dict, lock_text: str) -> list[str]:
    """Every way the lock and pyproject disagree, one line each (empty when they agree)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    project = pyproject["project"]
    lock = parse_lock(lock_text, project["name"])
    problems = [f"requirements.lock: {line!r} is not pinned with ==; run `make lock`" for line in lock.unpinned]
    if lock.fields.get(DIGEST_KEY) != digest(pyproject):
        problems.append("requirements.lock was made from other pyproject.toml dependency tables (its "
                        f"{DIGEST_KEY} differs); run `make lock`")
    wanted = set()
    for where, text in _requirements(pyproject):
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        wanted.add(name)
        pins = lock.pins.get(name)
        if not pins:
            problems.append(f"requirements.lock pins no {requirement.name} ({where} of pyproject.toml); run `make lock`")
            continue
        for version, marker in pins:
            if not requirement.specifier.contains(Version(version), prereleases=True):
                branch = f" ; {marker}" if marker else ""
                problems.append(f"requirements.lock pins {name}=={version}{branch}, outside {where} {text!r} "
                                "of pyproject.toml; run `make lock`")
    for name in sorted(lock.top_level - wanted):
        problems.append(f"requirements.lock has {name} as a requirement of pyproject.toml, which no longer "
                        "names it; run `make lock`")
    lowest = _lowest_python(project.get("requires-python"))
    command = shlex.split(lock.fields.get(COMMAND_KEY, ""))
    made_for = command[command.index("--python-version") + 1] if "--python-version" in command[:-1] else None
    if lowest is not None and made_for != lowest:
        problems.append(f"requirements.lock was resolved for Python {made_for}, but requires-python is "
                        f"{project.get('requires-python')!r}; set LOCK_PYTHON in the Makefile and run `make lock`")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.lockfile")
    commands = parser.add_subparsers(dest="action", required=True)
    stamping = commands.add_parser("stamp", help="write the header of a lock uv just wrote")
    stamping.add_argument("lock", type=Path)
    stamping.add_argument("--command", required=True, help="the uv command that wrote the pins")
    stamping.add_argument("--uv", required=True, help="`uv --version` of the uv that ran it")
    checking = commands.add_parser("check", help="list how the lock and pyproject.toml disagree")
    checking.add_argument("lock", type=Path)
    args = parser.parse_args(argv)
    pyproject = tomllib.loads(Path("pyproject.toml").read_text())
    if args.action == "stamp":
        stamp(args.lock, pyproject, args.command, args.uv)
        return 0
    problems = check(pyproject, args.lock.read_text())
    print("\n".join(problems) or f"{args.lock} agrees with pyproject.toml")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
