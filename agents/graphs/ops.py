"""The ``ops`` graph: propose promoting a registered model's candidate, and promote it only
when a person approves; and answer how long a job would wait and run.

    START -> read_registry -> compare -(proposal)-> review [interrupt] -(approved)-> promote
      |                               \\-(none)-> END                  \\-(rejected)-> reject
      \\-(a job question)-> estimate -> END

A run whose last message is a person asking about a job's wait or run time ("How long will a
2-unit job on h100-timeslice wait?") goes to ``estimate``: it reads the pool and units from
the question, calls the ``job_estimate`` platform tool (agents/estimates.py: the registered
job-duration model on the pool's online features) and answers from its result, as an
``AIMessage`` tool call, the ``ToolMessage`` result and the answer (``status: "estimated"``;
``"needs_input"`` when the question names no pool or units, ``"estimate_failed"`` when the
tool reports an error). Any other run is the promotion flow below.

``read_registry`` reads the versions behind the ``candidate`` and ``champion`` aliases from
MLflow and the metric their training run logged (``eval_exact_match``, the held-out exact
match train.fit logs and gates registration on). ``compare`` proposes promoting the candidate
only when it is measured better than the champion (or there is no champion): the proposal is
an ``AIMessage`` naming both versions and metrics, with a ``promote_champion`` tool call. The
run then stops at ``langgraph.types.interrupt`` in ``review``, before the privileged tool
runs; resume it with ``Command(resume={"approve": True})`` to move the ``champion`` alias, or
``{"approve": False, "reason": "..."}`` to leave it (an answer of another shape is refused
with a ``pydantic.ValidationError`` and the proposal stays pending: LangGraph's
``response_schema``). ``promote`` re-reads the aliases first and refuses a proposal the
registry has moved on from. Interrupts need a checkpointer: LangGraph's ``InMemorySaver`` in a process, the
platform's PostgreSQL one (agents/checkpoint.py) across processes.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any, Literal

from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.types import interrupt
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from agents.estimates import describe, estimate, parse_question
from agents.platform import CATALOG_ENV, EVAL_METRIC, FEATURE_STORE_ENV
from raycluster.catalog import load_catalog
from raycluster.errors import PlatformError
from raycluster.spec import SpecError
from train import tracking
from train.tracking import CANDIDATE, CHAMPION

#: The metric train.fit logs in a training run (train/evaluate.py) and tags versions with.
METRIC = EVAL_METRIC
PROMOTE_TOOL = "promote_champion"
ESTIMATE_TOOL = "job_estimate"

Status = Literal["no_candidate", "no_metric", "champion_best", "proposed", "promoted",
                 "rejected", "stale", "estimated", "estimate_failed", "needs_input"]


class Approval(BaseModel):
    """The answer that resumes a proposal: ``{"approve": true}`` promotes; ``false`` (with an
    optional reason) does not. Anything else is refused and the proposal stays pending."""

    model_config = ConfigDict(extra="forbid")

    approve: StrictBool = Field(description="true to promote the candidate, false to reject")
    reason: str | None = Field(default=None, description="why (shown in the outcome)")


class OpsState(MessagesState, total=False):
    """The chat (proposal and outcome), what was read and decided, and the run's status."""

    candidate: dict[str, Any] | None
    champion: dict[str, Any] | None
    proposal: dict[str, Any] | None
    decision: dict[str, Any] | None
    estimate: dict[str, Any] | None
    status: Status


def _aliases(client, model_name: str) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    try:
        return {a: str(v) for a, v in (client.get_registered_model(model_name).aliases
                                       or {}).items()}
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise SpecError(f"model_name: {model_name!r} is not a registered model",
                            field="model_name") from None
        raise PlatformError(f"MLflow registry: cannot read {model_name!r}: {err.message}"
                            ) from None


def read_version(client, model_name: str, version: str) -> dict[str, Any]:
    """A version's facts: its run and the metric its run logged (else its version tag)."""
    from mlflow.exceptions import MlflowException

    mv = client.get_model_version(model_name, version)
    metric = None
    if mv.run_id:
        try:
            metric = client.get_run(mv.run_id).data.metrics.get(METRIC)
        except MlflowException:
            metric = None  # the run was deleted: the version's tag may still say
    if metric is None and mv.tags.get(METRIC) not in (None, ""):
        metric = float(mv.tags[METRIC])
    return {"version": str(mv.version), "run_id": mv.run_id, METRIC: metric}


def promote_champion(tracking_uri: str, model_name: str, version: str,
                     expected_champion: str | None) -> dict[str, Any]:
    """The privileged tool: point ``champion`` at ``version``, unless the registry moved on
    since the proposal (the candidate alias no longer names it or the champion changed)."""
    client = tracking.client(tracking_uri)
    aliases = _aliases(client, model_name)
    if aliases.get(CANDIDATE) != version or aliases.get(CHAMPION) != expected_champion:
        return {"error": f"not promoted: the registry changed since the proposal "
                         f"({CANDIDATE} is now {aliases.get(CANDIDATE)}, {CHAMPION} is now "
                         f"{aliases.get(CHAMPION)})"}
    previous = tracking.promote(tracking_uri, model_name, version, alias=CHAMPION)
    return {"model": model_name, CHAMPION: version,
            "previous": None if previous is None else str(previous)}


def _describe(v: dict[str, Any]) -> str:
    m = v.get(METRIC)
    return f"version {v['version']} ({METRIC} {'not logged' if m is None else f'{m:.4g}'})"


def build_ops_graph(*, tracking_uri: str, model_name: str, checkpointer: Any,
                    feature_store: str | None = None):
    """The compiled graph for ``model_name`` in the registry at ``tracking_uri``; job
    estimates read the online store of ``feature_store`` (a feature_store.yaml; default
    RAYPLANE_FEATURE_STORE, else the platform's) and the job-duration model of the same
    registry.

    Run it on a thread (``config={"configurable": {"thread_id": ...}}``) with
    ``{"messages": []}``; when it proposes, the result holds ``__interrupt__`` (the proposal)
    and ``status: "proposed"``; resume the same thread with ``Command(resume={"approve":
    True})``. Final ``status``: promoted, rejected, stale, or, without a proposal,
    no_candidate, no_metric or champion_best."""
    if checkpointer is None:
        raise ValueError("the ops graph stops for approval, which needs a checkpointer "
                         "(langgraph InMemorySaver, or agents.checkpoint's PostgreSQL one)")

    catalog_path = os.environ.get(CATALOG_ENV) or None
    pools = [p.name for p in load_catalog(catalog_path).pools]
    store = feature_store or os.environ.get(FEATURE_STORE_ENV) or None

    def job_question(state: OpsState) -> dict[str, Any] | None:
        messages = state.get("messages") or []
        if not messages or not isinstance(messages[-1], HumanMessage):
            return None
        return parse_question(messages[-1].text, pools)

    def estimate_job(state: OpsState) -> dict[str, Any]:
        asked = job_question(state) or {}
        if asked.get("pool") is None or asked.get("requested_units") is None:
            return {"messages": [AIMessage(
                "To estimate a job's wait and run time, name its pool ("
                f"{', '.join(pools)}) and its GPU units, e.g. 'How long will a 2-unit job on "
                "h100-timeslice wait?'.")], "estimate": None, "status": "needs_input"}
        call = {"name": ESTIMATE_TOOL, "id": f"{ESTIMATE_TOOL}-{uuid.uuid4().hex[:8]}",
                "args": asked}
        try:
            result = estimate(**asked, tracking_uri=tracking_uri, feature_store=store,
                              catalog_path=catalog_path)
        except Exception as err:  # the tool's failures are its result, as for every tool
            result = {"error": str(err).strip().splitlines()[0] if str(err).strip()
                      else type(err).__name__}
        failed = "error" in result
        return {"messages": [AIMessage("", tool_calls=[call]),
                             ToolMessage(json.dumps(result), tool_call_id=call["id"],
                                         name=ESTIMATE_TOOL,
                                         status="error" if failed else "success"),
                             AIMessage(describe(result))],
                "estimate": result, "status": "estimate_failed" if failed else "estimated"}

    def read_registry(state: OpsState) -> dict[str, Any]:
        tracking.check_tracking_server(tracking_uri, field="tracking_uri")
        client = tracking.client(tracking_uri)
        aliases = _aliases(client, model_name)
        return {alias: read_version(client, model_name, aliases[alias])
                if alias in aliases else None for alias in (CANDIDATE, CHAMPION)}

    def compare(state: OpsState) -> dict[str, Any]:
        cand, champ = state.get("candidate"), state.get("champion")
        if cand is None:
            return _final("no_candidate", f"No proposal: {model_name} has no '{CANDIDATE}' "
                                          "version to promote.")
        if champ is not None and champ["version"] == cand["version"]:
            return _final("champion_best", f"No proposal: {model_name} {_describe(cand)} is "
                                           f"already the {CHAMPION}.")
        if cand[METRIC] is None:
            return _final("no_metric", f"No proposal: {model_name} {CANDIDATE} "
                                       f"{_describe(cand)} has no {METRIC} to compare.")
        if champ is not None and champ[METRIC] is not None and champ[METRIC] >= cand[METRIC]:
            return _final("champion_best",
                          f"No proposal: {model_name} {CHAMPION} {_describe(champ)} is at "
                          f"least as good as {CANDIDATE} {_describe(cand)}.")
        against = (f"replacing {CHAMPION} {_describe(champ)}" if champ
                   else f"{model_name} has no {CHAMPION} yet")
        text = (f"Proposal: promote {model_name} {CANDIDATE} {_describe(cand)} to {CHAMPION}, "
                f"{against}.")
        proposal = {"model": model_name, "candidate": cand, "champion": champ,
                    "metric": METRIC, "message": text}
        call = {"name": PROMOTE_TOOL, "id": f"{PROMOTE_TOOL}-{cand['version']}",
                "args": {"model": model_name, "version": cand["version"]}}
        return {"messages": [AIMessage(text, tool_calls=[call])], "proposal": proposal,
                "status": "proposed"}

    def review(state: OpsState) -> dict[str, Any]:
        # Runs again from the top on resume: nothing before the interrupt has effects.
        answer = interrupt({"action": PROMOTE_TOOL, **state["proposal"]},
                           response_schema=Approval)
        return {"decision": answer.model_dump()}

    def promote(state: OpsState) -> dict[str, Any]:
        proposal = state["proposal"]
        version = proposal["candidate"]["version"]
        expected = proposal["champion"]["version"] if proposal["champion"] else None
        result = promote_champion(tracking_uri, model_name, version, expected)
        call_id = state["messages"][-1].tool_calls[0]["id"]
        if "error" in result:
            return {"messages": [ToolMessage(json.dumps(result), tool_call_id=call_id,
                                             name=PROMOTE_TOOL, status="error"),
                                 AIMessage(f"Not promoted: {result['error']}.")],
                    "status": "stale"}
        was = f" (was version {result['previous']})" if result["previous"] else ""
        return {"messages": [ToolMessage(json.dumps(result), tool_call_id=call_id,
                                         name=PROMOTE_TOOL),
                             AIMessage(f"Promoted {model_name} version {version} to "
                                       f"{CHAMPION}{was}.")],
                "status": "promoted"}

    def reject(state: OpsState) -> dict[str, Any]:
        proposal, decision = state["proposal"], state.get("decision") or {}
        reason = f": {decision['reason']}" if decision.get("reason") else ""
        champ = proposal["champion"]
        stays = (f"{CHAMPION} stays version {champ['version']}" if champ
                 else f"{model_name} still has no {CHAMPION}")
        call_id = state["messages"][-1].tool_calls[0]["id"]
        return {"messages": [
            ToolMessage(json.dumps({"error": f"not run: rejected by the reviewer{reason}"}),
                        tool_call_id=call_id, name=PROMOTE_TOOL, status="error"),
            AIMessage(f"Not promoted: the reviewer rejected promoting {model_name} version "
                      f"{proposal['candidate']['version']}{reason}; {stays}.")],
            "status": "rejected"}

    graph = StateGraph(OpsState)
    graph.add_node("estimate", estimate_job)
    graph.add_node("read_registry", read_registry)
    graph.add_node("compare", compare)
    graph.add_node("review", review)
    graph.add_node("promote", promote)
    graph.add_node("reject", reject)
    graph.add_conditional_edges(
        START, lambda s: "estimate" if job_question(s) is not None else "read_registry",
        ["estimate", "read_registry"])
    graph.add_edge("estimate", END)
    graph.add_edge("read_registry", "compare")
    graph.add_conditional_edges(
        "compare", lambda s: "review" if s.get("status") == "proposed" else END,
        ["review", END])
    graph.add_conditional_edges(
        "review", lambda s: "promote" if s["decision"]["approve"] else "reject",
        ["promote", "reject"])
    graph.add_edge("promote", END)
    graph.add_edge("reject", END)
    return graph.compile(checkpointer=checkpointer, name="ops")


def _final(status: Status, text: str) -> dict[str, Any]:
    return {"messages": [AIMessage(text)], "proposal": None, "status": status}


__all__ = ["ESTIMATE_TOOL", "METRIC", "Approval", "PROMOTE_TOOL", "OpsState", "build_ops_graph", "promote_champion",
           "read_version"]
