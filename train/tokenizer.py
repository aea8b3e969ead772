"""The byte-level BPE tokenizer and the chat format of docs/model-format.md.

The tokenizer is trained on the task's corpus with the ``tokenizers`` library and wrapped as a
``transformers`` fast tokenizer whose ``chat_template`` is the contract the serving layer and
vLLM rely on. ``render`` is the same format in Python, split into segments at the special
tokens, so that training can mask the loss to the assistant's turns; a unit test holds it equal
to ``apply_chat_template``.

Digits are split one per token before BPE: the model then copies a number from the request
into a tool call, and from a tool result into the answer, token by token. Apart from digits,
BPE merges across spaces and punctuation (no GPT-2 regex), so the constant system prompt with
its tools line and the fixed JSON around arguments become a few tokens each: a conversation
is ~50 tokens instead of ~140, which is what lets the demo model train in minutes on 2 cores.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SYSTEM, USER, ASSISTANT, TOOL, END, PAD = (
    "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>", "<|pad|>")
#: Special tokens, in id order (ids 0..5).
SPECIAL_TOKENS = [PAD, END, SYSTEM, USER, ASSISTANT, TOOL]
ROLE_TOKEN = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT, "tool": TOOL}
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"

# The chat template. One line per construct, no literal newlines: the only newlines it emits
# are the '\n' after each <|end|>, as in docs/model-format.md. Tools are listed by name and
# argument names (the full JSON schema would triple the prompt of a model this small).
# An assistant's tool call renders back as <tool_call>{"name": .., "arguments": {..}}</tool_call>:
# arguments given as a mapping are dumped with json.dumps' default separators (the training
# format); a string (the OpenAI wire format) is inserted as is, so servers should pass mappings.
CHAT_TEMPLATE = "".join([  # noqa: FLY002 - one template construct per line
    "{%- if messages and messages[0]['role'] == 'system' -%}",
    "{%- set system_text = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}",
    "{%- else -%}{%- set system_text = '' -%}{%- set loop_messages = messages -%}{%- endif -%}",
    "{%- if system_text or tools -%}",
    "{{- '<|system|>' + (system_text or '') -}}",
    "{%- if tools -%}",
    "{%- if system_text -%}{{- '\\n' -}}{%- endif -%}",
    "{{- 'tools: ' -}}",
    "{%- for tool in tools -%}",
    "{%- set fn = tool['function'] if tool['function'] is defined else tool -%}",
    ("{%- set params = fn['parameters']['properties'] if fn['parameters'] is defined and "
     "fn['parameters']['properties'] is defined else {} -%}"),
    "{{- {'name': fn['name'], 'arguments': params.keys() | list} | tojson -}}",
    "{%- if not loop.last -%}{{- '; ' -}}{%- endif -%}",
    "{%- endfor -%}",
    "{%- endif -%}",
    "{{- '<|end|>\\n' -}}",
    "{%- endif -%}",
    "{%- for message in loop_messages -%}",
    "{%- if message['role'] == 'assistant' -%}",
    "{{- '<|assistant|>' -}}",
    "{%- generation -%}",
    "{{- message['content'] or '' -}}",
    "{%- for call in message['tool_calls'] or [] -%}",
    "{%- set fn = call['function'] if call['function'] is defined else call -%}",
    "{{- '<tool_call>{\"name\": ' + (fn['name'] | tojson) + ', \"arguments\": ' -}}",
    "{%- if fn['arguments'] is string -%}{{- fn['arguments'] -}}",
    "{%- else -%}{{- fn['arguments'] | tojson -}}{%- endif -%}",
    "{{- '}</tool_call>' -}}",
    "{%- endfor -%}",
    "{{- '<|end|>' -}}",
    "{%- endgeneration -%}",
    "{{- '\\n' -}}",
    "{%- elif message['role'] in ['user', 'tool', 'system'] -%}",
    "{{- '<|' + message['role'] + '|>' + (message['content'] or '') + '<|end|>\\n' -}}",
    "{%- else -%}",
    "{{- raise_exception('unknown role ' + message['role']) -}}",
    "{%- endif -%}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}",
])


def tools_line(tools: Sequence[dict[str, Any]]) -> str:
    parts = []
    for tool in tools:
        fn = tool.get("function", tool)
        props = (fn.get("parameters") or {}).get("properties") or {}
        parts.append(json.dumps({"name": fn["name"], "arguments": list(props)},
                                ensure_ascii=False))
    return "tools: " + "; ".join(parts)


def format_tool_call(name: str, arguments: dict[str, Any]) -> str:
    return (f'{TOOL_CALL_OPEN}{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": '
            f'{json.dumps(arguments, ensure_ascii=False)}}}{TOOL_CALL_CLOSE}')


def parse_tool_calls(text: str) -> list[dict[str, Any]] | None:
    """``[{"name", "arguments"}]`` from generated text, or None when it holds no tool call
    (or a malformed one)."""
    if TOOL_CALL_OPEN not in text:
        return None
    calls = []
    rest = text
    while TOOL_CALL_OPEN in rest:
        start = rest.index(TOOL_CALL_OPEN) + len(TOOL_CALL_OPEN)
        end = rest.find(TOOL_CALL_CLOSE, start)
        if end < 0:
            return None
        try:
            call = json.loads(rest[start:end])
        except json.JSONDecodeError:
            return None
        if not isinstance(call, dict) or "name" not in call:
            return None
        calls.append({"name": call["name"], "arguments": call.get("arguments", {})})
        rest = rest[end + len(TOOL_CALL_CLOSE):]
    return calls


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered conversation; ``train`` marks the assistant's own tokens."""

    text: str
    train: bool = False


def render(messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None,
           add_generation_prompt: bool = False) -> list[Segment]:
    """The chat template in Python, as segments that start and end at special tokens (so
    encoding them one by one gives the same ids as encoding the whole text)."""
    segs: list[Segment] = []
    msgs = list(messages)
    system_text = ""
    if msgs and msgs[0]["role"] == "system":
        system_text = msgs[0].get("content") or ""
        msgs = msgs[1:]
    if system_text or tools:
        body = system_text
        if tools:
            body += ("\n" if system_text else "") + tools_line(tools)
        segs += [Segment(SYSTEM), Segment(body), Segment(END), Segment("\n")]
    for m in msgs:
        role = m["role"]
        if role == "assistant":
            text = m.get("content") or ""
            for call in m.get("tool_calls") or []:
                fn = call.get("function", call)
                args = fn["arguments"]
                if isinstance(args, str):
                    text += (f'{TOOL_CALL_OPEN}{{"name": {json.dumps(fn["name"])}, '
                             f'"arguments": {args}}}{TOOL_CALL_CLOSE}')
                else:
                    text += format_tool_call(fn["name"], args)
            segs += [Segment(ASSISTANT), Segment(text, True), Segment(END, True), Segment("\n")]
        elif role in ("user", "tool", "system"):
            segs += [Segment(ROLE_TOKEN[role]), Segment(m.get("content") or ""), Segment(END),
                     Segment("\n")]
        else:
            raise ValueError(f"unknown role {role!r}")
    if add_generation_prompt:
        segs.append(Segment(ASSISTANT))
    return [s for s in segs if s.text]


def render_text(messages, tools=None, add_generation_prompt: bool = False) -> str:
    return "".join(s.text for s in render(messages, tools, add_generation_prompt))


def encode_segments(tokenizer, segments: Iterable[Segment]) -> tuple[list[int], list[int]]:
    """Token ids and a 0/1 loss mask (1 = the model is trained to produce this token)."""
    ids: list[int] = []
    mask: list[int] = []
    special = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    for seg in segments:
        if seg.text in special:
            piece = [special[seg.text]]
        else:
            piece = tokenizer.encode(seg.text, add_special_tokens=False)
        ids += piece
        mask += [int(seg.train)] * len(piece)
    return ids, mask


def _strip_special(text: str) -> list[str]:
    pieces = [text]
    for tok in SPECIAL_TOKENS:
        pieces = [p for piece in pieces for p in piece.split(tok)]
    return [p for p in pieces if p]


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE on ``texts`` (rendered conversations) and wrap it for
    ``transformers``. Deterministic for the same texts and vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # Special tokens are atomic: they must not spend merges on "<|", "user", "|>".
    tok.train_from_iterator((p for t in texts for p in _strip_special(t)), trainer=trainer)
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok):
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    # <tool_call> tags are ordinary (non-special) added tokens: atomic, and kept when a
    # server decodes with skip_special_tokens=True.
    tok.add_tokens([AddedToken(TOOL_CALL_OPEN, special=False, normalized=False),
                    AddedToken(TOOL_CALL_CLOSE, special=False, normalized=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=END, pad_token=PAD, bos_token=END, unk_token=None,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT, TOOL],
        chat_template=CHAT_TEMPLATE, model_max_length=1024,
        clean_up_tokenization_spaces=False)


def save_tokenizer(tokenizer, folder: str | Path) -> None:
    """Save as docs/model-format.md says: tokenizer.json, tokenizer_config.json with the
    chat_template, special_tokens_map.json; loadable by transformers 4.x (vLLM) and 5.x."""
    folder = Path(folder)
    tokenizer.save_pretrained(folder, save_jinja_files=False)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    # transformers 5 writes its own class name (TokenizersBackend); 4.x knows only this one.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = CHAT_TEMPLATE
    config.setdefault("model_max_length", tokenizer.model_max_length)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_map = {"bos_token": END, "eos_token": END, "pad_token": PAD,
                   "additional_special_tokens": [SYSTEM, USER, ASSISTANT, TOOL]}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    (folder / "chat_template.jinja").unlink(missing_ok=True)


def load_tokenizer(folder: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def tokenizer_from_json(data: str):
    """Rebuild the wrapped tokenizer from ``tokenizer.backend_tokenizer.to_str()`` (what
    the driver ships to the workers)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(data), eos_token=END, pad_token=PAD, bos_token=END,
        unk_token=None, additional_special_tokens=[SYSTEM, USER, ASSISTANT, TOOL],
        chat_template=CHAT_TEMPLATE, model_max_length=1024, clean_up_tokenization_spaces=False)
