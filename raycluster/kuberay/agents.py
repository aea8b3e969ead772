"""The agents app as a KubeRay RayService: its ``serveConfigV2`` is the agents config's Serve
config (``agents.serve_app``, the same document ``rayplane agents up`` deploys locally), its
head on the CPU pool, one worker group per pool its replicas use, its pods at the config's
priority (critical-agents by default), and what the replicas read wired from Secrets that
External Secrets fills: the checkpointer's DSN (the RDS database Terraform creates), the model
endpoint's API key, the app's own API keys, and the Ray token the platform tools send to the
dashboard."""

from __future__ import annotations

import math

from agents.serve_app import MCP_CPUS, agents_pool, priority_class, serve_config
from agents.spec import AgentsAppConfig
from raycluster.catalog import Catalog, Pool
from raycluster.environments import AgentsServiceSpec, Environment
from raycluster.kuberay.features import wire_agents_service
from raycluster.kuberay.objects import dns_name, ray_cluster_spec, rayservice_object
from raycluster.kuberay.pods import (
    AUTH_SECRET,
    AUTH_SECRET_KEY,
    api_key_wiring,
    check_worker_fits_pool,
    secret_env,
    secret_file,
)
from raycluster.kuberay.sizing import GroupShape
from raycluster.policy import DASHBOARD_PORT, SERVE_PORT
from raycluster.spec import SpecError

#: Secret (key ``dsn``) with the checkpointer's DSN, composed by External Secrets from the
#: password RDS manages (raycluster.render).
AGENTS_DB_SECRET = "rayplane-agents-db"
AGENTS_DB_SECRET_KEY = "dsn"
#: Where the DSN file is mounted when the config names no ``checkpointer.dsn_env``.
DB_FILE = "/var/run/secrets/rayplane/agents-db/dsn"
#: Secret (key ``api_key``) with a key of the OpenAI endpoint the graphs call.
MODEL_KEY_SECRET = "rayplane-agents-model-key"
MODEL_KEY_SECRET_KEY = "api_key"
#: The Ray token as a file, for the platform tools' dashboard calls (RAY_AUTH_TOKEN_PATH).
TOKEN_FILE = f"/var/run/secrets/ray/{AUTH_SECRET_KEY}"
_WHY_ENV = ("the agents config reads secrets from env variables (api_keys.env, "
            "checkpointer.dsn_env, model.api_key_env)")


def dashboard_url(name: str, namespace: str) -> str:
    """The RayService's dashboard as its pods reach it: KubeRay's ``<name>-head-svc``, which
    follows the active cluster across upgrades."""
    return f"http://{name}-head-svc.{namespace}.svc.cluster.local:{DASHBOARD_PORT}"


def agents_groups(catalog: Catalog, config: AgentsAppConfig, *, field: str
                  ) -> list[GroupShape]:
    """Worker groups the agents app needs: its pool, holding the API replicas at their
    autoscaling maximum (cores on the CPU pool, one GPU unit each on a GPU pool), and the CPU
    pool of the Ray head for the MCP server. Refuses more pods than a pool holds."""
    pool = agents_pool(config, catalog)
    auto = config.autoscaling
    cpu_need: dict[str, list[float]] = {}  # pool -> [min cores, max cores]
    unit_need: dict[str, list[int]] = {}  # pool -> [min units, max units]
    if pool.has_gpu:
        unit_need[pool.name] = [auto.min_replicas, auto.max_replicas]
    else:
        cpu_need[pool.name] = [auto.min_replicas * config.cpus, auto.max_replicas * config.cpus]
    if config.mcp.enabled:
        need = cpu_need.setdefault(catalog.head_pool.name, [0.0, 0.0])
        need[0] += MCP_CPUS
        need[1] += MCP_CPUS
    groups = []
    for name in sorted({*cpu_need, *unit_need}):
        p = catalog.pool(name)
        if p.has_gpu:
            low, high = (math.ceil(n / p.worker.gpu_units) for n in unit_need[name])
        else:
            if config.cpus > p.worker.cpus:
                raise SpecError(f"{field}.cpus: {config.cpus:g} cores per replica, but a worker "
                                f"of pool {name!r} has {p.worker.cpus}", field=f"{field}.cpus")
            low, high = (math.ceil(round(n, 6) / p.worker.cpus) for n in cpu_need[name])
        groups.append(_group(p, low, high, field=field))
    return groups


def _group(pool: Pool, min_pods: int, max_pods: int, *, field: str) -> GroupShape:
    units = pool.worker.gpu_units if pool.has_gpu else 0
    check_worker_fits_pool(pool, gpu_units=units, cpus=pool.worker.cpus,
                           memory_gib=pool.worker.memory_gib, field=f"{field}.pool({pool.name})")
    cap = pool.workers_per_node * pool.max_nodes
    if max_pods > cap:
        raise SpecError(f"{field}.autoscaling.max_replicas: the agents app needs up to "
                        f"{max_pods} workers of pool {pool.name!r}, which holds {cap}; lower "
                        "max_replicas or raise the pool's max_nodes",
                        field=f"{field}.autoscaling.max_replicas")
    return GroupShape(pool=pool, name=pool.name, gpu_units=units, cpus=pool.worker.cpus,
                      memory_gib=pool.worker.memory_gib, min_replicas=min_pods,
                      max_replicas=max(1, max_pods), idle_timeout_seconds=600, serve=True)


def wire_secrets(config: AgentsAppConfig, template: dict) -> None:
    """What an agents replica reads, from the Secrets External Secrets fills: the app's API
    keys, the checkpointer's DSN, the model endpoint's key and the Ray token (a file)."""
    if config.checkpointer.dsn_env:
        secret_env(template, config.checkpointer.dsn_env, AGENTS_DB_SECRET, AGENTS_DB_SECRET_KEY, why=_WHY_ENV)
    else:
        secret_file(template, DB_FILE, AGENTS_DB_SECRET, AGENTS_DB_SECRET_KEY, volume="agents-db")
        template["spec"]["containers"][0]["env"].append(
            {"name": "RAYPLANE_POSTGRES_DSN_FILE", "value": DB_FILE})
    model = config.model
    if model.api_key_file:
        secret_file(template, model.api_key_file, MODEL_KEY_SECRET, MODEL_KEY_SECRET_KEY,
                    volume="model-key")
    else:
        secret_env(template, model.api_key_env or "OPENAI_API_KEY", MODEL_KEY_SECRET,
                   MODEL_KEY_SECRET_KEY, why=_WHY_ENV)
    api_key_wiring(config.api_keys, template)
    secret_file(template, TOKEN_FILE, AUTH_SECRET, AUTH_SECRET_KEY, volume="ray-token")
    template["spec"]["containers"][0]["env"].append(
        {"name": "RAY_AUTH_TOKEN_PATH", "value": TOKEN_FILE})


def render_agents_service(catalog: Catalog, env: Environment, svc: AgentsServiceSpec,
                          config: AgentsAppConfig, field: str = "agents") -> dict:
    """The RayService of an agents config (SpecError naming the field for a placement that
    could never run)."""
    cfield = f"{field}.config({svc.config})"
    if config.model.base_url is None:
        raise SpecError(f"{cfield}.model.base_url: required on Kubernetes (pods have no "
                        "platform endpoint to default to), e.g. http://openai-gateway-svc."
                        "inference.svc.cluster.local:8000/v1", field=f"{cfield}.model.base_url")
    if config.api_keys is None:
        raise SpecError(f"{cfield}.allow_unauthenticated: an agents app on Kubernetes needs "
                        "api_keys", field=f"{cfield}.api_keys")
    name = dns_name(svc.name or config.name, f"{field}.name")
    try:
        priority = priority_class(config, catalog)
        # The platform tools read the dashboard at RAY_ADDRESS; KubeRay sets that variable to
        # the GCS address on every pod, so the apps' own runtime_env overrides it.
        rendered = serve_config(config, catalog, host="0.0.0.0", port=SERVE_PORT,
                                env_vars={"RAY_ADDRESS": dashboard_url(name, svc.namespace)})
    except SpecError as err:
        raise SpecError(f"{cfield}: {err}", field=err.field) from None
    groups = agents_groups(catalog, config, field=cfield)
    cluster = ray_cluster_spec(catalog, env, cluster=name, namespace=svc.namespace,
                               priority_class=priority, groups=groups,
                               gcs_fault_tolerance=svc.gcs_fault_tolerance, serve=True,
                               field=field)
    # Only workers run replicas (the head has num-cpus 0 and no pool resource): the secrets
    # go where they are read.
    for group in cluster["workerGroupSpecs"]:
        wire_secrets(config, group["template"])
    service = rayservice_object(env, svc, name, cluster, rendered, field=field)
    wire_agents_service(env, service)  # job_estimate: the feature store (and the -tf images)
    return service


__all__ = ["AGENTS_DB_SECRET", "AGENTS_DB_SECRET_KEY", "MODEL_KEY_SECRET",
           "MODEL_KEY_SECRET_KEY", "agents_groups", "dashboard_url", "render_agents_service",
           "wire_secrets"]
