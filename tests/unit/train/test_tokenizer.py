"""The tokenizer and chat format of docs/model-format.md: the Python renderer used for
training equals the saved chat_template, files load with transformers, digits are single
tokens, and tool calls parse back."""

from __future__ import annotations

import json

import pytest

from train.data import DEFAULT_SYSTEM, generate
from train.tokenizer import (
    CHAT_TEMPLATE,
    END,
    SPECIAL_TOKENS,
    encode_segments,
    load_tokenizer,
    parse_tool_calls,
    render,
    render_text,
    save_tokenizer,
    tokenizer_from_json,
    train_tokenizer,
)
from train.tools import AGENT_TOOLS, TOOLS


@pytest.fixture(scope="module")
def corpus():
    return generate(1, {"train": 1200, "val": 10, "heldout": 60})


@pytest.fixture(scope="module")
def tok(corpus):
    return train_tokenizer([render_text(e.messages, e.tools) for e in corpus["train"]], 600)


def test_contract_example_renders_exactly(tok):
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "What is 12 times 7?"},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
            "name": "calculator", "arguments": {"expression": "12*7"}}}]},
        {"role": "tool", "content": '{"result": 84}'},
        {"role": "assistant", "content": "12 * 7 = 84."},
    ]
    text = tok.apply_chat_template(messages, tools=TOOLS[:2], tokenize=False)
    assert text == (
        "<|system|>sys\n"
        'tools: {"name": "calculator", "arguments": ["expression"]}; {"name": "convert_units", '
        '"arguments": ["value", "from_unit", "to_unit"]}<|end|>\n'
        "<|user|>What is 12 times 7?<|end|>\n"
        '<|assistant|><tool_call>{"name": "calculator", "arguments": {"expression": "12*7"}}'
        "</tool_call><|end|>\n"
        '<|tool|>{"result": 84}<|end|>\n'
        "<|assistant|>12 * 7 = 84.<|end|>\n")
    prompt = tok.apply_chat_template(messages[:2], tools=TOOLS, tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.endswith("<|user|>What is 12 times 7?<|end|>\n<|assistant|>")


def test_python_renderer_equals_the_template(tok, corpus):
    for ex in corpus["heldout"]:
        for gen in (False, True):
            msgs = ex.messages if not gen else ex.messages[:2]
            want = tok.apply_chat_template(msgs, tools=ex.tools, tokenize=False,
                                           add_generation_prompt=gen)
            assert render_text(msgs, ex.tools, add_generation_prompt=gen) == want
            ids, mask = encode_segments(tok, render(msgs, ex.tools, gen))
            assert ids == tok.encode(want, add_special_tokens=False)
            assert len(mask) == len(ids)


def test_the_live_pool_units_tool_under_the_agents_tool_list(tok, corpus):
    """The platform tool pool_units, declared in the agents' tool list (its description has
    a newline: only names and argument names are rendered), renders and parses back."""
    ex = next(e for e in corpus["heldout"] if e.intent == "pool_units" and e.with_tools
              and e.toolset == "agent")
    text = tok.apply_chat_template(ex.messages, tools=AGENT_TOOLS, tokenize=False)
    assert text == render_text(ex.messages, AGENT_TOOLS)
    assert 'tools: {"name": "pool_units", "arguments": ["pool"]}; {"name": "jobs", ' in text
    (prompt, call), _ = ex.turns()
    assert parse_tool_calls(call) == [{"name": "pool_units",
                                       "arguments": ex.messages[-3]["tool_calls"][0][
                                           "function"]["arguments"]}]


def test_openai_string_arguments_render_as_given(tok):
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function",
             "function": {"name": "calculator", "arguments": '{"expression": "1+1"}'}}]}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert '<tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}</tool_call>' \
        in text
    assert render_text(msgs) == text


def test_loss_mask_covers_only_assistant_turns(tok, corpus):
    ex = next(e for e in corpus["train"] if e.intent == "calculator")
    ids, mask = encode_segments(tok, render(ex.messages, ex.tools))
    trained = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert trained.startswith("<tool_call>") and trained.endswith(ex.messages[-1]["content"]
                                                                 + END)
    assert DEFAULT_SYSTEM not in trained and ex.user_text not in trained


def test_digits_are_single_tokens_and_text_round_trips(tok, corpus):
    pieces = tok.tokenize("12345 and 6.78")
    for d in "12345678":
        assert d in pieces
    for ex in corpus["heldout"][:30]:
        text = render_text(ex.messages, ex.tools)
        assert tok.decode(tok.encode(text, add_special_tokens=False),
                          skip_special_tokens=False) == text


def test_training_is_deterministic(corpus, tok):
    again = train_tokenizer([render_text(e.messages, e.tools) for e in corpus["train"]], 600)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    shipped = tokenizer_from_json(tok.backend_tokenizer.to_str())
    assert shipped.encode("What is 3 plus 4?") == tok.encode("What is 3 plus 4?")


def test_saved_files_load_with_autotokenizer(tok, tmp_path):
    save_tokenizer(tok, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    special = json.loads((tmp_path / "special_tokens_map.json").read_text())
    assert special["eos_token"] == END
    loaded = load_tokenizer(tmp_path)
    assert loaded.eos_token == END
    assert [loaded.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(6))
    assert loaded.encode("<|user|>hi<|end|>") == tok.encode("<|user|>hi<|end|>")
    assert not (tmp_path / "chat_template.jinja").exists()


def test_tool_calls_parse_back():
    text = '<tool_call>{"name": "pool_info", "arguments": {"pool": "cpu", "fact": "gpu"}}</tool_call>'
    assert parse_tool_calls(text) == [{"name": "pool_info",
                                       "arguments": {"pool": "cpu", "fact": "gpu"}}]
    assert parse_tool_calls("The cpu pool has no GPUs.") is None
    assert parse_tool_calls("<tool_call>{not json}</tool_call>") is None
