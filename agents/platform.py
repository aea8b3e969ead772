"""The platform's tools for agents: pools and their free GPU units, jobs, registered models,
plus the tools the served model was trained on (``train.tools``, their real implementations).

Every tool is a plain function with typed arguments and a docstring a model can read, and
returns a compact JSON-able dict; a failure is a result ``{"error": "..."}`` (a graph reports
it and goes on), never an exception. The platform tools reach the platform the way a user
does: the Ray dashboard's REST API with the cluster token, and MLflow's client.
:data:`PLATFORM_TOOLS` is the list that LangChain (``StructuredTool.from_function``) and the
MCP server (``agents/mcp_server.py``) wrap.

Annotations are evaluated at import (no ``from __future__ import annotations``) so that
``inspect.signature`` shows real types to LangChain and MCP.
"""

import functools
import inspect
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from raycluster.catalog import POOL_RESOURCE_PREFIX, load_catalog
from raycluster.errors import PlatformError
from raycluster.spec import did_you_mean
from train import tools as _train_tools

#: The tools the model was trained on, re-exported as they are (their real implementations).
calculator = _train_tools.calculator
convert_units = _train_tools.convert_units
pool_info = _train_tools.pool_info

ToolResult = dict[str, Any]

#: The variables ``rayplane env`` (``LocalCluster.env()``) exports; KubeRay pods set the same.
ADDRESS_ENV, TOKEN_PATH_ENV, MLFLOW_ENV = "RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", \
    "MLFLOW_TRACKING_URI"
CATALOG_ENV = "RAYPLANE_CATALOG"
#: Another feature_store.yaml than the platform's (features.store reads the same variable).
FEATURE_STORE_ENV = "RAYPLANE_FEATURE_STORE"


@dataclass(frozen=True)
class PlatformContext:
    """Where the platform is: the Ray dashboard URL, the headers that authenticate to it
    (``Authorization: Bearer <cluster token>``) and the MLflow tracking URI."""

    dashboard_url: str
    headers: dict[str, str] = field(default_factory=dict)
    mlflow_uri: str | None = None
    timeout: float = 10.0
    feature_store: str | None = None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "PlatformContext":
        """The context from ``RAY_ADDRESS`` (the dashboard's http URL), the token file at
        ``RAY_AUTH_TOKEN_PATH``, ``MLFLOW_TRACKING_URI`` and ``RAYPLANE_FEATURE_STORE``; a PlatformError (one line) when
        the address is missing or not a dashboard URL, or the token file is unreadable."""
        env = os.environ if environ is None else environ
        url = (env.get(ADDRESS_ENV) or "").strip()
        if not url:
            raise PlatformError(f"{ADDRESS_ENV} is not set; run `eval $(rayplane env)` (the local "
                                "platform) or set it to the Ray dashboard URL")
        if not url.startswith(("http://", "https://")):
            raise PlatformError(f"{ADDRESS_ENV}={url!r} is not the Ray dashboard's http URL "
                                "(e.g. http://127.0.0.1:8265)")
        headers = {}
        token_path = env.get(TOKEN_PATH_ENV)
        if token_path:
            try:
                token = Path(token_path).expanduser().read_text().strip()
            except OSError as err:
                raise PlatformError(f"cannot read the Ray token at {TOKEN_PATH_ENV}="
                                    f"{token_path}: {err.strerror or err}") from None
            headers["Authorization"] = f"Bearer {token}"
        return cls(dashboard_url=url.rstrip("/"), headers=headers,
                   mlflow_uri=env.get(MLFLOW_ENV) or None,
                   feature_store=env.get(FEATURE_STORE_ENV) or None)

    def get_json(self, path: str) -> Any:
        """GET ``path`` of the dashboard as JSON; PlatformError (one line) when it does not
        answer or answers with an error."""
        req = urllib.request.Request(f"{self.dashboard_url}{path}", headers=self.headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as err:
            hint = " (wrong or missing Ray token?)" if err.code in (401, 403) else ""
            raise PlatformError(f"the Ray dashboard at {self.dashboard_url} answered {err.code} "
                                f"on {path.split('?')[0]}{hint}") from None
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise PlatformError(f"no Ray dashboard answers at {self.dashboard_url} ({reason}); "
                                "is the platform up (`rayplane up`)?") from None


def _context(context: PlatformContext | None) -> PlatformContext:
    return context if context is not None else PlatformContext.from_env()


def _tool_errors(fn: Callable[..., ToolResult]) -> Callable[..., ToolResult]:
    """Turn the platform's errors into a result ``{"error": "<one line>"}``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> ToolResult:
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # a tool never kills a graph: it reports
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            return {"error": message}

    return wrapper


# -- pools ---------------------------------------------------------------------------------


def _pools() -> dict[str, bool]:
    """The catalog's pools (``RAYPLANE_CATALOG`` when the platform runs another catalog):
    name -> whether it is a GPU pool."""
    return {p.name: p.has_gpu for p in load_catalog(os.environ.get(CATALOG_ENV) or None).pools}


# "1.0/3.0 pool:a100-mig" or "0.0/3.0 pool:a100-mig (0.0 used of 1.0 reserved in placement
# groups)": one line of the autoscaler's per-node usage the dashboard's node summary carries.
_USAGE_LINE = re.compile(r"^\s*([0-9.e+-]+)/([0-9.e+-]+) (\S+)"
                         r"(?: \(([0-9.e+-]+) used of ([0-9.e+-]+) reserved in placement groups\))?")


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else round(float(x), 2)


def parse_pool_usage(node_usage: dict[str, str], resource: str) -> tuple[float, float, int]:
    """(total, used, nodes) of ``resource`` summed over the per-node usage text of the
    dashboard's node summary (Ray's ``parse_usage`` lines). A unit a placement group reserves
    counts as used whether or not a task in the group runs on it: nothing else can take it."""
    total = used = 0.0
    nodes = 0
    for lines in node_usage.values():
        for line in str(lines).splitlines():
            m = _USAGE_LINE.match(line)
            if not m or m.group(3) != resource:
                continue
            line_used, line_total = float(m.group(1)), float(m.group(2))
            if m.group(5) is not None:  # the summary shows reserved units as free; they are not
                line_used += float(m.group(5)) - float(m.group(4))
            total += line_total
            used += line_used
            nodes += 1
    return total, used, nodes


def _pool_usage(ctx: PlatformContext, resource: str) -> tuple[float, float, int, bool]:
    """(total, used, nodes, reported) of ``resource`` across the alive nodes, from the
    dashboard's node summary (the autoscaler's live per-node usage)."""
    data = ctx.get_json("/nodes?view=summary").get("data", {})
    # The dashboard's REST responses camelCase their keys (the usage text is a value).
    usage = data.get("nodeLogicalResources") or data.get("node_logical_resources") or {}
    if usage:
        return (*parse_pool_usage(usage, resource), True)
    # No usage reported (yet): totals from the state API, availability unknown.
    total, nodes = 0.0, 0
    state = ctx.get_json("/api/v0/nodes?limit=1000&detail=true")
    for node in state.get("data", {}).get("result", {}).get("result", []):
        if node.get("state") == "ALIVE" and resource in (node.get("resources_total") or {}):
            total += float(node["resources_total"][resource])
            nodes += 1
    return total, 0.0, nodes, False


@_tool_errors
def pool_units(
    pool: Annotated[str, Field(description="pool name, e.g. a100-mig, a100-timeslice, cpu")],
    *, context: PlatformContext | None = None,
) -> ToolResult:
    """Live capacity of one node pool: its total, used and free units right now (GPU units --
    whole GPUs, time-slice replicas or MIG instances -- on a GPU pool, CPUs on the cpu pool)."""
    pools = _pools()
    names = list(pools)
    if pool not in pools:
        return {"error": f"unknown pool {pool!r}{did_you_mean(pool, names)}; pools: "
                         f"{', '.join(names)}"}
    ctx = _context(context)
    resource = f"{POOL_RESOURCE_PREFIX}{pool}"
    total, used, nodes, reported = _pool_usage(ctx, resource)
    result: ToolResult = {"pool": pool, "unit": "gpu_units" if pools[pool] else "cpus", "total": _number(total),
                          "used": _number(used), "free": _number(max(total - used, 0.0)),
                          "nodes": nodes}
    if not reported:
        result.update(used=None, free=None, note="the cluster has not reported usage yet")
    return result


# -- jobs ----------------------------------------------------------------------------------


def _short(text: str | None, width: int = 80) -> str | None:
    if text is None or len(text) <= width:
        return text
    return text[: width - 3] + "..."


@_tool_errors
def jobs(
    limit: Annotated[int, Field(description="how many jobs, newest first (at most 100)")] = 10,
    *, context: PlatformContext | None = None,
) -> ToolResult:
    """Ray jobs of the cluster, running ones and the most recent: submission id, status,
    entrypoint and start/end time (ISO 8601, UTC)."""
    from datetime import UTC, datetime

    def when(ms: int | None) -> str | None:
        return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds") \
            if ms else None

    ctx = _context(context)
    listed = ctx.get_json("/api/jobs/")
    limit = max(1, min(int(limit), 100))
    # Running (and pending) first, then the newest.
    active = {"RUNNING", "PENDING"}
    listed = sorted(listed, key=lambda j: (j.get("status") not in active,
                                           -(j.get("start_time") or 0)))
    rows = [{"submission_id": j.get("submission_id") or j.get("job_id"),
             "status": j.get("status"),
             "entrypoint": _short(j.get("entrypoint")),
             "start_time": when(j.get("start_time")),
             "end_time": when(j.get("end_time"))} for j in listed[:limit]]
    return {"jobs": rows, "running": sum(1 for j in listed if j.get("status") == "RUNNING"),
            "total": len(listed)}


# -- registered models -----------------------------------------------------------------------

#: The metric ``train.fit`` logs on its run (and tags the registered version with).
EVAL_METRIC = "eval_exact_match"


@_tool_errors
def registered_models(
    name: Annotated[str | None, Field(description="one registered model, or all when omitted")]
    = None,
    *, context: PlatformContext | None = None,
) -> ToolResult:
    """Models in the platform's MLflow registry with their versions, aliases (champion,
    candidate) and the evaluation metric (eval_exact_match) their training run logged."""
    from train import tracking

    # MLflow alone needs no dashboard: without a context, only MLFLOW_TRACKING_URI is read.
    uri = context.mlflow_uri if context is not None else (os.environ.get(MLFLOW_ENV) or None)
    if not uri:
        return {"error": f"{MLFLOW_ENV} is not set; the platform's MLflow URI is printed by "
                         "`rayplane up` (`eval $(rayplane env)`)"}
    tracking.check_tracking_server(uri, field=MLFLOW_ENV)
    rows = tracking.list_models(uri, name or None)
    client = tracking.client(uri)
    models: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        metric = row.get("exact_match")
        if metric is None and row.get("run_id"):
            try:
                metric = client.get_run(row["run_id"]).data.metrics.get(EVAL_METRIC)
            except Exception:  # the run was deleted: the version is still worth listing
                metric = None
        models.setdefault(row["model"], []).append({
            "version": row["version"], "aliases": row["aliases"],
            EVAL_METRIC: float(metric) if metric is not None else None,
            "run_id": row["run_id"]})
    return {"models": [{"name": n, "versions": v} for n, v in models.items()]}


# -- job estimates ---------------------------------------------------------------------------


@_tool_errors
def job_estimate(
    pool: Annotated[str, Field(description="pool the job asks units of, e.g. h100-timeslice")],
    requested_units: Annotated[int, Field(description="GPU units the job asks for, e.g. 2")],
    model_size_b: Annotated[float, Field(description="size of the job's model, billions of "
                                                     "parameters")] = 7.0,
    *, context: PlatformContext | None = None,
) -> ToolResult:
    """How long a job asking requested_units GPU units of a pool would wait for them and then
    run, predicted by the registered job-duration model from the pool's load right now (its
    online features: running, pending and free units, GPU utilisation, the last hour's mean
    wait). Returns expected_wait_s and expected_duration_s with the inputs used."""
    from agents.estimates import estimate

    # Like registered_models: MLflow and the feature store need no dashboard.
    env = os.environ
    if context is not None:
        uri, store = context.mlflow_uri, context.feature_store
    else:
        uri, store = env.get(MLFLOW_ENV) or None, env.get(FEATURE_STORE_ENV) or None
    return estimate(pool, requested_units, model_size_b, tracking_uri=uri, feature_store=store,
                    catalog_path=env.get(CATALOG_ENV) or None)


# -- the tools as a model sees them ------------------------------------------------------------

PoolFact = Literal["gpu", "sharing", "memory", "units", "nodes"]


def _described(fn: Callable[..., ToolResult]) -> str:
    """The description the model was trained on (train.tools.TOOLS)."""
    return next(t["function"]["description"] for t in _train_tools.TOOLS
                if t["function"]["name"] == fn.__name__)


def _calculator(
    expression: Annotated[str, Field(description="e.g. 12*7 or (3+4)*5")],
) -> ToolResult:
    return _train_tools.calculator(expression)


def _convert_units(
    value: Annotated[float, Field(description="the value to convert")],
    from_unit: Annotated[str, Field(description="unit symbol, e.g. km")],
    to_unit: Annotated[str, Field(description="unit symbol, e.g. m")],
) -> ToolResult:
    return _train_tools.convert_units(value, from_unit, to_unit)


def _pool_info(
    pool: Annotated[str, Field(description="pool name, e.g. a100-mig")],
    fact: Annotated[PoolFact, Field(description="which fact of the pool")],
) -> ToolResult:
    return _train_tools.pool_info(pool, fact)


def _as_tool(fn: Callable[..., ToolResult], name: str, doc: str) -> Callable[..., ToolResult]:
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    return fn


def bind(fn: Callable[..., ToolResult], context: PlatformContext | None
         ) -> Callable[..., ToolResult]:
    """``fn`` with ``context`` bound and hidden from its signature (what a tool schema shows)."""
    sig = inspect.signature(fn)
    if "context" not in sig.parameters:
        return fn

    @functools.wraps(fn)
    def tool(*args: Any, **kwargs: Any) -> ToolResult:
        return fn(*args, context=context, **kwargs)

    del tool.__wrapped__
    tool.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[p for p in sig.parameters.values() if p.name != "context"])
    tool.__annotations__ = {k: v for k, v in fn.__annotations__.items() if k != "context"}
    return tool


_TRAINED = [_as_tool(f, name, _described(getattr(_train_tools, name))) for f, name in
            ((_calculator, "calculator"), (_convert_units, "convert_units"),
             (_pool_info, "pool_info"))]


def platform_tools(context: PlatformContext | None = None, *, untrained: bool = False
                   ) -> list[Callable[..., ToolResult]]:
    """The agent's tools, the platform ones bound to ``context`` (default: the environment's
    platform, read at each call). Names are OpenAI function names; docstrings describe them.

    These are the tools the ``tools`` graph declares, the prompt the platform's served model
    was trained on (train.tools.AGENT_TOOLS). ``untrained=True`` appends the tools it was not
    trained on (:data:`UNTRAINED_TOOLS`: job_estimate), for the MCP server's clients and
    models that read any tool's description."""
    tools = [bind(pool_units, context), bind(jobs, context), bind(registered_models, context),
             *_TRAINED]
    return [*tools, bind(job_estimate, context)] if untrained else tools


#: The tools with the environment's platform: pool_units, jobs, registered_models,
#: calculator, convert_units, pool_info (the tools graph's prompt; job_estimate is not in it).
PLATFORM_TOOLS: list[Callable[..., ToolResult]] = platform_tools()
TOOL_NAMES = [t.__name__ for t in PLATFORM_TOOLS]
#: Platform tools the served model was not trained on: the MCP server offers them too.
UNTRAINED_TOOLS = ["job_estimate"]

__all__ = ["PLATFORM_TOOLS", "TOOL_NAMES", "UNTRAINED_TOOLS", "PlatformContext", "bind", "calculator",
           "convert_units", "job_estimate", "jobs", "parse_pool_usage", "platform_tools",
           "pool_info", "pool_units", "registered_models"]
