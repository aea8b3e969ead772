"""`rayplane agents` as a user meets it without a platform: the dry run prints the Serve config
that `up` would deploy, and a bad config, a missing platform or two configs at once are one
line and exit 2, before any cluster is touched. The deploy itself runs against the session's
platform in tests/integration/test_agents_deploy.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agents.serve_app import DEFAULT_CONFIG, serve_config
from agents.spec import AgentsAppConfig
from tests.conftest import REPO

RAYPLANE = str(Path(sys.executable).parent / "rayplane")


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([RAYPLANE, "agents", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env={"PATH": "/usr/bin:/bin"}, check=False)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("error: "), err
    return err.removeprefix("error: ")


def test_the_dry_run_prints_what_up_deploys(catalog, tmp_path):
    # From any folder: the default config is the package's own.
    proc = run("up", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    expected = serve_config(AgentsAppConfig.from_file(DEFAULT_CONFIG), catalog,
                            host="127.0.0.1", proxy_location="HeadOnly")
    assert json.loads(proc.stdout) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("pool: a100mig\napi_keys: {file: /k}\n",
     "pool: 'a100mig' is not a pool (did you mean 'a100-mig'?); valid: cpu, a100-timeslice, "
     "a100-mig, h100-timeslice"),
    ("graph: [tools]\napi_keys: {file: /k}\n", "graph: unknown field (did you mean 'graphs'?)"),
    ("pool: cpu\n", "api_keys: required"),
])
def test_a_bad_config_is_one_line_and_exit_2(tmp_path, text, message):
    path = tmp_path / "agents.yaml"
    path.write_text(text)
    assert message in one_line_error(run("up", str(path), "--state-dir", str(tmp_path)))


def test_no_platform_is_one_line_and_exit_2(tmp_path):
    for command in ("up", "down", "status"):
        err = one_line_error(run(command, "--state-dir", str(tmp_path / "none")))
        assert err.startswith("no local platform is up (run `rayplane up`)"), err


def test_two_configs_at_once_are_refused(tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text(DEFAULT_CONFIG.read_text())
    err = one_line_error(run("up", str(DEFAULT_CONFIG), "-f", str(other), "--dry-run"))
    assert err.startswith("--file: ") and "name two configs" in err
