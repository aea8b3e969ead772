"""Tool calls in the platform's chat format (docs/model-format.md): the model writes
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` and the server returns OpenAI
``tool_calls``. Only calls to a declared tool with well-formed JSON become tool calls; anything
else stays text, so a client never receives a call it cannot dispatch.
"""

from __future__ import annotations

import json
import re
import uuid

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_CALL = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)


def parse_tool_calls(text: str, declared: set[str]) -> tuple[list[dict] | None, str]:
    """(OpenAI tool_calls or None, the text outside the calls)."""
    matches = list(_CALL.finditer(text))
    if not matches:
        return None, text
    calls = []
    for m in matches:
        try:
            obj = json.loads(m.group(1))
        except json.JSONDecodeError:
            return None, text
        if not isinstance(obj, dict) or obj.get("name") not in declared:
            return None, text
        args = obj.get("arguments", {})
        if not isinstance(args, dict):
            return None, text
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": obj["name"], "arguments": json.dumps(args)}})
    return calls, _CALL.sub("", text).strip()


def forced_prefix(tool_choice, tools) -> str:
    """Text appended to the prompt so the model must call a tool: ``required`` opens a call,
    a named choice also writes the name (the model then only writes the arguments)."""
    if tool_choice == "required":
        return TOOL_CALL_OPEN
    name = getattr(getattr(tool_choice, "function", None), "name", None)
    if name:
        # No trailing space: byte-level BPE glues a space to the next token (' {'), so a
        # prefix ending in a bare space is a token sequence the model never saw.
        return TOOL_CALL_OPEN + json.dumps({"name": name})[:-1] + ', "arguments":'
    return ""


class ToolStreamFilter:
    """Streams content while holding back anything that may be the start of a tool call;
    at the end, says whether the whole output was tool calls."""

    def __init__(self, enabled: bool, declared: set[str], prefix: str = ""):
        self.enabled = enabled
        self.declared = declared
        self.full = prefix
        self.sent = len(prefix)  # the forced prefix was never the client's content

    def feed(self, text: str) -> str:
        self.full += text
        if not self.enabled:
            out, self.sent = self.full[self.sent:], len(self.full)
            return out
        start = self.full.find(TOOL_CALL_OPEN)
        if start < 0:
            limit = len(self.full) - _partial_suffix(self.full, TOOL_CALL_OPEN)
        else:
            limit = start
        limit = max(limit, self.sent)
        out, self.sent = self.full[self.sent:limit], limit
        return out

    def finish(self) -> tuple[str, list[dict] | None]:
        """(content not yet sent, tool_calls or None)."""
        if self.enabled:
            calls, content = parse_tool_calls(self.full, self.declared)
            if calls:
                already = self.full[:self.sent]
                rest = content[len(already):] if content.startswith(already) else ""
                return rest, calls
        out, self.sent = self.full[self.sent:], len(self.full)
        return out, None


def _partial_suffix(text: str, marker: str) -> int:
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


__all__ = ["TOOL_CALL_CLOSE", "TOOL_CALL_OPEN", "ToolStreamFilter", "forced_prefix",
           "parse_tool_calls"]
