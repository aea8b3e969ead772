"""`rayplane models ...` is registered on the rayplane CLI and answers bad input with one line
and exit 2 (the registry calls themselves run against a real MLflow server in
tests/integration/test_train_fit.py)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
RAYPLANE = str(Path(sys.executable).parent / "rayplane")


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([RAYPLANE, *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={"PATH": "/usr/bin:/bin", **(env or {})}, check=False)


def test_models_commands_are_listed():
    out = run("models", "--help").stdout
    for command in ("list", "promote", "register"):
        assert command in out


def test_a_registry_that_is_down_is_one_line_and_exit_2():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
    proc = run("models", "promote", "rayplane-tool-llm", "1", "--tracking-uri", uri)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err.startswith(f"error: --tracking-uri: no MLflow server answers at {uri}")
    assert "\n" not in err and "Traceback" not in err
    proc = run("models", "list")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --tracking-uri: not set; set "
                                          "MLFLOW_TRACKING_URI")
