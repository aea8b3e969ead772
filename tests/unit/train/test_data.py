"""The synthetic tool-use task: seeded, splits that never share a request, answers that
follow from the conversation (so exact match is fair)."""

from __future__ import annotations

import json

import pytest

from raycluster.catalog import load_catalog
from train.data import (
    POOL_TEMPLATES,
    POOL_UNITS_TEMPLATES,
    SPLITS,
    Example,
    generate,
    main,
    missing_files,
    pool_answer,
    pool_units_answer,
    read_split,
    split_of,
)
from train.tokenizer import render_text
from train.tools import (
    AGENT_TOOLS,
    TOOL_NAMES,
    TOOLS,
    calculator,
    convert_units,
    pool_facts,
    pool_info,
    pool_units_result,
    run_tool,
)

SIZES = {"train": 1500, "val": 150, "heldout": 150}


@pytest.fixture(scope="module")
def splits():
    return generate(7, SIZES)


def test_same_seed_same_data_other_seed_other_data(splits):
    again = generate(7, SIZES)
    assert [e.to_json() for e in again["train"]] == [e.to_json() for e in splits["train"]]
    other = generate(8, SIZES)
    assert [e.user_text for e in other["train"][:50]] != [e.user_text for e in
                                                         splits["train"][:50]]


def test_sizes_and_every_intent_present(splits):
    assert {s: len(v) for s, v in splits.items()} == SIZES
    for split in ("train", "heldout"):
        intents = {e.intent for e in splits[split]}
        assert {"calculator", "convert_units", "pool_info", "pool_units"} <= intents


def test_splits_never_share_a_request(splits):
    texts = {s: {e.user_text for e in splits[s]} for s in SPLITS}
    assert not texts["train"] & texts["heldout"]
    assert not texts["train"] & texts["val"]
    assert not texts["val"] & texts["heldout"]
    # the split is a property of the text, whatever the seed
    for e in splits["heldout"][:20]:
        assert split_of(e.user_text) == "heldout"
    other = generate(99, SIZES)
    assert not {e.user_text for e in other["heldout"]} & texts["train"]
    assert len({e.user_text for e in splits["heldout"]}) == SIZES["heldout"]


def test_tool_results_are_what_the_tools_return(splits):
    for ex in splits["train"][:400]:
        msgs = ex.messages
        calls = [m for m in msgs if m.get("tool_calls")]
        if ex.intent == "chat":
            assert not calls
            continue
        call = calls[0]["tool_calls"][0]["function"]
        assert call["name"] in TOOL_NAMES
        tool_msg = next(m for m in msgs if m["role"] == "tool")
        result = json.loads(tool_msg["content"])
        if call["name"] == "pool_units":  # a live tool: a synthetic result of its exact shape
            assert result == pool_units_result(
                call["arguments"]["pool"], unit=result.get("unit"), total=result.get("total"),
                used=result.get("used"), nodes=result.get("nodes"),
                pools=None if "error" not in result else list(pool_facts()))
            continue
        assert result == run_tool(call["name"], call["arguments"])


def test_answers_quote_the_tool_result(splits):
    for ex in splits["train"][:400]:
        if ex.intent == "chat":
            continue
        result = json.loads(next(m for m in ex.messages if m["role"] == "tool")["content"])
        answer = ex.messages[-1]["content"]
        if "result" in result:
            assert str(result["result"]) in answer


def test_every_tool_has_results_followed_by_an_answer(splits):
    """The tools graph sends each tool's result back: the model must have learnt to answer
    from it, for every tool it calls, under both tool lists a client declares."""
    seen = set()
    for ex in splits["train"]:
        roles = [m["role"] for m in ex.messages if m["role"] != "system"]
        if ex.intent == "chat":
            assert roles == ["user", "assistant"]
            continue
        assert roles == ["user", "assistant", "tool", "assistant"]
        call = ex.messages[-3]["tool_calls"][0]["function"]["name"]
        assert ex.messages[-1]["content"] and not ex.messages[-1].get("tool_calls")
        seen.add((call, ex.toolset if ex.with_tools else None))
    assert seen == {(name, toolset) for name in TOOL_NAMES for toolset in ("trained", "agent",
                                                                             None)}


def test_pool_units_questions_and_answers(splits):
    examples = [e for e in splits["train"] if e.intent == "pool_units"]
    assert len(examples) > 100
    answers = set()
    for ex in examples:
        call = ex.messages[-3]["tool_calls"][0]["function"]
        assert call["name"] == "pool_units" and list(call["arguments"]) == ["pool"]
        result = json.loads(ex.messages[-2]["content"])
        answer = ex.messages[-1]["content"]
        assert answer == pool_units_answer(call["arguments"]["pool"], result)
        if result.get("free") is not None:
            assert result["used"] + result["free"] == pytest.approx(result["total"])
            assert f" {result['free']} free " in answer and f"of {result['total']} " in answer
        answers.add(answer.split(" pool ")[1][:10])
    assert len(answers) > 20  # the answers follow the numbers, not the question
    # A live-usage question is never worded like a catalog fact, and back.
    live = {t.format(p="a100-mig") for t in POOL_UNITS_TEMPLATES}
    facts = {t.format(p="a100-mig") for ts in POOL_TEMPLATES.values() for t in ts}
    assert not live & facts


def test_pool_units_results_and_answers():
    assert pool_units_result("a100-mig", total=2, used=1, nodes=1) == {
        "pool": "a100-mig", "unit": "gpu_units", "total": 2, "used": 1, "free": 1, "nodes": 1}
    assert pool_units_answer("a100-mig", pool_units_result("a100-mig", total=2, used=1,
                                                           nodes=1)) \
        == "The a100-mig pool has 1 free GPU units of 2 (1 used)."
    cpu = pool_units_result("cpu", unit="cpus", total=8, used=2.5, nodes=1)
    assert (cpu["used"], cpu["free"]) == (2.5, 5.5)
    assert pool_units_answer("cpu", cpu) == "The cpu pool has 5.5 free CPUs of 8 (2.5 used)."
    pending = pool_units_result("a100-mig", total=2, used=None, nodes=1)
    assert pending["free"] is None and pending["note"]
    assert pool_units_answer("a100-mig", pending) == (
        "The a100-mig pool has 2 GPU units; the cluster has not reported how many are free yet.")
    unknown = pool_units_result("v100", pools=list(pool_facts()))
    assert unknown["error"].startswith("unknown pool 'v100'")
    assert pool_units_answer("v100", unknown) == "There is no pool named v100."


def test_the_agent_tool_list_is_rendered_as_the_graph_declares_it(splits):
    assert [t["function"]["name"] for t in AGENT_TOOLS] == [
        "pool_units", "jobs", "registered_models", "calculator", "convert_units", "pool_info"]
    assert "pool_units" in TOOL_NAMES and TOOLS[-1]["function"]["name"] == "pool_units"
    ex = next(e for e in splits["train"] if e.toolset == "agent" and e.with_tools)
    assert ex.tools is AGENT_TOOLS
    assert 'tools: {"name": "pool_units", "arguments": ["pool"]}; {"name": "jobs", ' \
        in render_text(ex.messages, ex.tools)
    assert Example.from_json(json.loads(json.dumps(ex.to_json()))).tools is AGENT_TOOLS
    assert {e.toolset for e in splits["train"]} == {"trained", "agent"}


def test_turns_are_the_assistant_texts(splits):
    ex = next(e for e in splits["train"] if e.intent == "calculator")
    (prompt1, call), (prompt2, answer) = ex.turns()
    assert call.startswith('<tool_call>{"name": "calculator", "arguments": {"expression": ')
    assert call.endswith("}</tool_call>")
    assert answer == ex.messages[-1]["content"]
    assert prompt2[-1]["role"] == "tool" and prompt1[-1]["role"] == "user"


def test_tools():
    assert calculator("12*7") == {"result": 84}
    assert calculator("(3+4)*5") == {"result": 35}
    assert calculator("10/3") == {"result": 3.33}
    assert calculator("1/0") == {"error": "division by zero"}
    assert "error" in calculator("__import__('os').system('true')")
    assert convert_units(5, "km", "m") == {"result": 5000}
    assert convert_units(1, "GiB", "MiB") == {"result": 1024}
    assert convert_units(1, "kg", "m") == {"error": "cannot convert kg to m"}
    assert run_tool("nope", {}) == {"error": "unknown tool 'nope'"}
    assert "error" in run_tool("calculator", {"expr": "1"})


def test_pool_facts_come_from_the_catalog():
    facts = pool_facts()
    catalog = load_catalog()
    assert set(facts) == {p.name for p in catalog.pools}
    mig = catalog.pool("a100-mig")
    assert pool_info("a100-mig", "memory") == {"pool": "a100-mig",
                                               "memory": int(mig.memory_per_unit_gb)}
    assert pool_info("a100-mig", "units") == {"pool": "a100-mig",
                                              "units": mig.gpu_units_per_node}
    assert pool_info("v100", "gpu") == {"error": "unknown pool 'v100'"}
    assert pool_answer("cpu", "gpu", pool_info("cpu", "gpu")) == "The cpu pool has no GPUs."


def test_data_folder_round_trip(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "d"), "--seed", "3"]) == 0
    assert missing_files(tmp_path / "d") == []
    held = read_split(tmp_path / "d", "heldout")
    assert held and all(isinstance(e, Example) and e.split == "heldout" for e in held)
    assert missing_files(tmp_path / "nothing") == ["train.jsonl", "val.jsonl", "heldout.jsonl"]
    assert "examples to" in capsys.readouterr().out
