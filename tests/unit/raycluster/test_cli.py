"""The ``rayplane`` command line as a user meets it: the root's help lists every command and
each sub-group's help its subcommands (a command missing from the composition root, or one
that should not be there, fails here), and bad input is one line and exit 2. The registry calls
themselves run against a real MLflow server in tests/integration/test_train_fit.py."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

RAYPLANE = str(Path(sys.executable).parent / "rayplane")

#: The command set, as the README and docs name it: group ("" for the root) -> its commands.
COMMANDS = {
    "": {"up", "down", "status", "env", "demo", "render", "apply", "pools", "models", "serve",
         "agents", "features"},
    "pools": {"check", "show"},
    "models": {"list", "promote", "register"},
    "serve": {"up", "down", "status", "chat"},
    "agents": {"up", "down", "status"},
    "features": {"apply", "materialize", "get"},
}


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([RAYPLANE, *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={"PATH": "/usr/bin:/bin", **(env or {})}, check=False)


def listed_commands(help_text: str) -> list[str]:
    """The names in a help page's Commands section: Typer's panel (``│ name  help``) or
    click's plain list (``  name  help``); wrapped help lines are indented further."""
    names, inside = [], False
    for line in help_text.splitlines():
        if re.match(r"^\s*(╭─+\s*)?Commands\b", line):
            inside = True
        elif inside:
            if line.startswith("╰") or (names and not line.strip()):
                break
            if m := re.match(r"^(?:│ |  )([a-z][\w-]*)(?:\s|$)", line):
                names.append(m[1])
    return names


@pytest.mark.parametrize("group", sorted(COMMANDS), ids=lambda g: g or "rayplane")
def test_help_lists_exactly_the_commands(group: str):
    proc = run(*([group] if group else []), "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = listed_commands(proc.stdout)
    assert len(listed) == len(set(listed)), listed
    assert set(listed) == COMMANDS[group], proc.stdout


def test_listed_commands_reads_both_help_layouts():
    rich = ("╭─ Commands ──────╮\n│ up     Start the local   │\n│        platform.  │\n"
            "│ serve  The app.  │\n╰─────────────────╯\n")
    plain = "Usage: x\n\nCommands:\n  up     Start the local\n         platform.\n  serve  The app.\n"
    assert listed_commands(rich) == listed_commands(plain) == ["up", "serve"]
    assert listed_commands("Usage: x\n\nOptions:\n  --help  Show this.\n") == []


def test_a_registry_that_is_down_is_one_line_and_exit_2(dead_mlflow: str):
    proc = run("models", "promote", "rayplane-tool-llm", "1", "--tracking-uri", dead_mlflow)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err.startswith(f"error: --tracking-uri: no MLflow server answers at {dead_mlflow}")
    assert "\n" not in err and "Traceback" not in err
    proc = run("models", "list")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --tracking-uri: not set; set "
                                          "MLFLOW_TRACKING_URI")
