"""Any agents config is either refused in one line naming the field, or renders a Ray Serve
config that Ray itself accepts (``ray.serve.schema.ServeDeploySchema``): the API application
and, when enabled, the MCP application beside it, on distinct routes, each replica asking for
its pool's resource. Configs are the two shipped ones (local, EKS) with a few fields changed
at random, to plausible values (graphs, pools, prefixes, autoscaling, keys) or hostile ones
(wrong types, negatives, unknown keys)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.serve_app import serve_config
from agents.spec import AgentsAppConfig
from raycluster.catalog import load_catalog
from raycluster.spec import SpecError

CONFIGS = Path(__file__).resolve().parents[3] / "agents" / "configs"
BASES = [yaml.safe_load((CONFIGS / name).read_text()) for name in ("local.yaml", "eks.yaml")]
CATALOG = load_catalog()
NAMES_FIELD = re.compile(r"^[a-z_]+[\[.:]")

HOSTILE = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(),
                    st.text(max_size=12), st.lists(st.integers(0, 3), max_size=2),
                    st.dictionaries(st.text(max_size=4), st.integers(0, 3), max_size=2))
PREFIX = st.sampled_from(["/agents", "/agents/", "/", "agents", "/mcp", "/a/b", ""])
FIELDS = {
    "name": st.sampled_from(["agents", "agents-2", "mcp", ""]),
    "route_prefix": PREFIX,
    "graphs": st.lists(st.sampled_from(["tools", "ops", "crewai", "autogen", "chat"]),
                       max_size=3),
    "model": st.fixed_dictionaries({}, optional={
        "base_url": st.sampled_from(["http://m:8000/v1", "ftp://m", "m:8000"]),
        "model": st.text(max_size=6), "api_key_env": st.sampled_from(["KEY", "1KEY", "A-B"]),
        "api_key_file": st.just("/k"), "timeout_s": st.floats(-1, 100),
        "max_retries": st.integers(-1, 9)}),
    "checkpointer": st.fixed_dictionaries({}, optional={
        "dsn_env": st.sampled_from(["DSN", "bad name"]), "pool_max_size": st.integers(0, 200),
        "timeout_s": st.floats(-1, 10)}),
    "mcp": st.fixed_dictionaries({}, optional={
        "enabled": st.booleans(), "route_prefix": PREFIX, "use_in_graphs": st.booleans()}),
    "pool": st.sampled_from([*CATALOG.by_name, "gpu"]),
    "priority_class": st.sampled_from(["critical-agents", "training", "vip", None]),
    "cpus": st.floats(-1, 8), "max_ongoing_requests": st.integers(-1, 500),
    "step_limit": st.integers(-1, 60), "tool_errors": st.sampled_from(["continue", "stop", "x"]),
    "autoscaling": st.fixed_dictionaries({}, optional={
        "min_replicas": st.integers(-1, 5), "max_replicas": st.integers(0, 5),
        "initial_replicas": st.integers(-1, 6), "target_ongoing_requests": st.floats(-1, 64)}),
    "api_keys": st.one_of(st.none(), st.fixed_dictionaries({}, optional={
        "env": st.sampled_from(["KEYS", "1BAD"]), "file": st.just("/etc/keys")})),
    "allow_unauthenticated": st.booleans(),
    "tracing": st.booleans(),
}


@st.composite
def agents_configs(draw) -> dict:
    """A shipped config with one or two fields changed, or an unknown one added."""
    doc = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 2))):
        key = draw(st.sampled_from([*FIELDS, "replicas"]))
        plausible = FIELDS.get(key, HOSTILE)
        doc[key] = draw(st.one_of(plausible, plausible, plausible, HOSTILE))
    return json.loads(json.dumps(doc))


def assert_refused_naming_the_field(err: SpecError) -> None:
    message = str(err)
    assert "\n" not in message, f"not one line: {message!r}"
    assert NAMES_FIELD.match(message), f"names no field: {message!r}"


@pytest.fixture(scope="module")
def deploy_schema():
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=agents_configs())
def test_an_agents_config_is_refused_naming_the_field_or_renders_what_ray_accepts(
        doc, deploy_schema):
    try:
        config = AgentsAppConfig.parse(doc)
        rendered = serve_config(config, CATALOG)
    except SpecError as err:
        assert_refused_naming_the_field(err)
        return
    deploy_schema.model_validate(rendered)
    apps = rendered["applications"]
    assert [a["name"] for a in apps][0] == config.name
    prefixes = [a["route_prefix"] for a in apps]
    assert len(set(prefixes)) == len(prefixes), f"two applications on one route: {prefixes}"
    assert all(p.startswith("/") for p in prefixes), prefixes
    for app in apps:
        for deployment in app["deployments"]:
            pool_resources = [k for k in deployment["ray_actor_options"]["resources"]
                              if k.startswith("pool:")]
            assert len(pool_resources) == 1, deployment
