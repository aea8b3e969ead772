"""The agents app's Serve config from its spec: the API application hands the builder the whole
config, its replicas sit on the config's pool by the catalog's rule, the MCP server runs beside
it behind the same keys, and a placement that could never run is refused with the field named,
before anything is deployed."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents.serve_app import (
    API_DEPLOYMENT,
    API_IMPORT_PATH,
    DEFAULT_CONFIG,
    MCP_DEPLOYMENT,
    MCP_IMPORT_PATH,
    app_names,
    applications,
    priority_class,
    serve_config,
)
from agents.spec import AgentsAppConfig
from raycluster.spec import SpecError

CONFIGS = Path(DEFAULT_CONFIG).parent


def config(**fields) -> AgentsAppConfig:
    return AgentsAppConfig.parse({"api_keys": {"file": "/keys"}, **fields})


def test_the_api_app_hands_its_builder_the_whole_config(catalog):
    cfg = AgentsAppConfig.from_file(DEFAULT_CONFIG)
    api, mcp = applications(cfg, catalog)
    assert (api["name"], api["route_prefix"], api["import_path"]) == (
        "agents", "/agents", "agents.server.app:build_agents_app")
    # The builder validates exactly what was rendered: nothing lost, nothing added.
    assert AgentsAppConfig.model_validate(api["args"]) == cfg
    (dep,) = api["deployments"]
    assert dep["name"] == "AgentsApi"
    assert dep["ray_actor_options"] == {"num_cpus": 0.5, "resources": {"pool:cpu": 0.5}}
    assert dep["max_ongoing_requests"] == cfg.max_ongoing_requests
    assert dep["autoscaling_config"]["min_replicas"] == 1
    assert dep["autoscaling_config"]["max_replicas"] == 2
    assert "runtime_env" not in api


def test_the_mcp_app_runs_beside_it_behind_the_same_keys(catalog):
    cfg = config(mlflow_tracking_uri="http://mlflow:5000")
    _, mcp = applications(cfg, catalog)
    assert (mcp["name"], mcp["route_prefix"], mcp["import_path"]) == (
        "agents-mcp", "/mcp", "agents.mcp_server:build_mcp_app")
    assert mcp["args"] == {"api_keys": {"file": "/keys"},
                           "platform": {"mlflow_uri": "http://mlflow:5000"}}
    (dep,) = mcp["deployments"]
    assert dep["name"] == "mcp" and dep["num_replicas"] == 1
    assert dep["ray_actor_options"] == {"num_cpus": 0.1, "resources": {"pool:cpu": 0.1}}
    assert app_names(cfg) == ["agents", "agents-mcp"]


def test_without_mcp_there_is_one_application(catalog):
    cfg = config(mcp={"enabled": False})
    assert [a["name"] for a in applications(cfg, catalog)] == ["agents"] == app_names(cfg)


def test_names_match_the_builders_they_point_at():
    """The import paths and deployment names are typed here (rendering must not load Ray
    Serve); they are the builders' own."""
    from agents import mcp_server
    from agents.server import app as server_app

    assert (API_IMPORT_PATH, API_DEPLOYMENT) == (server_app.IMPORT_PATH, server_app.DEPLOYMENT)
    assert (MCP_IMPORT_PATH, MCP_DEPLOYMENT) == (mcp_server.IMPORT_PATH, mcp_server.DEPLOYMENT)


def test_on_the_mig_pool_a_replica_takes_a_unit_at_critical_agents_priority(catalog):
    cfg = config(pool="a100-mig", cpus=2)
    api, mcp = applications(cfg, catalog)
    assert api["deployments"][0]["ray_actor_options"] == {
        "num_cpus": 0, "resources": {"pool:a100-mig": 1.0}}
    # The MCP server stays on the CPU pool: it has no use for a MIG instance.
    assert mcp["deployments"][0]["ray_actor_options"]["resources"] == {"pool:cpu": 0.1}
    # Not the MIG pool's own production-inference: agents keep theirs.
    assert catalog.pool("a100-mig").priority_class == "production-inference"
    assert priority_class(cfg, catalog) == "critical-agents"
    assert priority_class(config(), catalog) == "critical-agents"
    assert priority_class(config(priority_class="research"), catalog) == "research"


@pytest.mark.parametrize(("fields", "message"), [
    ({"pool": "a100mig"}, "pool: 'a100mig' is not a pool (did you mean 'a100-mig'?); valid: "
                          "cpu, a100-timeslice, a100-mig, h100-timeslice"),
    ({"priority_class": "critical-agent"},
     "priority_class: 'critical-agent' is not a priority class (did you mean "
     "'critical-agents'?)"),
])
def test_an_impossible_placement_is_one_line_naming_the_field(catalog, fields, message):
    with pytest.raises(SpecError) as err:
        serve_config(config(**fields), catalog)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_an_mcp_server_without_keys_is_refused_before_deploying(catalog):
    cfg = AgentsAppConfig.parse({"allow_unauthenticated": True})
    with pytest.raises(SpecError, match=r"^mcp\.enabled: the MCP server refuses to run "
                                        "without API keys"):
        applications(cfg, catalog)
    no_mcp = AgentsAppConfig.parse({"allow_unauthenticated": True, "mcp": {"enabled": False}})
    assert applications(no_mcp, catalog)[0]["args"]["api_keys"] is None


def test_the_platform_environment_reaches_both_apps(catalog):
    env = {"RAY_ADDRESS": "http://127.0.0.1:8265", "OPENAI_BASE_URL": "http://x/v1"}
    rendered = serve_config(config(), catalog, host="127.0.0.1", port=8123,
                            proxy_location="HeadOnly", env_vars=env)
    assert rendered["http_options"] == {"host": "127.0.0.1", "port": 8123}
    assert rendered["proxy_location"] == "HeadOnly"
    assert [a["runtime_env"] for a in rendered["applications"]] == [{"env_vars": env}] * 2


@pytest.mark.parametrize("name", ["local.yaml", "eks.yaml"])
def test_the_shipped_configs_render(catalog, name):
    cfg = AgentsAppConfig.from_file(CONFIGS / name)
    assert [a["name"] for a in applications(cfg, catalog)] == ["agents", "agents-mcp"]
    assert cfg.api_keys is not None and cfg.pool == "cpu"
    if name == "eks.yaml":
        assert cfg.model.base_url == "http://openai-gateway-svc.inference.svc.cluster.local:8000/v1"
        assert cfg.checkpointer.dsn_env == "RAYPLANE_AGENTS_DSN"
        assert cfg.api_keys.env == "RAYPLANE_API_KEYS"
    else:
        # The local platform's key file, as the OpenAI app reads it on the nodes.
        assert cfg.api_keys.file == "${RAYPLANE_STATE_DIR}/api_key"
