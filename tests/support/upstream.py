"""A real OpenAI-compatible server that is not rayplane's own, for the ``openai-upstream``
engine's tests: Hugging Face's ``transformers serve`` on the tiny test model, on a free
loopback port, as a subprocess of the test session.

``transformers serve <folder>`` pins the server to that folder: ``model`` must be the folder's
path (else 400 ``{"detail": ...}``), which is what the fixture's ``model`` is and what an
upstream model's ``upstream.model`` names. It serves ``/v1/chat/completions`` and
``/v1/completions`` (streamed or not; it ends a stream without ``data: [DONE]`` and ignores
``stream_options``), ``/health``; ``/v1/models`` answers 500 for a local folder.

Why this server (docs/serving.md): it installs from PyPI as a wheel (transformers + accelerate,
already the platform's own dependencies), runs on these CPUs and loads the platform's model
folder as it is; llama.cpp's server (``llama-cpp-python[server]``) ships as an sdist only and
compiles on install.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

#: Longest wait for the server's /health (it loads torch and the model first).
START_TIMEOUT_S = 180.0


@dataclass
class UpstreamServer:
    """A running ``transformers serve`` process."""

    base_url: str  # the OpenAI base URL, http://127.0.0.1:PORT/v1
    model: str  # the name the server answers to (the folder's path)
    process: subprocess.Popen
    log: Path

    def as_dict(self) -> dict:
        return {"base_url": self.base_url, "model": self.model, "process": self.process}

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM to its own process group, SIGKILL past ``timeout``)."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test session that started it ends, even
    killed outright (no fixture teardown then), so no server outlives its tests."""
    import ctypes

    PR_SET_PDEATHSIG = 1  # noqa: N806 - linux/prctl.h
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _executable() -> list[str]:
    found = Path(sys.executable).with_name("transformers")
    if found.exists():
        return [str(found)]
    which = shutil.which("transformers")
    if which is None:
        raise RuntimeError("`transformers serve` not found beside the interpreter or on PATH "
                           "(pip install 'transformers[serving]' accelerate)")
    return [which]


def start_upstream(model_dir: str | Path, *, port: int | None = None,
                   timeout: float = START_TIMEOUT_S, log_dir: str | Path | None = None
                   ) -> UpstreamServer:
    """Start ``transformers serve`` on ``model_dir`` (CPU, one torch thread) on a free loopback
    port and wait for its ``/health`` (at most ``timeout`` s; RuntimeError with its log's tail
    when it exits or does not answer)."""
    port = port or free_port()
    log = Path(log_dir or tempfile.mkdtemp(prefix="rayplane-upstream-")) / "transformers-serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*_executable(), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
             "--device", "cpu"], stdout=out, stderr=subprocess.STDOUT, env=env,
            start_new_session=True, preexec_fn=_die_with_parent)
    server = UpstreamServer(f"http://127.0.0.1:{port}/v1", str(model_dir), proc, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                if resp.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(0.3)
    server.stop()
    tail = log.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"transformers serve on port {port} did not answer /health within "
                       f"{timeout:g}s (exit code {proc.poll()}); its log's tail:\n{tail}")


@pytest.fixture(scope="session")
def upstream_server():
    """A session's ``transformers serve`` on the tiny test model: {"base_url", "model",
    "process"}; stopped at the session's end."""
    from tests.support.tiny_model import cached_tiny_model

    server = start_upstream(cached_tiny_model("1"))
    try:
        yield server.as_dict()
    finally:
        server.stop()


__all__ = ["START_TIMEOUT_S", "UpstreamServer", "free_port", "start_upstream",
           "upstream_server"]
