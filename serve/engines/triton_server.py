"""A Triton server the model's replica starts, health-checks and stops (``triton.server:
process``, the local platform).

The server is nvidia-pytriton's bundled ``tritonserver`` with its Python backend (installed by
``make`` into ``.triton/``, a folder of its own: the package pins numpy < 2 and only its
binaries are used). The replica writes a model repository of one model (serve/engines/
triton_backend.py over the CPU engine, the vLLM backend's interface), starts the server on free
loopback ports, waits until the model is ready and stops the server with itself. While it runs,
a file_sd target file lets the platform's Prometheus scrape Triton's own metrics
(``$RAYPLANE_STATE_DIR/prometheus/targets/``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
#: Where ``make`` installs nvidia-pytriton (override: RAYPLANE_TRITON_HOME, the folder holding
#: ``pytriton/``).
TRITON_HOME_ENV = "RAYPLANE_TRITON_HOME"


def model_py() -> str:
    """The repository's ``model.py`` (the stub loads it by path). The stub embeds the
    system's libpython of this version and does not read ``PYTHONPATH``, so the file names
    rayplane and this environment's packages itself: its site-packages only, never another
    interpreter's standard library (its extension modules do not load into the stub's)."""
    base = Path(sys.base_prefix).resolve()
    # First the Triton folder's own packages: the numpy < 2 that the stub's bindings are
    # built for (numpy 2 corrupts its string tensors), then rayplane and this environment.
    paths = [str(triton_root().parents[1]), str(REPO),
             *[p for p in sys.path if p and Path(p).is_dir()
               and not Path(p).resolve().is_relative_to(base)]]
    return (f"import sys\nsys.path[:0] = [p for p in {paths!r} if p not in sys.path]\n"
            "from serve.engines.triton_backend import TritonPythonModel  # noqa: E402,F401\n")


#: PATH of the server (see ``TritonProcess.start``).
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


class TritonUnavailable(RuntimeError):
    """The server cannot be started, or stopped answering."""


def triton_root() -> Path:
    home = Path(os.environ.get(TRITON_HOME_ENV) or REPO / ".triton")
    root = home / "pytriton" / "tritonserver"
    if not (root / "bin" / "tritonserver").exists():
        raise TritonUnavailable(f"no tritonserver under {home} (engine: triton with server "
                                "'process' needs nvidia-pytriton's: run `make env`, or set "
                                f"{TRITON_HOME_ENV})")
    return root


def config_pbtxt(model_name: str, model_dir: str, max_num_seqs: int,
                 max_model_len: int | None, stream_interval_ms: float) -> str:
    """The repository's ``config.pbtxt``: the vLLM backend's inputs and outputs, on the Python
    backend, decoupled."""
    def tensor(name: str, dtype: str, dims: str = "[ 1 ]", optional: bool = False) -> str:
        opt = " optional: true" if optional else ""
        return f'  {{ name: "{name}" data_type: {dtype} dims: {dims}{opt} }}'

    inputs = [tensor("text_input", "TYPE_STRING"),
              *(tensor(n, "TYPE_BOOL", optional=True)
                for n in ("stream", "exclude_input_in_output", "return_finish_reason",
                          "return_num_input_tokens", "return_num_output_tokens")),
              tensor("sampling_parameters", "TYPE_STRING", optional=True)]
    outputs = [tensor("text_output", "TYPE_STRING", "[ -1 ]"),
               tensor("finish_reason", "TYPE_STRING", "[ -1 ]"),
               tensor("num_input_tokens", "TYPE_UINT32"),
               tensor("num_output_tokens", "TYPE_UINT32", "[ -1 ]")]
    params = {"model_dir": model_dir, "max_num_seqs": str(max_num_seqs),
              "max_model_len": str(max_model_len or 0),
              "stream_interval_ms": str(stream_interval_ms)}
    param_text = "\n".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}'
                           for k, v in params.items())
    return (f'name: "{model_name}"\nbackend: "python"\nmax_batch_size: 0\n'
            "model_transaction_policy { decoupled: true }\n"
            "input [\n" + ",\n".join(inputs) + "\n]\n"
            "output [\n" + ",\n".join(outputs) + "\n]\n"
            "instance_group [ { count: 1 kind: KIND_CPU } ]\n" + param_text + "\n")


#: The repository's ``model.py``: the Python backend loads it by path.
MODEL_PY = "from serve.engines.triton_backend import TritonPythonModel  # noqa: F401\n"


#: Runs the server (``$@``) and waits for it or for the replica (RAYPLANE_TRITON_OWNER) to be
#: gone, whichever is first; then stops the server and removes the replica's files.
WATCHDOG = """
"$@" &
server=$!
trap 'kill -TERM $server 2>/dev/null' TERM INT
while kill -0 "$RAYPLANE_TRITON_OWNER" 2>/dev/null && kill -0 $server 2>/dev/null; do
  sleep 1
done
kill -TERM $server 2>/dev/null
wait $server
status=$?
[ -n "$RAYPLANE_TRITON_TARGET" ] && rm -f "$RAYPLANE_TRITON_TARGET"
kill -0 "$RAYPLANE_TRITON_OWNER" 2>/dev/null || rm -rf "$RAYPLANE_TRITON_WORK"
exit $status
"""


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (all bound until all are picked, so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("0.0.0.0", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _node_ip() -> str:
    """This Ray node's address (127.0.0.1 outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside a Ray worker: loopback
        pass
    return "127.0.0.1"


class TritonProcess:
    """One ``tritonserver`` serving ``model_name`` from ``model_dir`` on loopback."""

    def __init__(self, model_name: str, model_dir: str, *, max_num_seqs: int,
                 max_model_len: int | None, stream_interval_ms: float, label: str):
        self.model_name, self.label = model_name, label
        self.work = Path(tempfile.mkdtemp(prefix="rayplane-triton-"))
        self.ports = dict(zip(("grpc", "http", "metrics"), _free_ports(3), strict=True))
        # The replica talks to the server on loopback; Prometheus scrapes it at the node's
        # address (a local node has its own network namespace, as a pod does).
        self.metrics_host = _node_ip()
        self._write_repository(model_dir, max_num_seqs, max_model_len, stream_interval_ms)
        self.proc: subprocess.Popen | None = None
        self.target_file: Path | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    @property
    def log_path(self) -> Path:
        return self.work / "tritonserver.log"

    def _write_repository(self, model_dir: str, max_num_seqs: int, max_model_len: int | None,
                          stream_interval_ms: float) -> None:
        root = triton_root()
        model = self.work / "repository" / self.model_name
        (model / "1").mkdir(parents=True)
        (model / "config.pbtxt").write_text(config_pbtxt(
            self.model_name, model_dir, max_num_seqs, max_model_len, stream_interval_ms))
        (model / "1" / "model.py").write_text(model_py())
        # The Python backend runs the stub built for this interpreter's version, found beside
        # the backend library (what pytriton does when it copies the server).
        backend = self.work / "backends" / "python"
        backend.mkdir(parents=True)
        for item in (root / "backends" / "python").iterdir():
            (backend / item.name).symlink_to(item)
        stub = (root / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}"
                / "triton_python_backend_stub")
        if not stub.exists():
            raise TritonUnavailable(f"nvidia-pytriton has no Python backend stub for Python "
                                    f"{sys.version_info[0]}.{sys.version_info[1]}")
        (backend / stub.name).symlink_to(stub)

    def start(self, timeout_s: float) -> None:
        root = triton_root()
        argv = [str(root / "bin" / "tritonserver"),
                f"--model-repository={self.work / 'repository'}",
                f"--backend-directory={self.work / 'backends'}",
                "--grpc-address=127.0.0.1", f"--grpc-port={self.ports['grpc']}",
                "--http-address=127.0.0.1", f"--http-port={self.ports['http']}",
                f"--metrics-address={self.metrics_host}",
                f"--metrics-port={self.ports['metrics']}",
                "--allow-gpu-metrics=false", "--exit-timeout-secs=10",
                "--log-verbose=0"]
        # A replica that is killed (a node lost, `serve` restarting it) runs no cleanup: the
        # shell around the server stops it when the replica's process is gone, and removes
        # what the replica wrote (its folder, its scrape target).
        self.target_file = self._target_path()
        # The stub's embedded Python finds its standard library from the first `python3` on
        # PATH: in a Ray worker that is this environment's, whose base interpreter is not the
        # system's libpython the stub links (its extension modules fail to load). The
        # server's PATH holds the system's directories only.
        env = {**os.environ, "PATH": SYSTEM_PATH, "RAYPLANE_TRITON_OWNER": str(os.getpid()),
               "RAYPLANE_TRITON_WORK": str(self.work),
               "RAYPLANE_TRITON_TARGET": str(self.target_file or "")}
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(["/bin/sh", "-c", WATCHDOG, "tritonserver", *argv],
                                     stdout=log, stderr=subprocess.STDOUT, env=env,
                                     cwd=self.work, start_new_session=True)
        log.close()
        self._wait_ready(timeout_s)
        self._register_scrape_target()

    def _wait_ready(self, timeout_s: float) -> None:
        url = (f"http://127.0.0.1:{self.ports['http']}/v2/models/{self.model_name}/ready")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                why = (f"tritonserver exited ({self.proc.returncode}) before {self.model_name} "
                       f"was ready: {self.log_errors()}")
                self.stop()
                raise TritonUnavailable(why)
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        why = (f"{self.model_name} not ready on tritonserver within {timeout_s:.0f}s: "
               f"{self.log_errors()}")
        self.stop()
        raise TritonUnavailable(why)

    def failure(self) -> str | None:
        """Why the server cannot serve (the replica's health check), or None."""
        if self.proc is None:
            return "tritonserver not started"
        if self.proc.poll() is not None:
            return f"tritonserver (pid {self.proc.pid}) exited with {self.proc.returncode}"
        return None

    def log_errors(self, limit: int = 600) -> str:
        """The server's error lines (Triton's ``E`` lines, a crash), for the replica's error:
        its log folder goes with the replica."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        errors = [line for line in text if line.startswith("E") or "Signal (" in line
                  or line.startswith("error:")]
        return " | ".join(errors or text[-3:])[-limit:]

    def _target_path(self) -> Path | None:
        state = os.environ.get("RAYPLANE_STATE_DIR")
        targets = Path(state) / "prometheus" / "targets" if state else None
        if targets is None or not targets.is_dir():  # the platform runs without metrics
            return None
        return targets / f"triton-{self.label}-{os.getpid()}.json"

    def _register_scrape_target(self) -> None:
        if self.target_file is None:
            return
        tmp = self.target_file.with_suffix(".tmp")
        # `served_model`, not `model`: Triton's series carry a `model` label of their own.
        tmp.write_text(json.dumps([{"targets": [f"{self.metrics_host}:{self.ports['metrics']}"],
                                    "labels": {"server": "triton",
                                               "served_model": self.label}}]))
        tmp.rename(self.target_file)  # Prometheus never reads half a file

    def stop(self) -> None:
        if self.target_file is not None:
            self.target_file.unlink(missing_ok=True)
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=5)
        shutil.rmtree(self.work, ignore_errors=True)


__all__ = ["TRITON_HOME_ENV", "TritonProcess", "TritonUnavailable", "config_pbtxt",
           "triton_root"]
