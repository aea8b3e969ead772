"""The platform tools as the model was trained on them (train/tools.py duplicates their
definitions: training may not import agents) are the tools the agents really declare."""

from __future__ import annotations

import json

from langchain_core.tools import StructuredTool
from langchain_core.utils.function_calling import convert_to_openai_tool

from agents import platform
from agents.graphs.tools import as_tool
from raycluster.catalog import load_catalog
from train import tools as train_tools
from train.tokenizer import tools_line


def _declared(context=None) -> list[dict]:
    return [convert_to_openai_tool(as_tool(t)) for t in platform.platform_tools(context)]


def test_pool_units_definition_is_the_live_tools():
    live = convert_to_openai_tool(StructuredTool.from_function(platform.bind(
        platform.pool_units, platform.PlatformContext("http://127.0.0.1:1"))))
    assert live == train_tools.POOL_UNITS_TOOL
    assert live["function"]["description"] == platform.pool_units.__doc__
    assert "pool_units" in train_tools.TOOL_NAMES


def test_agent_tool_list_is_what_the_tools_graph_declares():
    """Same names, order and definitions (jobs and registered_models from their signatures):
    the prompt the served model sees in the graph is one it was trained on."""
    declared = _declared(platform.PlatformContext("http://127.0.0.1:1"))
    assert declared == train_tools.AGENT_TOOLS
    assert [t["function"]["name"] for t in declared] == platform.TOOL_NAMES
    assert tools_line(declared) == tools_line(train_tools.AGENT_TOOLS)
    for name in ("jobs", "registered_models"):
        live = convert_to_openai_tool(StructuredTool.from_function(getattr(platform, name)))
        live["function"]["parameters"]["properties"].pop("context", None)
        mine = next(t for t in train_tools.AGENT_TOOLS if t["function"]["name"] == name)
        assert mine["function"]["description"] == live["function"]["description"]


class _Dashboard(platform.PlatformContext):
    """A dashboard whose node summary reports ``usage`` (Ray's per-node usage lines)."""

    usage: dict = {}

    def get_json(self, path: str):
        if path.startswith("/nodes"):
            return {"data": {"nodeLogicalResources": self.usage}}
        return {"data": {"result": {"result": [
            {"state": "ALIVE", "resources_total": {"pool:a100-mig": 2.0}}]}}}


def test_pool_units_result_has_the_live_shape():
    """The synthetic results the model learns from are, key for key and in order, what the
    live tool (agents.platform.pool_units) returns for the same cluster state."""
    ctx = _Dashboard("http://127.0.0.1:1")
    ctx.usage.update(node1="0.5/2.0 pool:a100-mig\n1.0/4.0 CPU")
    live = platform.pool_units("a100-mig", context=ctx)
    mine = train_tools.pool_units_result("a100-mig", total=2, used=0.5, nodes=1)
    assert json.dumps(live) == json.dumps(mine)
    ctx.usage.clear()  # no usage reported yet
    live = platform.pool_units("a100-mig", context=ctx)
    mine = train_tools.pool_units_result("a100-mig", total=2, used=None, nodes=1)
    assert json.dumps(live) == json.dumps(mine) and mine["free"] is None
    pools = [p.name for p in load_catalog().pools]
    for wrong in ("v100", "a100-mg"):
        assert train_tools.pool_units_result(wrong, pools=pools) == \
            platform.pool_units(wrong, context=ctx)
