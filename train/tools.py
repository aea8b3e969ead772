"""The tools of the synthetic tool-use task: their OpenAI definitions and real implementations.

The model learns to call exactly these tools; the agent graphs run the same
implementations, so a call the model emits and the result the graph feeds back have the shape
the model was trained on. One of them reads the live cluster and so lives with the agents
(``pool_units``, agents/platform.py): here are its definition and result shape only. Results are compact JSON objects; numbers are formatted by
``format_number`` so that the model only ever copies them, never computes them.
"""

from __future__ import annotations

import ast
import json
import operator
from functools import cache
from typing import Any

#: OpenAI ``tools=[...]`` definitions, in the order the chat template lists them.
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression with + - * / and parentheses.",
        "parameters": {"type": "object", "properties": {
            "expression": {"type": "string", "description": "e.g. 12*7 or (3+4)*5"}},
            "required": ["expression"]}}},
    {"type": "function", "function": {
        "name": "convert_units",
        "description": "Convert a value between units of length, mass, time or data size.",
        "parameters": {"type": "object", "properties": {
            "value": {"type": "number"},
            "from_unit": {"type": "string", "description": "unit symbol, e.g. km"},
            "to_unit": {"type": "string", "description": "unit symbol, e.g. m"}},
            "required": ["value", "from_unit", "to_unit"]}}},
    {"type": "function", "function": {
        "name": "pool_info",
        "description": "A fact about one of the cluster's node pools.",
        "parameters": {"type": "object", "properties": {
            "pool": {"type": "string", "description": "pool name, e.g. a100-mig"},
            "fact": {"type": "string",
                     "enum": ["gpu", "sharing", "memory", "units", "nodes"]}},
            "required": ["pool", "fact"]}}},
]

#: The live platform tool the model also learns to call. Its implementation reads the cluster
#: (``agents.platform.pool_units``: free/total units from Ray's state API), which training
#: cannot import; the definition is the one the agents declare, word for word (a unit test in
#: tests/unit/agents holds the two equal), and :func:`pool_units_result` has its result shape.
POOL_UNITS_TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "pool_units",
    "description": ("Live capacity of one node pool: its total, used and free units right now "
                    "(GPU units --\n    whole GPUs, time-slice replicas or MIG instances -- on a "
                    "GPU pool, CPUs on the cpu pool)."),
    "parameters": {"type": "object", "properties": {
        "pool": {"description": "pool name, e.g. a100-mig, a100-timeslice, cpu",
                 "type": "string"}},
        "required": ["pool"]}}}
TOOLS.append(POOL_UNITS_TOOL)

TOOL_NAMES = [t["function"]["name"] for t in TOOLS]

#: The other platform tools, as the agents declare them (agents/platform.py: ``jobs``,
#: ``registered_models``). The model never calls them, but the ``tools`` graph lists them in
#: every prompt, so training renders that prompt too.
_JOBS_TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "jobs",
    "description": ("Ray jobs of the cluster, running ones and the most recent: submission id, "
                    "status,\n    entrypoint and start/end time (ISO 8601, UTC)."),
    "parameters": {"type": "object", "properties": {
        "limit": {"default": 10, "description": "how many jobs, newest first (at most 100)",
                  "type": "integer"}}}}}
_REGISTERED_MODELS_TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "registered_models",
    "description": ("Models in the platform's MLflow registry with their versions, aliases "
                    "(champion,\n    candidate) and the evaluation metric (eval_exact_match) "
                    "their training run logged."),
    "parameters": {"type": "object", "properties": {
        "name": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None,
                 "description": "one registered model, or all when omitted"}}}}}

#: The tools the agents' ``tools`` graph declares with the platform's tool list
#: (``agents.platform.platform_tools``), in its order: the prompt the served model sees there.
AGENT_TOOLS: list[dict[str, Any]] = [
    POOL_UNITS_TOOL, _JOBS_TOOL, _REGISTERED_MODELS_TOOL,
    *(t for t in TOOLS if t is not POOL_UNITS_TOOL)]

# Units by dimension, in the dimension's base unit (m, g, s, byte).
UNITS: dict[str, dict[str, float]] = {
    "length": {"mm": 0.001, "cm": 0.01, "m": 1.0, "km": 1000.0, "in": 0.0254, "ft": 0.3048,
               "mi": 1609.344},
    "mass": {"g": 1.0, "kg": 1000.0, "lb": 453.59237, "oz": 28.349523125},
    "time": {"s": 1.0, "min": 60.0, "h": 3600.0, "day": 86400.0},
    "data": {"KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KiB": 1024.0, "MiB": 1024.0**2,
             "GiB": 1024.0**3},
}
UNIT_DIMENSION = {u: dim for dim, table in UNITS.items() for u in table}

POOL_FACTS = ("gpu", "sharing", "memory", "units", "nodes")

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv}


def format_number(x: float) -> int | float:
    """Integers stay integers; other values keep at most 2 decimals (what answers quote)."""
    if isinstance(x, bool):
        raise TypeError("not a number")
    if float(x).is_integer() and abs(x) < 1e15:
        return int(x)
    value = round(float(x), 2)
    if value.is_integer():
        return int(value)
    return value


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) \
            and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.left), _eval(node.right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval(node.operand)
    raise ValueError("only numbers, + - * / and parentheses are allowed")


def calculator(expression: str) -> dict[str, Any]:
    """``{"result": n}`` or ``{"error": ...}``; never runs anything but arithmetic."""
    if not isinstance(expression, str) or len(expression) > 200:
        return {"error": "expression must be a string of at most 200 characters"}
    try:
        return {"result": format_number(_eval(ast.parse(expression, mode="eval")))}
    except ZeroDivisionError:
        return {"error": "division by zero"}
    except (SyntaxError, ValueError, TypeError):
        return {"error": f"cannot evaluate {expression!r}"}


def convert_units(value: float, from_unit: str, to_unit: str) -> dict[str, Any]:
    for unit in (from_unit, to_unit):
        if unit not in UNIT_DIMENSION:
            return {"error": f"unknown unit {unit!r}"}
    if UNIT_DIMENSION[from_unit] != UNIT_DIMENSION[to_unit]:
        return {"error": f"cannot convert {from_unit} to {to_unit}"}
    table = UNITS[UNIT_DIMENSION[from_unit]]
    return {"result": format_number(float(value) * table[from_unit] / table[to_unit])}


@cache
def pool_facts() -> dict[str, dict[str, Any]]:
    """Facts of the platform's pools, derived from the catalog (never typed twice)."""
    from raycluster.catalog import load_catalog

    facts = {}
    for pool in load_catalog().pools:
        model = pool.gpu_model
        if pool.sharing.mig_profile:
            sharing = f"MIG {pool.sharing.mig_profile}"
        elif pool.sharing.replicas:
            sharing = f"time-slicing x{pool.sharing.replicas}"
        else:
            sharing = "none"
        facts[pool.name] = {
            "gpu": model.name if model else "none",
            "sharing": sharing,
            "memory": format_number(round(pool.memory_per_unit_gb, 1)),
            "units": pool.gpu_units_per_node,
            "nodes": pool.max_nodes,
        }
    return facts


def pool_info(pool: str, fact: str) -> dict[str, Any]:
    facts = pool_facts()
    if fact not in POOL_FACTS:
        return {"error": f"unknown fact {fact!r}"}
    if pool not in facts:
        return {"error": f"unknown pool {pool!r}"}
    return {"pool": pool, fact: facts[pool][fact]}


def pool_units_result(pool: str, *, unit: str = "gpu_units", total: float = 0.0,
                      used: float | None = 0.0, nodes: int = 0,
                      pools: list[str] | None = None) -> dict[str, Any]:
    """A result of the live ``pool_units`` tool for a cluster in the given state, in exactly
    the shape (keys, their order, number format) agents.platform returns: ``used=None`` is a
    cluster that has not reported usage yet; a pool not in ``pools`` is an error."""
    if pools is not None and pool not in pools:
        from raycluster.spec import did_you_mean

        return {"error": f"unknown pool {pool!r}{did_you_mean(pool, pools)}; pools: "
                         f"{', '.join(pools)}"}
    result: dict[str, Any] = {"pool": pool, "unit": unit, "total": format_number(total),
                              "used": None, "free": None, "nodes": nodes}
    if used is None:
        result["note"] = "the cluster has not reported usage yet"
    else:
        result.update(used=format_number(used), free=format_number(max(total - used, 0.0)))
    return result


#: Tools that run here; ``pool_units`` reads a live cluster (agents.platform).
IMPLEMENTATIONS = {"calculator": calculator, "convert_units": convert_units,
                   "pool_info": pool_info}


def run_tool(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """Run a tool call as the model emits it; unknown tools and bad arguments are results."""
    fn = IMPLEMENTATIONS.get(name)
    if fn is None:
        return {"error": f"unknown tool {name!r}"}
    try:
        return fn(**arguments)
    except TypeError as err:
        return {"error": f"bad arguments for {name}: {err}"}


def dumps(obj: Any) -> str:
    """The compact JSON of the chat format: ``{"name": "x", "arguments": {"a": 1}}``."""
    return json.dumps(obj, separators=(", ", ": "), ensure_ascii=False)
