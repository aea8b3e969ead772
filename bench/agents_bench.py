"""Agents benchmark: what the agent layer (graph, checkpoint writes, the agents API's HTTP)
adds on top of the model calls it makes, measured in one run on the same platform.

1. ``agents``: ``--conversations`` concurrent conversations (default 16) through the agents
   API with the official ``langgraph-sdk`` client, each ``--turns`` questions on its own
   thread (``runs.wait`` on the ``tools`` assistant): the model asks for a tool, the tool
   runs, the model answers; every step is checkpointed in PostgreSQL.
2. ``direct``: the same model calls made straight on the OpenAI endpoint with the official
   ``openai`` client, same concurrency: every model call of every conversation above is
   replayed with the exact messages and tools the graph sent (read back from the thread's
   state), so both sides do the same model work.
3. ``checkpoint write``: ``AsyncPostgresSaver.aput`` of the conversations' real checkpoints
   on the platform's PostgreSQL, one at a time: p50/p99.

The ratio ``agents / direct`` of the wall time is the agent layer's overhead (goal: <= 1.15;
a checkpoint write <= 5 ms p50). Run it on the local platform with the model and the agents
app deployed (``make demo`` does both), in the shell ``rayplane env`` sets up::

    eval "$(.venv/bin/rayplane env)"
    .venv/bin/python bench/agents_bench.py [--agents-url URL] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout without the editable install
    sys.path.insert(0, str(REPO))

from bench.stats import pct  # noqa: E402

QUESTIONS = ["What is 12 times 7?", "Convert 3 km to m.", "What is 45 plus 17?",
             "How many MiB is 2 GiB?", "What is 9 times 8?", "Convert 5 kg to g."]


def _key(path_env: str = "RAYPLANE_API_KEY_FILE") -> str:
    key = os.environ.get("OPENAI_API_KEY")
    if key:
        return key
    path = os.environ.get(path_env)
    if not path:
        sys.exit("no API key: run in the shell `eval \"$(rayplane env)\"` sets up")
    return next(ln.strip() for ln in Path(path).read_text().splitlines()
                if ln.strip() and not ln.startswith("#"))


async def run_agents(url: str, key: str, conversations: int, turns: int
                     ) -> tuple[float, list[str], list[str]]:
    """Wall time, the thread ids, and the failures."""
    from langgraph_sdk import get_client

    client = get_client(url=url, api_key=key, timeout=300)
    threads = [(await client.threads.create())["thread_id"] for _ in range(conversations)]
    failures: list[str] = []

    async def conversation(i: int, thread: str) -> None:
        for t in range(turns):
            question = QUESTIONS[(i + t) % len(QUESTIONS)]
            try:
                state = await client.runs.wait(thread, "tools", input={
                    "messages": [{"role": "user", "content": question}]})
                if not state or not state.get("messages"):
                    failures.append(f"{thread}: no answer to {question!r}")
            except Exception as err:  # noqa: BLE001 - counted, printed, the bench goes on
                failures.append(f"{thread}: {type(err).__name__}: {err}"[:200])

    start = time.perf_counter()
    await asyncio.gather(*(conversation(i, t) for i, t in enumerate(threads)))
    return time.perf_counter() - start, threads, failures


def _openai_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The thread's LangChain messages (as the API returns them) in OpenAI's chat format."""
    out = []
    for m in messages:
        kind = m.get("type")
        if kind == "human":
            out.append({"role": "user", "content": m["content"]})
        elif kind == "system":
            out.append({"role": "system", "content": m["content"]})
        elif kind == "ai":
            msg: dict[str, Any] = {"role": "assistant", "content": m.get("content") or ""}
            if m.get("tool_calls"):
                msg["tool_calls"] = [{"id": c["id"], "type": "function", "function": {
                    "name": c["name"], "arguments": json.dumps(c["args"])}}
                    for c in m["tool_calls"]]
            out.append(msg)
        elif kind == "tool":
            out.append({"role": "tool", "tool_call_id": m["tool_call_id"],
                        "content": m["content"]})
    return out


async def model_calls_of(url: str, key: str, threads: list[str]) -> list[list[list[dict]]]:
    """Per conversation, the message lists of each model call the graph made: every prefix
    of the thread that ends just before an AI message."""
    from langgraph_sdk import get_client

    client = get_client(url=url, api_key=key, timeout=120)
    calls = []
    for thread in threads:
        state = await client.threads.get_state(thread)
        messages = _openai_messages(state["values"].get("messages", []))
        calls.append([messages[:i] for i, m in enumerate(messages) if m["role"] == "assistant"])
    return calls


async def run_direct(base_url: str, key: str, model: str, tools: list[dict],
                     calls: list[list[list[dict]]]) -> tuple[float, int, list[str]]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key=key, timeout=300, max_retries=0)
    failures: list[str] = []

    async def conversation(prefixes: list[list[dict]]) -> None:
        for messages in prefixes:
            try:
                await client.chat.completions.create(model=model, messages=messages,
                                                     tools=tools, temperature=0,
                                                     max_tokens=64)
            except Exception as err:  # noqa: BLE001 - counted, printed
                failures.append(f"{type(err).__name__}: {err}"[:200])

    start = time.perf_counter()
    await asyncio.gather(*(conversation(p) for p in calls))
    return time.perf_counter() - start, sum(len(p) for p in calls), failures


async def checkpoint_writes(threads: list[str], samples: int) -> list[float]:
    """Seconds per ``aput`` of the conversations' own latest checkpoints, replayed onto fresh
    threads (so the bench never changes a real conversation)."""
    from agents.checkpoint import aclose_checkpointer, async_postgres_checkpointer

    saver = await async_postgres_checkpointer()
    try:
        tuples = [await saver.aget_tuple({"configurable": {"thread_id": t, "checkpoint_ns": ""}})
                  for t in threads]
        tuples = [t for t in tuples if t is not None]
        if not tuples:
            return []
        times = []
        for i in range(samples):
            src = tuples[i % len(tuples)]
            config = {"configurable": {"thread_id": f"bench-{uuid.uuid4()}",
                                       "checkpoint_ns": ""}}
            checkpoint = {**src.checkpoint, "id": str(uuid.uuid4())}
            start = time.perf_counter()
            await saver.aput(config, checkpoint, src.metadata or {},
                             checkpoint.get("channel_versions", {}))
            times.append(time.perf_counter() - start)
        return times
    finally:
        await aclose_checkpointer(saver)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--agents-url", default=os.environ.get("RAYPLANE_AGENTS_URL"),
                   help="The agents API (default: RAYPLANE_AGENTS_URL from `rayplane env`).")
    p.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL"),
                   help="The model's OpenAI endpoint (default: OPENAI_BASE_URL).")
    p.add_argument("--model", default=os.environ.get("RAYPLANE_MODEL", "rayplane-tool-llm"))
    p.add_argument("--conversations", type=int, default=16)
    p.add_argument("--turns", type=int, default=2)
    p.add_argument("--checkpoint-samples", type=int, default=200)
    p.add_argument("--json", type=Path, help="Write the results here too.")
    args = p.parse_args(argv)
    if not args.agents_url or not args.base_url:
        sys.exit("name the agents API and the model endpoint (--agents-url, --base-url), or "
                 "run in the shell `eval \"$(rayplane env)\"` sets up")
    key = _key()
    from langchain_core.utils.function_calling import convert_to_openai_tool

    from agents.graphs.tools import as_tool
    from agents.platform import PLATFORM_TOOLS

    tools = [convert_to_openai_tool(as_tool(t)) for t in PLATFORM_TOOLS]
    n, turns = args.conversations, args.turns
    print(f"{n} concurrent conversations x {turns} questions, agents API {args.agents_url}, "
          f"model {args.model} at {args.base_url}")
    # One warm-up conversation each way so neither side pays first-request costs.
    asyncio.run(run_agents(args.agents_url, key, 1, 1))
    agents_s, threads, agent_failures = asyncio.run(
        run_agents(args.agents_url, key, n, turns))
    calls = asyncio.run(model_calls_of(args.agents_url, key, threads))
    asyncio.run(run_direct(args.base_url, key, args.model, tools, calls[:1]))
    direct_s, model_calls, direct_failures = asyncio.run(
        run_direct(args.base_url, key, args.model, tools, calls))
    writes = asyncio.run(checkpoint_writes(threads, args.checkpoint_samples))
    ratio = agents_s / direct_s if direct_s else float("nan")
    result = {
        "conversations": n, "turns": turns, "model_calls": model_calls,
        "agents_s": round(agents_s, 3), "direct_s": round(direct_s, 3),
        "overhead_ratio": round(ratio, 3),
        "agent_ms_per_model_call": round(1000 * (agents_s - direct_s) / max(model_calls, 1), 1),
        "checkpoint_write_ms_p50": round(1000 * pct(writes, 50), 2),
        "checkpoint_write_ms_p99": round(1000 * pct(writes, 99), 2),
        "failures": agent_failures + direct_failures,
    }
    print(f"agents: {agents_s:.2f} s   direct: {direct_s:.2f} s   ({model_calls} model calls)"
          f"\nagent layer / direct = {ratio:.3f}  (goal <= 1.15)"
          f"\ncheckpoint write: p50 {result['checkpoint_write_ms_p50']} ms, "
          f"p99 {result['checkpoint_write_ms_p99']} ms  (goal p50 <= 5 ms)")
    for failure in result["failures"][:10]:
        print(f"  failed: {failure}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
