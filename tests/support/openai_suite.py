"""The OpenAI conformance suite's engine limitations (tests/integration/test_serve_openai.py):
a case that the server behind an engine cannot pass is skipped with that server's limitation
named, never hidden."""

from __future__ import annotations

import pytest

#: What transformers serve (the upstream under test) does not do, by the case it skips.
UPSTREAM_LIMITS = {
    "n": "transformers serve generates one choice per request (no `n`) and refuses "
         "`ignore_eos` (422)",
    "stop": "transformers serve keeps the stop sequence in the text (OpenAI cuts before it)",
    "tools": "transformers serve returns this model's tool calls as text, not `tool_calls` "
             "(it parses them only for the model families it knows)",
    "context": "transformers serve does not refuse a prompt past the model's context",
    "counters": "an upstream's engine counters are not visible through its OpenAI API",
    "echo": "transformers serve ignores `echo` on /v1/completions",
    "ignore_eos": "transformers serve refuses `ignore_eos` (422), so no stream of a set length",
    "unknown_fields": "transformers serve refuses fields it does not know (422 -> 400)",
}


def limitation(deployed, case: str, **by_engine: str) -> None:
    """Skip ``case`` on an engine whose server cannot do it, naming the server's limitation."""
    reason = by_engine.get(deployed["engine"].replace("-", "_"))
    if deployed["engine"] == "openai-upstream" and case in UPSTREAM_LIMITS and reason is None:
        reason = UPSTREAM_LIMITS[case]
    if reason:
        pytest.skip(f"{deployed['engine']}: {reason}")


def once(deployed, what: str) -> None:
    """A check of the platform, not of an engine: run on the router's cpu model only."""
    if deployed["param"] != "router":
        pytest.skip(f"{what} does not depend on the engine: checked on the router's cpu model")


__all__ = ["UPSTREAM_LIMITS", "limitation", "once"]
