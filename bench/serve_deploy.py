"""The benchmark's apps on the local platform, deployed with serve's own deploy library
(``serve.deploy``): the OpenAI app in an ingress mode (``bench-router``, ``bench-direct``), the
same model on the ``triton`` engine behind the router (``bench-triton``: a Triton server the
replica starts) and the empty ``bench-floor`` app (bench/floor.py); removed again at the end,
keeping the cluster's other applications."""

from __future__ import annotations

import time
from pathlib import Path

from bench.stats import pct
from raycluster.cli.serve import cluster_target
from raycluster.local import LocalCluster
from serve.config import ServeAppConfig
from serve.deploy import (
    ServeTarget,
    client,
    deploy,
    merge_applications,
    remove_applications,
    wait_running,
)

MODEL = "tiny-chat"


def attach(state_dir: Path | None) -> tuple[LocalCluster, ServeTarget]:
    """The local platform in ``state_dir`` and its Serve target (SystemExit when none)."""
    cluster = LocalCluster.attach(state_dir)
    if cluster.state() is None:
        raise SystemExit("the local platform is not up: run `rayplane up` (or --skip-serve)")
    return cluster, cluster_target(cluster)


def bench_config(*, mode: str, folder: Path, pool: str, max_num_seqs: int,
                 api_key_file: Path) -> ServeAppConfig:
    """The OpenAI app over the bench's model folder, in ingress ``mode`` (``triton``: the
    router in front of the triton engine)."""
    engine = "triton" if mode == "triton" else "cpu"
    return ServeAppConfig.parse({
        "ingress": {"mode": "router" if mode == "triton" else mode},
        "name": f"bench-{mode}", "route_prefix": f"/bench-{mode}",
        "models": [{"name": MODEL, "source": str(folder), "pool": pool, "engine": engine,
                    "max_num_seqs": max_num_seqs,
                    "autoscaling": {"min_replicas": 1, "max_replicas": 1,
                                    "target_ongoing_requests": 16}}],
        "api_keys": {"file": str(api_key_file)},
    }, source=f"bench-{mode}")


def deploy_bench_app(state_dir: Path | None, folder: Path, mode: str, *, pool: str,
                     max_num_seqs: int) -> tuple[str, str]:
    """Deploy the OpenAI app in ingress ``mode``: (OpenAI base URL, API key)."""
    cluster, target = attach(state_dir)
    config = bench_config(mode=mode, folder=folder, pool=pool, max_num_seqs=max_num_seqs,
                          api_key_file=cluster.api_key_path)
    _, base_url = deploy(config, target, tracking_uri=cluster.mlflow_uri, timeout=600)
    return base_url, cluster.api_key_path.read_text().strip()


def deploy_floor_app(state_dir: Path | None) -> str:
    """Serve's own floor on this cluster: ``bench.floor:app`` (a deployment that answers
    ``{}`` at once) behind the same proxy. Its latency is what any Serve app pays before doing
    work; the <= 5 ms goal is read against it. Returns its URL."""
    _, target = attach(state_dir)
    serve_client = client(target)
    details = serve_client.get_serve_details()
    app = {"name": "bench-floor", "route_prefix": "/bench-floor",
           "import_path": "bench.floor:app"}
    config = {**{k: details[k] for k in ("proxy_location", "http_options") if details.get(k)},
              "applications": [app]}
    serve_client.deploy_applications(merge_applications(details, config))
    wait_running(serve_client, "bench-floor", timeout=120)
    return f"{target.public_url}/bench-floor"


def floor_ms_p50(url: str, requests: int = 40) -> float:
    """p50 of a keep-alive GET of the floor app (httpx, as the openai client uses)."""
    import httpx

    with httpx.Client(timeout=30) as http:
        http.get(url).raise_for_status()
        times = []
        for _ in range(requests):
            start = time.perf_counter()
            http.get(url).raise_for_status()
            times.append((time.perf_counter() - start) * 1000)
    return round(pct(times, 50), 2)


def remove_bench_apps(state_dir: Path | None) -> None:
    """Remove the bench's apps, keeping the cluster's other applications."""
    _, target = attach(state_dir)
    remove_applications(client(target), lambda app: app.startswith("bench-"))


__all__ = ["MODEL", "attach", "bench_config", "deploy_bench_app", "deploy_floor_app",
           "floor_ms_p50", "remove_bench_apps"]
