"""``rayplane up``, ``down``, ``status`` and ``env``: the local platform's commands, thin over
``raycluster.local.LocalCluster``. Plain functions; the root (``raycluster.cli``) registers
them."""

from __future__ import annotations

import json
import shlex

import typer
from rich.table import Table

from raycluster.cli.common import CatalogOpt, JsonOpt, StateOpt, console, err_console
from raycluster.local import SERVE_PROXIES, LocalCluster
from raycluster.spec import SpecError


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
                                                "proxy actor).")) -> None:
    """Start the local platform: a multi-node Ray cluster (one node per pool), MLflow and
    PostgreSQL."""
    if serve_proxy not in SERVE_PROXIES:
        raise SpecError(f"--serve-proxy: {serve_proxy!r} is not one of "
                        f"{', '.join(SERVE_PROXIES)}", field="--serve-proxy")
    cluster = LocalCluster(state_dir, catalog_path=catalog_file, workers_per_pool=workers_per_pool,
                           metrics=metrics, serve_proxy=serve_proxy)
    if cluster.is_up():
        console.print("rayplane is already up")
    else:
        with console.status("starting the local platform") as spinner:
            cluster.up(progress=lambda msg: spinner.update(msg))
    print_urls(cluster)


def down_cmd(state_dir: StateOpt = None) -> None:
    """Stop exactly the processes ``rayplane up`` started (by pid)."""
    cluster = LocalCluster.attach(state_dir)
    stopped = cluster.down()
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


def status_cmd(state_dir: StateOpt = None,
               as_json: JsonOpt = False) -> None:
    """Nodes, pools and URLs of the local platform."""
    cluster = LocalCluster.attach(state_dir)
    info = cluster.status()
    if as_json:
        print(json.dumps(info, indent=2))
        return
    if not info["up"]:
        err_console.print("rayplane is not up (run `rayplane up`)")
        raise typer.Exit(1)
    table = Table(title="rayplane local cluster")
    for col in ("pool", "role", "node", "resources"):
        table.add_column(col)
    for n in sorted(info["nodes"], key=lambda n: (not n["head"], n["pool"] or "")):
        table.add_row(n["pool"] or "?", "head" if n["head"] else "worker", n["node_id"][:12],
                      json.dumps(n["resources"]))
    console.print(table)
    print_urls(cluster)


def env_cmd(state_dir: StateOpt = None) -> None:
    """Shell exports for clients: eval "$(rayplane env)" then `ray job submit ...`."""
    cluster = LocalCluster.attach(state_dir)
    for key, value in cluster.env().items():
        print(f"export {key}={shlex.quote(value)}")


def print_urls(cluster: LocalCluster) -> None:
    """Where the platform's parts answer, and how to submit a job to it."""
    console.print(f"Ray dashboard   {cluster.dashboard_url}")
    console.print(f"MLflow UI       {cluster.mlflow_uri}")
    console.print(f"PostgreSQL      {cluster.postgres.url}  (database agents; DSN file "
                  f"{cluster.postgres.dsn_path})")
    if cluster.metrics:
        console.print(f"Prometheus      {cluster.prometheus_url}")
    console.print(f"Serve (OpenAI)  {cluster.serve_url}/v1  (ingress: {cluster.serve_proxy})")
    console.print(f"cluster token   {cluster.token_path}")
    console.print(f"API key file    {cluster.api_key_path}")
    console.print('submit a job:   eval "$(rayplane env)"; '
                  "ray job submit --working-dir . -- python -m train.fit --config "
                  "train/configs/ci.yaml")


__all__ = ["down_cmd", "env_cmd", "print_urls", "status_cmd", "up_cmd"]
