"""``rayplane features apply|materialize|get``: the feature store (Feast) from the command line.

``apply`` and ``materialize`` run ``python -m features.jobs ...`` as Ray jobs on the cpu pool
(entrypoint resources ``pool:cpu``), submitted through the Jobs API with the cluster's token
and the repository as working dir, exactly as ``ray job submit`` does; the job's log streams
here and a failed job exits 1. ``ray job submit`` does not hand the client's environment to
the job, so what the job needs to find the store (the state folder, the PostgreSQL DSN file,
``RAYPLANE_FEATURE_STORE``) goes in its ``runtime_env`` ``env_vars``. ``get`` reads the online
store directly and prints JSON. Bad input (a view that does not exist, an entity key of the
wrong type) is one line and exit 2, before any job is submitted.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Annotated

import typer

from raycluster.catalog import POOL_RESOURCE_PREFIX
from raycluster.cli.common import AddressOpt, StateOpt, console, err_console
from raycluster.cli.serve import attach_local

features_app = typer.Typer(no_args_is_help=True,
                           help="The feature store (Feast): apply, materialize, get.")

#: What ``--working-dir`` uploads: the repository root (top-level packages importable).
REPO = Path(__file__).resolve().parents[2]
#: The pool the feature store's jobs run on.
JOB_POOL = "cpu"
#: Environment the job needs to find the feature store, forwarded when the client has it.
#: Never the database password: a job's runtime_env is readable by every holder of the
#: cluster token (the dashboard shows it); the cluster's pods carry it from their Secret.
FORWARDED_ENV = ("RAYPLANE_FEATURE_STORE",)

ViewsOpt = Annotated[str | None, typer.Option(
    "--views", help="Comma-separated feature views (default: all).")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds to wait for the job.")]


def _target(address: str | None, state_dir: Path | None) -> tuple[str, dict, dict]:
    """(dashboard URL, request headers, the job's env vars) of ``--address`` or the local
    platform in ``--state-dir``."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    if address is not None:
        return address, {}, env
    cluster = attach_local(state_dir, "no local platform is up (run `rayplane up`) and no "
                                      "--address was given")
    env.update({"RAYPLANE_STATE_DIR": str(cluster.state_dir),
                "RAYPLANE_POSTGRES_DSN_FILE": str(cluster.postgres.dsn_path)})
    return cluster.dashboard_url, cluster.auth_headers(), env


def run_job(args: list[str], address: str | None, state_dir: Path | None,
            timeout: float) -> int:
    """Submit ``python -m features.jobs ARGS`` on the cpu pool, stream its log, return 0 when
    it succeeded and 1 otherwise."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    url, headers, env = _target(address, state_dir)
    client = JobSubmissionClient(url, headers=headers or None)
    entrypoint = " ".join(["python", "-m", "features.jobs", *args])
    job_id = client.submit_job(
        entrypoint=entrypoint, runtime_env={"working_dir": str(REPO), "env_vars": env},
        entrypoint_resources={f"{POOL_RESOURCE_PREFIX}{JOB_POOL}": 1})
    console.print(f"[bold]{entrypoint}[/bold] (job {job_id}, pool {JOB_POOL})", highlight=False)
    deadline = time.monotonic() + timeout

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            for line in lines.splitlines():
                # Ray Data's progress lines are noise here; the job's own lines are not.
                if line and "logging_progress.py" not in line:
                    console.print(f"  {line}", style="dim", highlight=False, markup=False)
            if time.monotonic() > deadline:
                return

    try:
        asyncio.run(asyncio.wait_for(tail(), timeout=timeout))
    except (TimeoutError, RuntimeError) as err:
        # A lost log stream is not the job's failure: its status below decides.
        if isinstance(err, RuntimeError):
            err_console.print(f"log stream of job {job_id} lost ({err}); waiting for it")
    except KeyboardInterrupt:
        client.stop_job(job_id)
        raise
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
        status = client.get_job_status(job_id)
    if status == JobStatus.SUCCEEDED:
        return 0
    if not status.is_terminal():
        client.stop_job(job_id)
        err_console.print(f"job {job_id} took longer than {timeout:.0f}s; stopped it")
        return 1
    info = client.get_job_info(job_id)
    err_console.print(f"job {job_id} {status.value}: {info.message or ''}".strip(),
                      highlight=False)
    return 1


@features_app.command("apply")
def apply_cmd(regenerate: Annotated[bool, typer.Option(
                  "--regenerate", help="Write a new platform history even if one exists.")]
              = False,
              state_dir: StateOpt = None, address: AddressOpt = None,
              timeout: TimeoutOpt = 600) -> None:
    """Register the feature repository (feast apply) in a Ray job on the cpu pool; writes the
    platform's history first when there is none (or only a stale one, locally)."""
    args = ["apply", *(["--regenerate"] if regenerate else [])]
    raise typer.Exit(run_job(args, address, state_dir, timeout))


@features_app.command("materialize")
def materialize_cmd(views: ViewsOpt = None,
                    end: Annotated[str | None, typer.Option(
                        "--end", help="ISO time to materialise up to (default: now).")] = None,
                    state_dir: StateOpt = None, address: AddressOpt = None,
                    timeout: TimeoutOpt = 900) -> None:
    """Load the newest feature values into the online store (Feast on Ray) in a Ray job on
    the cpu pool."""
    from features.jobs import parse_end, parse_views

    chosen = parse_views(views)  # a wrong name is exit 2 here, before any job
    parse_end(end)
    args = ["materialize", "--views", ",".join(chosen), *(["--end", end] if end else [])]
    raise typer.Exit(run_job(args, address, state_dir, timeout))


@features_app.command("get")
def get_cmd(name: Annotated[str, typer.Argument(help="A feature view or service "
                                                     "(e.g. pool_load, job_duration_model).")],
            entity: Annotated[list[str] | None, typer.Option(
                "--entity", "-e", help="An entity key: key=value (repeat for several).")]
            = None,
            state_dir: StateOpt = None) -> None:
    """Online features of one entity as JSON, e.g. `rayplane features get pool_load -e
    pool=a100-mig`."""
    from features import online

    online.resolve(name, field="name")
    row = online.parse_entities(entity or [], name)
    if state_dir is not None:
        os.environ["RAYPLANE_STATE_DIR"] = str(state_dir.resolve())
    if not os.environ.get("RAYPLANE_FEATURE_STORE"):
        cluster = attach_local(state_dir, "no local platform is up (run `rayplane up`) and "
                                          "RAYPLANE_FEATURE_STORE is not set")
        os.environ.setdefault("RAYPLANE_STATE_DIR", str(cluster.state_dir))
        os.environ.setdefault("RAYPLANE_POSTGRES_DSN_FILE", str(cluster.postgres.dsn_path))
    result = online.online_features([name], [row])[0]
    print(json.dumps(result, indent=2, default=str))


__all__ = ["apply_cmd", "features_app", "get_cmd", "materialize_cmd", "run_job"]
