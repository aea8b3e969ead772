"""The Python environment of a framework deployment: the platform's own environment with the
framework's pinned requirements layered over it, built once per node with uv and started as
the replica's interpreter through Ray's ``py_executable`` runtime_env field.

Why not Ray's ``pip`` / ``uv`` runtime_env fields: on a virtualenv (the platform's ``.venv``,
made by ``uv sync``) Ray clones the whole environment (2.8 GB here, about a minute per try) and
then runs ``python -m pip`` in the clone, which a uv-made environment does not have, so the
runtime_env fails ("No module named pip"). ``uv run --with`` layers packages without a copy
but cannot override a framework's pin (AutoGen's protobuf ~5.29 breaks Ray's own gRPC
modules, generated for protobuf 7). So the layer is built here: ``uv venv`` on the base
interpreter, a ``.pth`` that adds the base environment's site-packages *after* the layer's
own, and ``uv pip install -r <kind>-requirements.txt`` with the packages of
:data:`KEEP_FROM_BASE` overridden to the base's versions. The layer holds the framework's
whole dependency closure, so its versions win (openai 2 for CrewAI) while Ray, LangGraph and
the platform's code come from the base. It lives under ``RAYPLANE_FRAMEWORKS_HOME`` (default
``~/.cache/rayplane/frameworks``) keyed by a hash of the requirements and the base
interpreter; concurrent replicas on a node wait on a file lock, and later starts reuse it.

:func:`runtime_env` makes this module the replica's interpreter: it builds the layer when
missing and ``exec``s the layer's Python with the worker's arguments. ``python -m
agents.frameworks crewai -c pass`` does the same by hand: it builds the layer ahead (an image
build, a node's start) so that a replica's first start does not wait for it.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from raycluster.errors import PlatformError

#: The framework deployments and their requirement files (beside this module).
KINDS = ("crewai", "autogen")
HERE = Path(__file__).resolve().parent
HOME_ENV = "RAYPLANE_FRAMEWORKS_HOME"
UV_ENV = "RAYPLANE_UV"
#: Packages whose base version the layer keeps whatever the framework pins: Ray's generated
#: gRPC modules need the base's protobuf, and AutoGen's agents use protobuf only to
#: (de)serialize messages of its distributed runtime, which the deployment does not use.
KEEP_FROM_BASE: dict[str, tuple[str, ...]] = {"autogen": ("protobuf",), "crewai": ("protobuf",)}
#: Seconds a replica waits for another process building the same layer.
LOCK_TIMEOUT_S = 600.0


def requirements_file(kind: str) -> Path:
    if kind not in KINDS:
        raise PlatformError(f"unknown framework {kind!r}; frameworks: {', '.join(KINDS)}")
    return HERE / f"{kind}-requirements.txt"


def requirements(kind: str) -> list[str]:
    """The pinned requirements of ``kind`` (its file without comments)."""
    lines = requirements_file(kind).read_text().splitlines()
    return [x.split("#", 1)[0].strip() for x in lines if x.split("#", 1)[0].strip()]


def overrides(kind: str) -> list[str]:
    """``name==version`` of the base packages the layer keeps (those installed in the base)."""
    out = []
    for name in KEEP_FROM_BASE.get(kind, ()):
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def find_uv() -> str:
    """The uv executable: ``RAYPLANE_UV``, ``uv`` on PATH, the ``uv`` Python package, or the
    repository's ``.tools/bin/uv`` (where ``make env`` installs it)."""
    candidates = [os.environ.get(UV_ENV), shutil.which("uv"),
                  str(Path(sys.executable).parent / "uv")]
    try:
        from uv import find_uv_bin  # type: ignore[import-not-found]

        candidates.append(find_uv_bin())
    except Exception:  # the uv package is optional: a binary on PATH does as well
        pass
    candidates.append(str(HERE.parents[1] / ".tools" / "bin" / "uv"))
    for c in candidates:
        if c and os.access(c, os.X_OK) and Path(c).is_file():
            return c
    raise PlatformError("the framework deployments need uv to build their environment: "
                        f"install it (pip install uv) or set {UV_ENV} to its path")


def env_home() -> Path:
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "rayplane" / "frameworks")


def env_key(kind: str) -> str:
    """A hash of what the layer is made of: its requirements, overrides and base interpreter."""
    text = "\n".join([kind, *requirements(kind), *overrides(kind), sys.executable,
                      sys.version])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def env_dir(kind: str) -> Path:
    return env_home() / f"{kind}-{env_key(kind)}"


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _base_sitedirs() -> list[str]:
    paths = sysconfig.get_paths()
    return list(dict.fromkeys(p for p in (paths["purelib"], paths["platlib"]) if p))


def build_env(kind: str, *, log=None) -> Path:
    """The layer's interpreter, building the layer when it is missing (see the module)."""
    log = log or (lambda msg: print(f"[rayplane {kind}] {msg}", file=sys.stderr, flush=True))
    venv = env_dir(kind)
    stamp = venv / ".rayplane-ready"
    if stamp.is_file():
        return _python(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{venv}.lock", "w") as lock:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PlatformError(f"{kind}: waited {LOCK_TIMEOUT_S:.0f}s for another "
                                        f"process building {venv}") from None
                time.sleep(0.5)
        if stamp.is_file():  # built while this process waited
            return _python(venv)
        uv = find_uv()
        started = time.monotonic()
        log(f"building its environment in {venv} with {uv}")
        python = _python(venv)
        # Resumable: a build cut short (Ray stops a worker that does not register within a
        # minute) is completed by the next start; uv skips what is already installed.
        if not python.exists():
            _run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)])
        site = Path(subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True).stdout.strip())
        # Base site dirs go after the layer's own (addsitedir appends), .pth files included,
        # so the platform's editable install and Ray's own paths work in the layer too.
        lines = [f"import site; site.addsitedir({d!r})" for d in _base_sitedirs()]
        (site / "zz_rayplane_base.pth").write_text("\n".join(lines) + "\n")
        cmd = [uv, "pip", "install", "--quiet", "--python", str(python),
               "-r", str(requirements_file(kind))]
        pins = overrides(kind)
        if pins:
            override = venv / "overrides.txt"
            override.write_text("\n".join(pins) + "\n")
            cmd += ["--override", str(override)]
        _run(cmd)
        stamp.write_text(f"{time.monotonic() - started:.1f}\n")
        log(f"environment ready in {time.monotonic() - started:.1f}s")
        return python


def _run(cmd: list[str]) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-5:]
        raise PlatformError(f"`{shlex.join(cmd[:3])} ...` failed ({out.returncode}): "
                            + " | ".join(tail))


def install_seconds(kind: str) -> float | None:
    """How long the node's layer took to build (None when it is not built)."""
    stamp = env_dir(kind) / ".rayplane-ready"
    try:
        return float(stamp.read_text())
    except (OSError, ValueError):
        return None


#: The replica's interpreter command runs this file by its path, found without importing the
#: ``agents`` package (whose imports take seconds, counted against Ray's 60 s for a worker to
#: register): ``python -c BOOTSTRAP KIND ARGS...``.
BOOTSTRAP = ("import importlib.util as u, os, runpy, sys; "
             "d = u.find_spec('agents').submodule_search_locations[0]; "
             "runpy.run_path(os.path.join(d, 'frameworks', 'env.py'), run_name='__main__')")


def runtime_env(kind: str) -> dict:
    """The replica's runtime_env: this module as its interpreter (it builds the layer once per
    node and execs the layer's Python), uv's path as found here, the frameworks' telemetry off
    (the platform's nodes reach no vendor service)."""
    requirements_file(kind)
    env_vars = {UV_ENV: find_uv(), "CREWAI_DISABLE_TELEMETRY": "true",
                "CREWAI_TRACING_ENABLED": "false", "OTEL_SDK_DISABLED": "true"}
    if os.environ.get(HOME_ENV):
        env_vars[HOME_ENV] = os.environ[HOME_ENV]
    return {"py_executable": f"{shlex.quote(sys.executable)} -c {shlex.quote(BOOTSTRAP)} {kind}",
            "env_vars": env_vars}


def main(argv: list[str]) -> None:
    """``python -m agents.frameworks KIND ARGS...``: exec the layer's Python with ARGS."""
    if len(argv) < 2 or argv[1] not in KINDS:
        sys.exit(f"usage: python -m agents.frameworks {{{'|'.join(KINDS)}}} [python args...]")
    try:
        python = build_env(argv[1])
    except PlatformError as err:
        sys.exit(f"[rayplane {argv[1]}] {err}")
    os.execv(python, [str(python), *argv[2:]])


if __name__ == "__main__":
    main(sys.argv)
