"""The agents accuracy bench: its questions are held-out requests of every intent, and its
score counts a run only when the right tool ran and the answer follows from its result."""

from __future__ import annotations

import json

import pytest
from langchain_core.messages import AIMessage, ToolMessage

from bench.agents_accuracy import INTENTS, Question, heldout_questions, run, score
from train.data import split_of
from train.tools import pool_units_result


@pytest.fixture(scope="module")
def questions() -> list[Question]:
    return heldout_questions(0, 12)


def test_questions_are_held_out_and_cover_every_intent(questions):
    assert len(questions) >= 50
    assert {q.intent for q in questions} == set(INTENTS)
    assert all(split_of(q.text) == "heldout" for q in questions)
    assert len({q.text for q in questions}) == len(questions)
    live = [q for q in questions if q.intent == "pool_units"]
    assert live and all(q.answer is None and q.call["name"] == "pool_units" for q in live)


def _run(call: dict | None, result: dict | None, answer: str) -> list:
    if call is None:
        return [AIMessage(answer)]
    return [AIMessage("", tool_calls=[{"name": call["name"], "args": call["arguments"],
                                       "id": "c0"}]),
            ToolMessage(json.dumps(result), tool_call_id="c0"), AIMessage(answer)]


def test_score_needs_the_right_call_result_and_answer(questions):
    q = next(q for q in questions if q.intent == "calculator")
    assert score(q, _run(q.call, q.result, q.answer), "answered").correct
    wrong_args = {**q.call, "arguments": {"expression": "1+1"}}
    assert score(q, _run(wrong_args, q.result, q.answer), "answered").why.startswith(
        "tool call")
    assert score(q, _run(q.call, {"result": -1}, q.answer), "answered").why.startswith(
        "tool result")
    assert score(q, _run(q.call, q.result, q.answer + "!"), "answered").why == \
        "answer: differs"
    assert score(q, _run(q.call, q.result, q.answer), "step_limit").why == \
        "status: step_limit"
    chat = next(q for q in questions if q.intent == "chat")
    assert score(chat, _run(None, None, chat.answer), "answered").correct
    assert not score(chat, _run(q.call, q.result, chat.answer), "answered").correct


def test_live_answers_follow_the_live_result(questions):
    q = next(q for q in questions if q.intent == "pool_units")
    pool = q.call["arguments"]["pool"]
    live = pool_units_result(pool, total=2, used=1, nodes=1)
    answer = f"The {pool} pool has 1 free GPU units of 2 (1 used)."
    assert score(q, _run(q.call, live, answer), "answered", lambda a: live).correct
    assert score(q, _run(q.call, live, answer.replace("1 free", "2 free")), "answered",
                 lambda a: live).why == "answer: differs"
    moved = pool_units_result(pool, total=2, used=2, nodes=1)
    assert score(q, _run(q.call, live, answer), "answered",
                 lambda a: moved).why.startswith("state moved")


def test_a_run_whose_pool_changed_meanwhile_is_asked_again(questions):
    q = next(q for q in questions if q.intent == "pool_units")
    pool = q.call["arguments"]["pool"]
    before = pool_units_result(pool, total=2, used=0, nodes=1)
    after = pool_units_result(pool, total=2, used=1, nodes=1)
    answers = iter([(before, f"The {pool} pool has 2 free GPU units of 2 (0 used)."),
                    (after, f"The {pool} pool has 1 free GPU units of 2 (1 used).")])

    class Graph:
        def invoke(self, _):
            result, answer = next(answers)
            return {"status": "answered", "messages": [None, *_run(q.call, result, answer)]}

    report = run([q], Graph(), lambda a: after)  # the replica showed up after the first run
    (outcome,) = report.outcomes
    assert outcome.correct and report.accuracy == 1.0
