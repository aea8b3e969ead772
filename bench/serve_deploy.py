"""The benchmark's apps on the local platform, deployed with serve's own deploy library
(``serve.deploy``): the OpenAI app in an ingress mode (``bench-router``, ``bench-direct``), the
same model on the ``triton`` engine behind the router (``bench-triton``: a Triton server the
replica starts) and the empty ``bench-floor`` app (bench/floor.py); removed again at the end,
keeping the cluster's other applications."""

from __future__ import annotations

import time
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

from bench.stats import pct
from raycluster.cli.serve import cluster_target
from raycluster.local import LocalCluster
from serve.config import ServeAppConfig
from serve.deploy import (
    ServeTarget,
    apply,
    at_target,
    client,
    deploy,
    merge_applications,
    public_url,
    remove_applications,
    render,
    wait_routes,
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
                 api_key_file: Path, name: str | None = None,
                 model_fields: dict | None = None) -> ServeAppConfig:
    """The OpenAI app over the bench's model folder, in ingress ``mode`` (``triton``: the
    router in front of the triton engine), named ``name`` (default ``bench-<mode>``), its
    model entry with ``model_fields`` on top."""
    engine = "triton" if mode == "triton" else "cpu"
    name = name or f"bench-{mode}"
    return ServeAppConfig.parse({
        "ingress": {"mode": "router" if mode == "triton" else mode},
        "name": name, "route_prefix": f"/{name}",
        "models": [{"name": MODEL, "source": str(folder), "pool": pool, "engine": engine,
                    "max_num_seqs": max_num_seqs,
                    "autoscaling": {"min_replicas": 1, "max_replicas": 1,
                                    "target_ongoing_requests": 16},
                    **(model_fields or {})}],
        "api_keys": {"file": str(api_key_file)},
    }, source=name)


def deploy_bench_app(state_dir: Path | None, folder: Path, mode: str, *, pool: str,
                     max_num_seqs: int) -> tuple[str, str]:
    """Deploy the OpenAI app in ingress ``mode``: (OpenAI base URL, API key)."""
    cluster, target = attach(state_dir)
    config = bench_config(mode=mode, folder=folder, pool=pool, max_num_seqs=max_num_seqs,
                          api_key_file=cluster.api_key_path)
    _, base_url = deploy(config, target, tracking_uri=cluster.mlflow_uri, timeout=600)
    return base_url, cluster.api_key_path.read_text().strip()


def deploy_floor_app(state_dir: Path | None, timeout: float = 120) -> str:
    """Serve's own floor on this cluster: ``bench.floor:app`` (a deployment that answers
    ``{}`` at once) behind the same proxy. Its latency is what any Serve app pays before doing
    work; the <= 5 ms goal is read against it. Returns its URL once RUNNING (PlatformError
    after ``timeout`` s)."""
    _, target = attach(state_dir)
    serve_client = client(target)
    details = serve_client.get_serve_details()
    app = {"name": "bench-floor", "route_prefix": "/bench-floor",
           "import_path": "bench.floor:app"}
    config = {**{k: details[k] for k in ("proxy_location", "http_options") if details.get(k)},
              "applications": [app]}
    serve_client.deploy_applications(merge_applications(details, config))
    wait_running(serve_client, "bench-floor", timeout=timeout)
    return f"{target.public_url}/bench-floor"


def floor_ms_p50(url: str, requests: int = 40, timeout: float = 60) -> float:
    """p50 of a keep-alive GET of the floor app (httpx, as the openai client uses);
    TimeoutError when the requests together take more than ``timeout`` s (each gives up
    after 10 s): an empty deployment answers in milliseconds."""
    import httpx

    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=10) as http:
        http.get(url).raise_for_status()
        times = []
        for _ in range(requests):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the floor app at {url} answered {len(times)} of "
                                   f"{requests} requests within {timeout:.0f}s")
            start = time.perf_counter()
            http.get(url).raise_for_status()
            times.append((time.perf_counter() - start) * 1000)
    return round(pct(times, 50), 2)


def remove_bench_apps(state_dir: Path | None) -> None:
    """Remove the bench's apps, keeping the cluster's other applications."""
    _, target = attach(state_dir)
    serve_client = client(target)
    # None deployed: nothing to do (redeploying the others, or with none shutting Serve down,
    # would touch apps the bench never had).
    if not any(a.startswith("bench-") for a in serve_client.get_serve_details()
               .get("applications") or {}):
        return
    # With the target, so its record (what `rayplane up` restores) drops them too.
    remove_applications(serve_client, lambda app: app.startswith("bench-"), target)


@dataclass(frozen=True)
class Variant:
    """One side of a lever (bench/serve_levers.py): environment variables of its app's
    ``runtime_env`` (Ray Serve's settings, read when a replica starts), a checkout whose code
    the replicas import first (``PYTHONPATH``; None: this one) and model fields."""

    name: str
    env: dict[str, str] = dataclass_field(default_factory=dict)
    source_path: Path | None = None
    model: dict = dataclass_field(default_factory=dict)


def deploy_variants(state_dir: Path | None, folder: Path, mode: str, variants: list[Variant],
                    *, pool: str, timeout: float = 300) -> tuple[dict[str, tuple[str, str]], str]:
    """Deploy one bench app per variant (``bench-<mode>-<variant>``) in one Serve config and
    wait until each runs and routes: ({variant: (app name, OpenAI base URL)}, API key)."""
    cluster, target = attach(state_dir)
    serve_client = client(target)
    rendered_apps, urls, prefixes, top = [], {}, [], {}
    for v in variants:
        name = f"bench-{mode}-{v.name}"
        config = bench_config(mode=mode, folder=folder, pool=pool, max_num_seqs=16,
                              api_key_file=cluster.api_key_path, name=name,
                              model_fields=v.model)
        config, rendered = render(config, tracking_uri=cluster.mlflow_uri)
        at_target(rendered, target)
        # The platform's proxy settings (its Serve port), as `rayplane serve up` deploys.
        top = {key: val for key, val in rendered.items() if key != "applications"}
        (app,) = rendered["applications"]
        env = {**(app.get("runtime_env") or {}).get("env_vars", {}), **v.env}
        if v.source_path is not None:
            env["PYTHONPATH"] = str(v.source_path)
        app["runtime_env"] = {**(app.get("runtime_env") or {}), "env_vars": env}
        rendered_apps.append(app)
        prefixes.append(config.route_prefix)
        urls[v.name] = (name, f"{public_url(rendered, target)}/{name}/v1")
    config = {**top, "applications": rendered_apps}
    apply(serve_client, target, merge_applications(serve_client.get_serve_details(), config))
    for name, _ in urls.values():
        wait_running(serve_client, name, timeout)
    wait_routes(target, prefixes)
    return urls, cluster.api_key_path.read_text().strip()


__all__ = ["MODEL", "Variant", "attach", "bench_config", "deploy_variants", "deploy_bench_app", "deploy_floor_app",
           "floor_ms_p50", "remove_bench_apps"]
