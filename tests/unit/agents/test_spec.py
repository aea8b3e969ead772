"""The agents app's spec: what a user writes in agents/configs/*.yaml, and the one-line errors
a wrong file gets (the field named, what is valid)."""

from __future__ import annotations

import pytest

from agents.spec import AgentsAppConfig
from raycluster.spec import SpecError

KEYS = {"api_keys": {"file": "/etc/rayplane/api-keys"}}


def test_defaults_host_tools_and_ops_on_the_cpu_pool():
    config = AgentsAppConfig.parse(KEYS)
    assert config.graphs == ["tools", "ops"]
    assert (config.pool, config.route_prefix, config.mcp.route_prefix) == ("cpu", "/agents", "/mcp")
    assert config.model.model == "rayplane-tool-llm" and config.model.timeout_s == 30
    assert config.tool_errors == "continue" and config.step_limit == 6


def test_keys_are_required_unless_said_explicitly():
    with pytest.raises(SpecError, match="api_keys: required"):
        AgentsAppConfig.parse({})
    assert AgentsAppConfig.parse({"allow_unauthenticated": True}).api_keys is None
    with pytest.raises(SpecError, match="contradicts api_keys"):
        AgentsAppConfig.parse({**KEYS, "allow_unauthenticated": True})


@pytest.mark.parametrize("data, field, valid", [
    ({"graphs": ["tools", "chat"]}, "graphs", "tools"),
    ({"route_prefix": "agents"}, "route_prefix", "start with '/'"),
    ({"model": {"base_url": "localhost:8000/v1"}}, "model.base_url", "http"),
    ({"model": {"timeout_s": 0}}, "model.timeout_s", "greater than 0"),
    ({"checkpointer": {"dsn_env": "my-dsn"}}, "checkpointer.dsn_env", "environment variable"),
    ({"tool_errors": "ignore"}, "tool_errors", "continue"),
    ({"step_limit": 0}, "step_limit", "1"),
    ({"modle": {}}, "modle", "model"),
])
def test_a_wrong_field_is_named_with_what_is_valid(data, field, valid):
    with pytest.raises(SpecError) as err:
        AgentsAppConfig.parse({**KEYS, **data}, source="agents.yaml")
    message = str(err.value)
    assert "\n" not in message
    assert field in message and valid in message


def test_contradictions_are_refused():
    with pytest.raises(SpecError, match="names a graph twice"):
        AgentsAppConfig.parse({**KEYS, "graphs": ["tools", "tools"]})
    with pytest.raises(SpecError, match="mcp.route_prefix"):
        AgentsAppConfig.parse({**KEYS, "route_prefix": "/mcp"})
    with pytest.raises(SpecError, match="use_in_graphs"):
        AgentsAppConfig.parse({**KEYS, "mcp": {"enabled": False, "use_in_graphs": True}})
