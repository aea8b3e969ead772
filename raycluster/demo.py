"""``rayplane demo`` (``make demo``): the platform's main path on the local default.

1. bring the local platform up (``rayplane up``);
2. a ``ray job submit`` smoke job on every pool, with the cluster token, proving placement;
then print the URLs and how to submit jobs. The platform is left running (``make down``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import typer

from raycluster.cli import CatalogOpt, UserError, app, console
from raycluster.local import LocalCluster, StateOpt, _print_urls

REPO = Path(__file__).resolve().parents[1]


def ray_job_submit(cluster: LocalCluster, entrypoint: list[str],
                   resources: dict[str, float] | None = None,
                   timeout: float = 1800) -> tuple[int, str]:
    """Submit ``entrypoint`` with ``ray job submit --working-dir <repo>`` exactly as a user
    does (the token comes from the cluster's env), stream its output, return (code, text)."""
    env = {**os.environ, **cluster.env(),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--working-dir", str(REPO)]
    if resources:
        cmd += ["--entrypoint-resources", json.dumps(resources)]
    cmd += ["--", *entrypoint]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=REPO)
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            lines.append(line)
            text = line.rstrip()
            # The job's own output; Ray's timestamped INFO lines about the submission are noise.
            if text and (not text.startswith("20") or "RAYPLANE" in text):
                console.print(f"  {text}", style="dim", highlight=False, markup=False)
            if time.monotonic() > deadline:
                proc.kill()
                raise UserError(f"job {' '.join(entrypoint)} took longer than {timeout:.0f}s")
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        raise
    return code, "".join(lines)


def run_smoke_jobs(cluster: LocalCluster) -> dict[str, dict]:
    results = {}
    for pool in cluster.catalog.pools:
        console.print(f"[bold]smoke job on pool {pool.name}[/bold] "
                      f"(ray job submit --entrypoint-resources '{{\"{pool.ray_resource}\": 1}}')")
        code, out = ray_job_submit(cluster, ["python", "-m", "raycluster.smoke", "--pool",
                                             pool.name], resources={pool.ray_resource: 1},
                                   timeout=600)
        line = next((l for l in out.splitlines() if "RAYPLANE_SMOKE" in l), None)
        if code != 0 or line is None:
            raise UserError(f"smoke job on pool {pool.name} failed (exit {code}); "
                            f"see `ray job logs` on {cluster.dashboard_url}")
        results[pool.name] = json.loads(line.split("RAYPLANE_SMOKE", 1)[1])
        console.print(f"  [green]ok[/green]: ran on the {pool.name} node")
    return results


@app.command("demo")
def demo_cmd(catalog_file: CatalogOpt = None, state_dir: StateOpt = None) -> None:
    """Bring the local platform up and run the main job on it (what `make demo` runs)."""
    cluster = LocalCluster.attach(state_dir)
    if not cluster.is_up():
        cluster = LocalCluster(state_dir, catalog_path=catalog_file)
        with console.status("starting the local platform") as spinner:
            cluster.up(progress=lambda msg: spinner.update(msg))
    console.print(f"[bold]local platform up[/bold]: {len(cluster.node_plan())} Ray nodes, "
                  "token auth on")
    run_smoke_jobs(cluster)
    console.print()
    _print_urls(cluster)
    console.print("stop it with: make down")

