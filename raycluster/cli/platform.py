"""``rayplane up``, ``down``, ``status`` and ``env``: the local platform's commands, thin over
``raycluster.local.LocalCluster``. Plain functions; the root (``raycluster.cli``) registers
them."""

from __future__ import annotations

import json
import shlex
from concurrent.futures import ThreadPoolExecutor

import typer
from rich.markup import escape
from rich.table import Table

from raycluster.cli.common import CatalogOpt, JsonOpt, StateOpt, console, err_console
from raycluster.cli.serve import restore_applications
from raycluster.local import SERVE_PROXIES, LocalCluster
from raycluster.local.health import exit_code, platform_health
from raycluster.spec import SpecError

STATUS_STYLE = {"up": "green", "degraded": "yellow", "down": "bold red"}


def up_cmd(catalog_file: CatalogOpt = None, state_dir: StateOpt = None,
           workers_per_pool: int = typer.Option(2, min=1, max=8,
                                                help="KubeRay workers each local GPU-pool node "
                                                     "stands for."),
           metrics: bool = typer.Option(False, "--metrics", envvar="RAYPLANE_METRICS",
                                        help="A local Prometheus scraping every Ray node."),
           serve_proxy: str = typer.Option("haproxy", "--serve-proxy",
                                           envvar="RAYPLANE_SERVE_PROXY",
                                           help="Serve's HTTP ingress: haproxy (straight to "
                                                "the ingress replicas) or ray (Ray's Python "
                                                "proxy actor)."),
           ha: bool = typer.Option(False, "--ha", envvar="RAYPLANE_HA",
                                   help="Head fault tolerance: the GCS's state in a local "
                                        "Redis and a supervisor that restarts dead Ray nodes "
                                        "(as KubeRay with an external Redis).")) -> None:
    """Start the local platform: a multi-node Ray cluster (one node per pool), MLflow and
    PostgreSQL. On a platform that lost parts it brings them back, and the Serve applications
    deployed through rayplane with them."""
    if serve_proxy not in SERVE_PROXIES:
        raise SpecError(f"--serve-proxy: {serve_proxy!r} is not one of "
                        f"{', '.join(SERVE_PROXIES)}", field="--serve-proxy")
    cluster = LocalCluster(state_dir, catalog_path=catalog_file, workers_per_pool=workers_per_pool,
                           metrics=metrics, serve_proxy=serve_proxy, ha=ha)
    recorded = cluster.state()
    if recorded and any(p.alive() for p in recorded.processes):
        # A platform (or what is left of it) runs here: its ports and options hold.
        cluster = LocalCluster.attach(state_dir)
    if cluster.is_up():
        console.print("rayplane is already up")
    with console.status("starting the local platform") as spinner:
        if not cluster.is_up():
            cluster.up(progress=lambda msg: spinner.update(msg))
        # What was deployed through rayplane and is missing now (a head lost without --ha,
        # or applications Serve lost) is deployed again.
        restored = restore_applications(cluster, progress=spinner.update)
    if restored:
        console.print(f"restored Serve applications: {', '.join(restored)}")
    print_urls(cluster)


def down_cmd(state_dir: StateOpt = None) -> None:
    """Stop exactly the processes ``rayplane up`` started (by pid)."""
    cluster = LocalCluster.attach(state_dir)
    stopped = cluster.down()
    # A deliberate stop: the next `up` starts without the applications (a lost head keeps them).
    cluster.serve_record_path.unlink(missing_ok=True)
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


def status_cmd(state_dir: StateOpt = None,
               as_json: JsonOpt = False) -> None:
    """Health of every part (up, degraded or down, and why), nodes, pools and URLs of the local
    platform; exits 1 unless every part is up."""
    cluster = LocalCluster.attach(state_dir)
    # The nodes listing of status() and the probes at once: a hung dashboard costs one wait.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(cluster.status)
        health = platform_health(cluster)
        info = pending.result()
    ray = health["parts"].get("ray", {})
    info["nodes"] = (ray.get("details") or {}).get("nodes", info["nodes"])
    info["health"] = health
    code = exit_code(health)
    if as_json:
        print(json.dumps(info, indent=2))
        raise typer.Exit(code)
    if not health["parts"]:
        err_console.print("rayplane is not up (run `rayplane up`)")
        raise typer.Exit(1)
    if info["nodes"]:
        table = Table(title="rayplane local cluster")
        for col in ("pool", "role", "node", "resources"):
            table.add_column(col)
        for n in sorted(info["nodes"], key=lambda n: (not n["head"], n["pool"] or "")):
            table.add_row(n["pool"] or "?", "head" if n["head"] else "worker",
                          n["node_id"][:12], json.dumps(n["resources"]))
        console.print(table)
    console.print(health_table(health))
    print_urls(cluster, health)
    if code:
        err_console.print(f"rayplane is {health['status']}: {escape(health['reason'])}",
                          highlight=False)
    raise typer.Exit(code)


def health_table(health: dict) -> Table:
    """One row per part: its status (coloured) and the reason."""
    table = Table(title=f"rayplane health: {health['status']} ({health.get('seconds', 0)}s)")
    for col in ("part", "status", "reason"):
        table.add_column(col)
    for name, part in health["parts"].items():
        status = part["status"]
        table.add_row(name, f"[{STATUS_STYLE[status]}]{status}[/]", escape(part["reason"]))
    return table


def env_cmd(state_dir: StateOpt = None) -> None:
    """Shell exports for clients: eval "$(rayplane env)" then `ray job submit ...`."""
    cluster = LocalCluster.attach(state_dir)
    for key, value in cluster.env().items():
        print(f"export {key}={shlex.quote(value)}")


def print_urls(cluster: LocalCluster, health: dict | None = None) -> None:
    """Where the platform's parts answer (``health``: a report of ``platform_health``, probed
    here when not given): a part that does not answer is said to be down, with why."""
    health = health if health is not None else platform_health(cluster)
    parts = health["parts"]

    def line(label: str, part: str, where: str) -> None:
        found = parts.get(part)
        if found is None or found["status"] != "down":
            console.print(f"{label:<16}{where}", highlight=False)
        else:
            console.print(f"{label:<16}[red]down[/]: {escape(found['reason'])}", highlight=False)

    line("Ray dashboard", "ray", cluster.dashboard_url)
    line("MLflow UI", "mlflow", cluster.mlflow_uri)
    line("PostgreSQL", "postgres", f"{cluster.postgres.url}  (database agents; DSN file "
                                   f"{cluster.postgres.dsn_path})")
    if "redis" in parts:
        line("Redis (GCS FT)", "redis", f"127.0.0.1:{cluster.ports.get('redis')}")
    if cluster.metrics:
        line("Prometheus", "prometheus", cluster.prometheus_url)
    if "serve" in parts:
        sick = [f"{name} {p['status']}" for name, p in parts.items()
                if name.startswith("serve:") and p["status"] != "up"]
        line("Serve (OpenAI)", "serve", f"{cluster.serve_url}/v1  (ingress: "
                                        f"{cluster.serve_proxy}"
                                        + "".join(f"; {s}" for s in sick) + ")")
    else:
        console.print(f"{'Serve (OpenAI)':<16}not deployed (rayplane serve up; ingress "
                      f"{cluster.serve_proxy} at {cluster.serve_url})", highlight=False)
    for name, part in parts.items():
        if name.startswith("agents:") and part.get("url"):
            line("Agents API", name, part["url"].removesuffix("/ok"))
    console.print(f"cluster token   {cluster.token_path}")
    console.print(f"API key file    {cluster.api_key_path}")
    console.print('submit a job:   eval "$(rayplane env)"; '
                  "ray job submit --working-dir . -- python -m train.fit --config "
                  "train/configs/ci.yaml")


__all__ = ["down_cmd", "env_cmd", "health_table", "print_urls", "status_cmd", "up_cmd"]
