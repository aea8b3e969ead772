"""The agents app's Ray Serve config: what ``rayplane agents up`` deploys locally and what a
KubeRay RayService carries as ``serveConfigV2``, from one :class:`~agents.spec.AgentsAppConfig`.

Pure functions, no Ray and no I/O, so the local and the EKS deployment are the same document.
They refuse a placement that could never run (a pool the catalog does not have, a priority
class it does not define, an MCP server without API keys) with a
:class:`~raycluster.spec.SpecError` naming the field, before anything is deployed.

- The API application (``agents.server.app:build_agents_app``, its ``args`` the whole config):
  one ingress deployment, ``AgentsApi``, on the config's pool.
- The MCP application (``agents.mcp_server:build_mcp_app``) when ``mcp.enabled``: the platform
  tools behind the same API keys, always on the CPU pool of the Ray head (a light server that
  reads cluster state has no use for a GPU unit of its own).

Placement follows the catalog's convention (``serve.builder``): a replica asks for the pool's
resource ``pool:<name>``, which counts cores on the CPU pool and GPU units on a GPU pool. On a
GPU pool an API replica takes one unit and no Ray CPUs (locally those nodes have ``num-cpus 0``;
on EKS the unit's share of the node comes with it): hard isolation for critical agents.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from agents.spec import AgentsAppConfig
from raycluster.catalog import Catalog, Pool, load_catalog
from raycluster.spec import SpecError, did_you_mean

#: The local platform's agents config (``rayplane agents up`` without a file).
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "local.yaml"
#: The API application's builder (``import_path``) and its ingress deployment.
API_IMPORT_PATH = "agents.server.app:build_agents_app"
API_DEPLOYMENT = "AgentsApi"
#: The MCP application's builder and deployment (``agents.mcp_server``; not imported here:
#: it loads Ray Serve and the MCP SDK, which rendering has no need of).
MCP_IMPORT_PATH = "agents.mcp_server:build_mcp_app"
MCP_DEPLOYMENT = "mcp"
MCP_CPUS = 0.1
#: Name of the MCP application beside an agents app called ``name``.
MCP_APP_SUFFIX = "-mcp"
#: Namespace of agent workloads on Kubernetes, whose default priority class (critical-agents)
#: agent replicas take on whichever pool they run.
AGENTS_NAMESPACE = "agentic"


def agents_pool(config: AgentsAppConfig, catalog: Catalog) -> Pool:
    """The pool the API replicas run on; SpecError naming ``pool`` and the valid pools."""
    return catalog.pool(config.pool, "pool")


def priority_class(config: AgentsAppConfig, catalog: Catalog) -> str:
    """The Kubernetes priority class of the agents' pods: the config's, else the agents
    namespace's default (critical-agents: agent graphs sit on a user's request path, on the
    CPU pool and on the MIG pool alike), else the pool's."""
    names = [pc.name for pc in catalog.priority_classes]
    if config.priority_class is not None:
        if names and config.priority_class not in names:
            raise SpecError(f"priority_class: {config.priority_class!r} is not a priority class"
                            f"{did_you_mean(config.priority_class, names)}; valid: "
                            f"{', '.join(names)}", field="priority_class")
        return config.priority_class
    for ns in catalog.namespaces:
        if ns.name == AGENTS_NAMESPACE and ns.default_priority_class:
            return ns.default_priority_class
    return agents_pool(config, catalog).priority_class


def actor_options(pool: Pool, cpus: float) -> dict[str, Any]:
    """Ray actor options of one replica on ``pool``: ``cpus`` cores and as much of the pool
    resource on the CPU pool; one GPU unit and no Ray CPUs on a GPU pool."""
    if pool.has_gpu:
        return {"num_cpus": 0, "resources": {pool.ray_resource: 1.0}}
    return {"num_cpus": cpus, "resources": {pool.ray_resource: float(cpus)}}


def replica_options(config: AgentsAppConfig, catalog: Catalog | None = None) -> dict[str, Any]:
    """:func:`actor_options` of the spec's pool, for code that binds deployments itself (the
    API's and the frameworks' builders); the catalog defaults to the nodes' own
    (``RAYPLANE_CATALOG``, else the platform's)."""
    if catalog is None:
        catalog = load_catalog(os.environ.get("RAYPLANE_CATALOG"))
    return actor_options(agents_pool(config, catalog), config.cpus)


def api_application(config: AgentsAppConfig, catalog: Catalog,
                    env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    """The API application of a Serve config (``applications: [...]``)."""
    pool = agents_pool(config, catalog)
    app: dict[str, Any] = {
        "name": config.name,
        "route_prefix": config.route_prefix,
        "import_path": API_IMPORT_PATH,
        "args": config.model_dump(mode="json"),
        "deployments": [{
            "name": API_DEPLOYMENT,
            "max_ongoing_requests": config.max_ongoing_requests,
            "autoscaling_config": config.autoscaling.serve_options(),
            "ray_actor_options": actor_options(pool, config.cpus),
        }],
    }
    if env_vars:
        app["runtime_env"] = {"env_vars": dict(sorted(env_vars.items()))}
    return app


def mcp_app_name(config: AgentsAppConfig) -> str:
    return f"{config.name}{MCP_APP_SUFFIX}"


def mcp_application(config: AgentsAppConfig, catalog: Catalog,
                    env_vars: dict[str, str] | None = None) -> dict[str, Any] | None:
    """The MCP application beside the API (None when ``mcp.enabled`` is false): the same API
    keys, one replica on the head's CPU pool; the MLflow URI of the config, if it names one."""
    if not config.mcp.enabled:
        return None
    if config.api_keys is None:
        raise SpecError("mcp.enabled: the MCP server refuses to run without API keys; name "
                        "api_keys or set mcp.enabled: false", field="mcp.enabled")
    platform = {"mlflow_uri": config.mlflow_tracking_uri} if config.mlflow_tracking_uri else {}
    app: dict[str, Any] = {
        "name": mcp_app_name(config),
        "route_prefix": config.mcp.route_prefix,
        "import_path": MCP_IMPORT_PATH,
        "args": {"api_keys": config.api_keys.model_dump(exclude_none=True),
                 "platform": platform},
        "deployments": [{
            "name": MCP_DEPLOYMENT,
            "num_replicas": 1,
            "ray_actor_options": actor_options(catalog.head_pool, MCP_CPUS),
        }],
    }
    if env_vars:
        app["runtime_env"] = {"env_vars": dict(sorted(env_vars.items()))}
    return app


def applications(config: AgentsAppConfig, catalog: Catalog,
                 env_vars: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The API application and, when enabled, the MCP application. ``env_vars`` go into
    both applications' ``runtime_env``: what the replicas need to find the platform (model
    endpoint, MLflow, the checkpointer's DSN, the Ray dashboard) where the nodes lack it."""
    priority_class(config, catalog)  # refuse an unknown class before anything is deployed
    apps = [api_application(config, catalog, env_vars)]
    mcp = mcp_application(config, catalog, env_vars)
    if mcp is not None:
        apps.append(mcp)
    return apps


def serve_config(config: AgentsAppConfig, catalog: Catalog, *, host: str = "0.0.0.0",
                 port: int = 8000, proxy_location: str = "EveryNode",
                 env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    """The whole Ray Serve config (``serve deploy`` / ``serveConfigV2``) of the agents app."""
    return {
        "proxy_location": proxy_location,
        "http_options": {"host": host, "port": port},
        "applications": applications(config, catalog, env_vars),
    }


def app_names(config: AgentsAppConfig) -> list[str]:
    """Names of the Serve applications an agents config deploys."""
    return [config.name, *([mcp_app_name(config)] if config.mcp.enabled else [])]


__all__ = [
    "AGENTS_NAMESPACE",
    "API_DEPLOYMENT",
    "API_IMPORT_PATH",
    "DEFAULT_CONFIG",
    "MCP_DEPLOYMENT",
    "MCP_IMPORT_PATH",
    "actor_options",
    "replica_options",
    "agents_pool",
    "api_application",
    "app_names",
    "applications",
    "mcp_app_name",
    "mcp_application",
    "priority_class",
    "serve_config",
]
