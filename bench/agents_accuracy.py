"""Accuracy of the agents' ``tools`` graph with the platform's model, end to end over HTTP.

Each question is a request of the task's held-out split (train/data.py: no held-out request
text is ever trained on) -- arithmetic, unit conversions, pool facts, live pool usage and
chat. It goes through ``agents.graphs.tools.build_tools_graph`` with the served model (its
OpenAI endpoint, the platform's API key) and the platform's real tools
(``agents.platform.platform_tools``: ``pool_units`` reads the live cluster through the Ray
dashboard). A question counts when the model called the expected tool with the expected
arguments, the tool really ran, and the final answer is exactly the one the task derives from
the tool's result: for ``pool_units`` the live result (read again after the run, so a state
that moved in between is reported, not scored as the model's fault); for chat, the reply
itself with no tool call.

    eval "$(rayplane env)"        # RAY_ADDRESS, the Ray token, OPENAI_BASE_URL, the key file
    python -m bench.agents_accuracy --model rayplane-tool-llm --per-intent 12

prints the accuracy per intent and overall (``--json`` for the record, with every miss).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from train.data import Example, generate, pool_units_answer

INTENTS = ("calculator", "convert_units", "pool_info", "pool_units", "chat")


@dataclass
class Question:
    """A held-out request, what the model should call and answer (``answer`` None: derived
    from the live tool result)."""

    intent: str
    text: str
    call: dict[str, Any] | None
    result: dict[str, Any] | None
    answer: str | None


@dataclass
class Outcome:
    intent: str
    text: str
    correct: bool
    why: str = ""
    answer: str = ""
    expected: str = ""
    seconds: float = 0.0


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return sum(o.correct for o in self.outcomes) / max(1, len(self.outcomes))

    def by_intent(self) -> dict[str, tuple[int, int]]:
        out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for o in self.outcomes:
            out[o.intent][0] += o.correct
            out[o.intent][1] += 1
        return {k: (v[0], v[1]) for k, v in sorted(out.items())}

    def summary(self) -> str:
        parts = [f"{k} {c}/{n} ({c / n:.0%})" for k, (c, n) in self.by_intent().items()]
        misses = Counter(o.why.split(":")[0] for o in self.outcomes if not o.correct)
        seconds = sorted(o.seconds for o in self.outcomes) or [0.0]
        return (f"tools graph accuracy {self.accuracy:.1%} of {len(self.outcomes)} held-out "
                f"questions ({', '.join(parts)}); misses: {dict(misses) or 'none'}; "
                f"median {seconds[len(seconds) // 2]:.2f}s per question")


def question_of(ex: Example) -> Question:
    """The question a held-out conversation asks and what a correct run produces."""
    msgs = ex.messages
    if ex.intent == "chat":
        return Question(ex.intent, ex.user_text, None, None, msgs[-1]["content"])
    fn = msgs[-3]["tool_calls"][0]["function"]
    call = {"name": fn["name"], "arguments": fn["arguments"]}
    if ex.intent == "pool_units":  # the training result is synthetic; the live one decides
        return Question(ex.intent, ex.user_text, call, None, None)
    return Question(ex.intent, ex.user_text, call, json.loads(msgs[-2]["content"]),
                    msgs[-1]["content"])


def heldout_questions(seed: int, per_intent: int, pool: int = 3000) -> list[Question]:
    """Up to ``per_intent`` distinct held-out questions of each intent (chat has only a few
    distinct held-out texts), in the order the seeded stream yields them."""
    picked: dict[str, list[Question]] = {i: [] for i in INTENTS}
    for ex in generate(seed, {"heldout": pool})["heldout"]:
        if len(picked[ex.intent]) < per_intent:
            picked[ex.intent].append(question_of(ex))
    return [q for i in INTENTS for q in picked[i]]


def score(q: Question, messages: list[Any], status: str,
          live: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> Outcome:
    """Whether the graph's run of ``q`` (its final ``messages``: LangChain messages after the
    question) is right. ``live(call_arguments)`` runs the live tool again (pool_units)."""
    from langchain_core.messages import AIMessage, ToolMessage

    answer = messages[-1].content if messages and isinstance(messages[-1], AIMessage) else ""
    out = Outcome(q.intent, q.text, False, answer=str(answer), expected=q.answer or "")
    calls = [c for m in messages if isinstance(m, AIMessage) for c in m.tool_calls]
    results = [m for m in messages if isinstance(m, ToolMessage)]
    if status != "answered":
        out.why = f"status: {status}"
        return out
    if q.call is None:
        if calls:
            out.why = f"tool call: {calls[0]['name']}({calls[0]['args']}) where none was due"
            return out
    else:
        got = [(c["name"], c["args"]) for c in calls]
        if got != [(q.call["name"], q.call["arguments"])]:
            out.why = f"tool call: {got} instead of {q.call['name']}({q.call['arguments']})"
            return out
        try:
            result = json.loads(results[0].content)
        except (IndexError, ValueError):
            out.why = "tool result: missing or not JSON"
            return out
        if q.result is None:  # live: the answer follows the result the tool really gave
            again = live(q.call["arguments"]) if live else result
            if again != result:
                out.why = f"state moved: {result} then {again}"
                return out
            out.expected = pool_units_answer(q.call["arguments"]["pool"], result)
        elif result != q.result:
            out.why = f"tool result: {result} instead of {q.result}"
            return out
    if out.answer != out.expected:
        out.why = "answer: differs"
        return out
    out.correct = True
    return out


def run(questions: list[Question], graph: Any, live: Callable[[dict[str, Any]], Any],
        progress: Callable[[Outcome], None] | None = None, retries: int = 2) -> Report:
    """Every question through ``graph`` (one new thread each), scored. A live question whose
    pool changed during its run (Ray reports usage a moment late: a replica that just
    started) is asked again, up to ``retries`` times: the score is of the model."""
    report = Report()
    for q in questions:
        for _ in range(1 + retries):
            started = time.perf_counter()
            try:
                state = graph.invoke({"messages": [("user", q.text)]})
                outcome = score(q, state["messages"][1:], state.get("status", "?"), live)
            except Exception as err:  # an endpoint error counts as a miss, and says so
                outcome = Outcome(q.intent, q.text, False, why=f"error: {str(err)[:200]}")
            outcome.seconds = time.perf_counter() - started
            if not outcome.why.startswith("state moved"):
                break
            time.sleep(2.0)
        report.outcomes.append(outcome)
        if progress:
            progress(outcome)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.agents_accuracy",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Served model name (default: RAYPLANE_MODEL, else the "
                                        "platform's).")
    parser.add_argument("--base-url", help="OpenAI base URL (default: OPENAI_BASE_URL).")
    parser.add_argument("--api-key-file", help="API key file (default: RAYPLANE_API_KEY_FILE).")
    parser.add_argument("--config", default="train/configs/demo.yaml",
                        help="Training config whose data seed the held-out split follows.")
    parser.add_argument("--per-intent", type=int, default=12)
    parser.add_argument("--system", help="A system prompt for the graph (default: none).")
    parser.add_argument("--json", dest="json_out", help="Write the report (and misses) here.")
    args = parser.parse_args(argv)
    from agents.graphs.model import chat_model
    from agents.graphs.tools import build_tools_graph
    from agents.platform import PlatformContext, platform_tools, pool_units
    from train.config import TrainConfig

    seed = TrainConfig.from_file(args.config).data.seed
    context = PlatformContext.from_env()
    model = chat_model(base_url=args.base_url, api_key_file=args.api_key_file, model=args.model,
                       timeout=60)
    graph = build_tools_graph(model, platform_tools(context), system_prompt=args.system)
    questions = heldout_questions(seed, args.per_intent)

    def show(o: Outcome) -> None:
        print(f"{'ok  ' if o.correct else 'MISS'} {o.intent:13s} {o.text!r} -> {o.answer!r}"
              + ("" if o.correct else f"  [{o.why}; expected {o.expected!r}]"), flush=True)

    report = run(questions, graph, lambda a: pool_units(context=context, **a), show)
    print(report.summary())
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"accuracy": report.accuracy, "by_intent": report.by_intent(),
                       "outcomes": [asdict(o) for o in report.outcomes]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
