"""The synthetic tool-use task: seeded, splits that never share a request, answers that
follow from the conversation (so exact match is fair)."""

from __future__ import annotations

import json

import pytest

from raycluster.catalog import load_catalog
from train.data import (
    SPLITS,
    Example,
    generate,
    main,
    missing_files,
    pool_answer,
    read_split,
    split_of,
)
from train.tools import TOOL_NAMES, calculator, convert_units, pool_facts, pool_info, run_tool

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
        assert {"calculator", "convert_units", "pool_info"} <= intents


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
        assert json.loads(tool_msg["content"]) == run_tool(call["name"], call["arguments"])


def test_answers_quote_the_tool_result(splits):
    for ex in splits["train"][:400]:
        if ex.intent == "chat":
            continue
        result = json.loads(next(m for m in ex.messages if m["role"] == "tool")["content"])
        answer = ex.messages[-1]["content"]
        if "result" in result:
            assert str(result["result"]) in answer


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
