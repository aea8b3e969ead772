"""The synthetic, seeded tool-use task the platform's own model learns.

A user asks for arithmetic, a unit conversion, a fact about the cluster's pools or how many
of a pool's units are free right now (the live platform tool ``pool_units``, with synthetic
results of the shape it returns); the assistant answers with a tool call (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``),
the tool's result comes back, and the assistant answers in words. Greetings and thanks are
answered directly. Every answer is a deterministic function of the conversation (the model
copies numbers, it never computes them), so exact match is a fair measure.

Splits never overlap: a user request belongs to train, validation or held-out by the hash of
its text alone (independent of the seed), so no request text of the held-out split is ever
trained on. The generator is deterministic for a seed.

A conversation declares the trained tools (``TOOLS``), those the agents' ``tools`` graph
declares (``AGENT_TOOLS``) or none: the model answers whichever prompt a client builds.

``python -m train.data --out DIR [--config CFG]`` writes ``train.jsonl``, ``val.jsonl``,
``heldout.jsonl`` and ``meta.json``: a data folder ``data_path`` can name.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from train.tools import (
    AGENT_TOOLS,
    POOL_FACTS,
    TOOLS,
    UNIT_DIMENSION,
    UNITS,
    calculator,
    convert_units,
    dumps,
    pool_facts,
    pool_info,
    pool_units_result,
)

SPLITS = ("train", "val", "heldout")
#: Share of the request-text space each split owns (by hash). Sizes are drawn from it.
SPLIT_SHARES = {"train": 0.8, "val": 0.1, "heldout": 0.1}
SPLIT_FILES = {s: f"{s}.jsonl" for s in SPLITS}

DEFAULT_SYSTEM = "You are the rayplane assistant. Use a tool when it helps."
SYSTEM_VARIANTS = [DEFAULT_SYSTEM, "You are a helpful assistant for the GPU cluster.",
                   "Answer briefly. Call tools for math, units and pools."]

GREETING_ANSWER = ("Hello! I can do arithmetic, convert units and answer questions about the "
                   "cluster's pools.")

#: The tool lists a conversation may declare (``Example.toolset``).
TOOLSETS: dict[str, list[dict[str, Any]]] = {"trained": TOOLS, "agent": AGENT_TOOLS}


@dataclass
class Example:
    """One conversation: messages in OpenAI shape (tool call arguments as mappings)."""

    id: str
    intent: str
    messages: list[dict[str, Any]]
    with_tools: bool = True
    split: str = ""
    toolset: str = "trained"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def user_text(self) -> str:
        return next(m["content"] for m in self.messages if m["role"] == "user")

    @property
    def tools(self) -> list[dict[str, Any]] | None:
        return TOOLSETS[self.toolset] if self.with_tools else None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "intent": self.intent, "split": self.split,
                "with_tools": self.with_tools, "toolset": self.toolset,
                "messages": self.messages}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Example:
        return cls(id=d["id"], intent=d["intent"], messages=d["messages"],
                   with_tools=d.get("with_tools", True), split=d.get("split", ""),
                   toolset=d.get("toolset", "trained"))

    def turns(self) -> list[tuple[list[dict[str, Any]], str]]:
        """(prompt messages, expected assistant text) for every assistant turn: what the
        evaluation asks the model to produce, exactly."""
        from train.tokenizer import render_text

        out = []
        for i, m in enumerate(self.messages):
            if m["role"] == "assistant":
                rendered = render_text(self.messages[: i + 1], self.tools)
                prompt = render_text(self.messages[:i], self.tools, add_generation_prompt=True)
                expected = rendered[len(prompt):]
                # rendered ends with "<|end|>\n": the expected text is the content alone
                out.append((self.messages[:i], expected.removesuffix("\n").removesuffix(
                    "<|end|>")))
        return out


def split_of(user_text: str) -> str:
    """The split a request text belongs to: a hash of the text, not of the seed."""
    h = int.from_bytes(hashlib.sha256(user_text.encode()).digest()[:8], "big") / 2**64
    acc = 0.0
    for split in SPLITS:
        acc += SPLIT_SHARES[split]
        if h < acc:
            return split
    return SPLITS[-1]


# -- request templates --------------------------------------------------------------------

OP_WORDS = {"+": ["plus"], "-": ["minus"], "*": ["times", "multiplied by"],
            "/": ["divided by", "over"]}
OP_VERBS = {"+": "Add {a} and {b}", "-": "Subtract {b} from {a}", "*": "Multiply {a} by {b}",
            "/": "Divide {a} by {b}"}
ARITH_TEMPLATES = [
    "What is {a} {w} {b}?", "what's {a}{s}{b}", "Compute {a} {s} {b}.",
    "Calculate {a} {w} {b}, please.", "How much is {a} {w} {b}?", "{a} {s} {b} = ?",
    "Can you work out {a} {w} {b}?", "Please calculate {a}{s}{b}", "{a}{s}{b}?",
    "Tell me {a} {w} {b}.", "I need {a} {s} {b}", "Evaluate {a} {s} {b}",
]
ARITH3_TEMPLATES = ["What is ({a} {s} {b}) {s2} {c}?", "Compute ({a}{s}{b}){s2}{c}",
                    "Calculate {a} {s} {b} {s2} {c}.", "what's {a}{s}{b}{s2}{c}",
                    "Evaluate ({a} {s} {b}) {s2} {c}"]

UNIT_NAMES = {
    "mm": "millimeters", "cm": "centimeters", "m": "meters", "km": "kilometers",
    "in": "inches", "ft": "feet", "mi": "miles", "g": "grams", "kg": "kilograms",
    "lb": "pounds", "oz": "ounces", "s": "seconds", "min": "minutes", "h": "hours",
    "day": "days", "KB": "kilobytes", "MB": "megabytes", "GB": "gigabytes", "TB": "terabytes",
    "KiB": "kibibytes", "MiB": "mebibytes", "GiB": "gibibytes",
}
CONVERT_TEMPLATES = [
    "Convert {v} {f} to {t}.", "How many {T} are in {v} {F}?", "What is {v} {f} in {t}?",
    "{v} {F} in {T}?", "Please convert {v} {F} into {T}.", "How much is {v} {f} in {T}?",
    "convert {v}{f} to {t}", "{v} {f} to {t}", "Express {v} {F} in {T}.",
    "I have {v} {F}. How many {T} is that?",
]

POOL_TEMPLATES = {
    "gpu": ["Which GPU does the {p} pool have?", "What GPU model is in {p}?",
            "What GPUs run in the {p} pool?", "{p}: which GPU?", "Tell me the GPU of {p}."],
    "sharing": ["How is the GPU shared in {p}?", "What GPU sharing does the {p} pool use?",
                "Does {p} use MIG or time-slicing?", "{p}: how are GPUs shared?",
                "Which sharing mode has the {p} pool?"],
    "memory": ["How much GPU memory does one unit of {p} get?",
               "How many GB of GPU memory per unit in the {p} pool?",
               "What is the memory per GPU unit on {p}?", "{p}: memory per unit?",
               "How much memory can a replica on {p} use?"],
    "units": ["How many GPU units does a {p} node have?",
              "How many schedulable GPU units per node in {p}?", "{p}: units per node?",
              "How many GPU slots are on one {p} node?", "Count the GPU units of a {p} node."],
    "nodes": ["How many nodes can the {p} pool scale to?", "What is the max node count of {p}?",
              "{p}: how many nodes at most?", "Up to how many nodes does {p} grow?",
              "What is the largest size of the {p} pool in nodes?"],
}
# Live usage, never a catalog fact: every template says free / available / used / busy / now,
# where a pool_info question asks about a node or the pool's make-up.
POOL_UNITS_TEMPLATES = [
    "How many free GPU units does the {p} pool have?", "How many GPU units are free in {p}?",
    "How many GPU units are available on {p} right now?", "Are there free GPUs in the {p} pool?",
    "{p}: free GPU units?", "What is the free capacity of {p}?", "How much of {p} is free?",
    "Is there room on the {p} pool right now?", "Check the free units on {p}.", "{p} usage now?",
    "How many GPUs can I still get on {p}?", "How many units of {p} are available?",
    "How many GPU units are in use on {p}?", "How busy is the {p} pool?", "Free units in {p}?",
    "How many units of {p} are used right now?", "What is the current usage of {p}?",
    "{p}: used units?", "What is the live capacity of {p}?", "Show the current usage of {p}.",
    "How many GPU units does the {p} pool have right now?", "Is the {p} pool full?",
    "How many free units are left in the {p} pool?", "How many {p} units are free at the moment?"]
#: What the local platform emulates per GPU pool node (raycluster.local: 2 units per node).
LOCAL_UNITS_PER_NODE = 2

FAKE_POOLS = ["v100", "t4-pool", "tpu-v5", "l4-timeslice", "a10g", "h200-mig", "gpu",
              "a100-mps", "cpu-large", "inference"]

CHAT = {
    "greeting": (["Hi", "Hello!", "hello there", "Hey", "Good morning", "hi!", "Who are you?",
                  "What can you do?", "Help", "hey there"], GREETING_ANSWER),
    "thanks": (["Thanks!", "thank you", "Thank you very much.", "thx", "Great, thanks."],
               "You're welcome."),
}


def _number(rng: random.Random, small: bool = False) -> int | float:
    r = rng.random()
    if r < 0.15:
        return round(rng.uniform(0, 100), 1)
    if small or r < 0.55:
        return rng.randint(0, 99)
    return rng.randint(100, 999)


def _style(rng: random.Random, text: str) -> str:
    """Small surface variety: lowercase start, dropped final punctuation."""
    if rng.random() < 0.2 and text[:1].isupper():
        text = text[0].lower() + text[1:]
    if rng.random() < 0.15 and text[-1:] in ".?":
        text = text[:-1]
    return text


def _tool_call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": name,
                                                             "arguments": arguments}}]}


def _pretty(expr: str) -> str:
    out = ""
    for ch in expr:
        out += f" {ch} " if ch in "+-*/" else ch
    return out


def _arith(rng: random.Random) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    if rng.random() < 0.25:
        a, b, c = _number(rng, True), _number(rng, True), _number(rng, True)
        s, s2 = rng.choice("+-*"), rng.choice("+-*/")
        template = rng.choice(ARITH3_TEMPLATES)
        text = template.format(a=a, b=b, c=c, s=s, s2=s2)
        paren = "(" in template
        expr = f"({a}{s}{b}){s2}{c}" if paren else f"{a}{s}{b}{s2}{c}"
    else:
        a, b = _number(rng), _number(rng)
        s = rng.choice("+-*/")
        if s == "/" and rng.random() < 0.05:
            b = 0
        if rng.random() < 0.2:
            text = OP_VERBS[s].format(a=a, b=b) + rng.choice([".", "", " please."])
        else:
            text = rng.choice(ARITH_TEMPLATES).format(a=a, b=b, s=s, w=rng.choice(OP_WORDS[s]))
        expr = f"{a}{s}{b}"
    result = calculator(expr)
    if "error" in result:
        answer = "I can't divide by zero."
    else:
        answer = f"{_pretty(expr)} = {result['result']}."
    return text, [_tool_call("calculator", {"expression": expr}),
                  {"role": "tool", "content": dumps(result)},
                  {"role": "assistant", "content": answer}], {"expression": expr}


def _convert(rng: random.Random) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    dim = rng.choice(list(UNITS))
    f, t = rng.sample(list(UNITS[dim]), 2)
    if rng.random() < 0.04:  # a conversion across dimensions: the tool says no
        t = rng.choice([u for u in UNIT_DIMENSION if UNIT_DIMENSION[u] != dim])
    v = _number(rng)
    template = rng.choice(CONVERT_TEMPLATES)
    # The unit is written as its symbol or its name; the call always uses the symbol.
    fs = f if rng.random() < 0.5 else UNIT_NAMES[f]
    ts = t if rng.random() < 0.5 else UNIT_NAMES[t]
    text = template.format(v=v, f=fs, t=ts, F=UNIT_NAMES[f], T=UNIT_NAMES[t])
    args = {"value": v, "from_unit": f, "to_unit": t}
    result = convert_units(**args)
    if "error" in result:
        answer = f"I can't convert {f} to {t}."
    else:
        answer = f"{v} {f} is {result['result']} {t}."
    return text, [_tool_call("convert_units", args), {"role": "tool", "content": dumps(result)},
                  {"role": "assistant", "content": answer}], args


def pool_answer(pool: str, fact: str, result: dict[str, Any]) -> str:
    """The answer to a pool question, a function of the tool result alone."""
    if "error" in result:
        return f"There is no pool named {pool}."
    value = result[fact]
    if fact == "gpu":
        return (f"The {pool} pool has no GPUs." if value == "none"
                else f"The {pool} pool has {value} GPUs.")
    if fact == "sharing":
        return (f"The {pool} pool does not share GPUs." if value == "none"
                else f"The {pool} pool shares GPUs by {value}.")
    if fact == "memory":
        return (f"The {pool} pool has no GPU memory." if not value
                else f"Each unit of the {pool} pool has {value} GB of GPU memory.")
    if fact == "units":
        return (f"The {pool} pool has no GPU units." if not value
                else f"Each {pool} node has {value} GPU units.")
    return f"The {pool} pool scales up to {value} nodes."


def _pool(rng: random.Random) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    pools = list(pool_facts())
    pool = rng.choice(FAKE_POOLS) if rng.random() < 0.12 else rng.choice(pools)
    fact = rng.choice(POOL_FACTS)
    text = rng.choice(POOL_TEMPLATES[fact]).format(p=pool)
    args = {"pool": pool, "fact": fact}
    result = pool_info(**args)
    return text, [_tool_call("pool_info", args), {"role": "tool", "content": dumps(result)},
                  {"role": "assistant", "content": pool_answer(pool, fact, result)}], args


def pool_units_answer(pool: str, result: dict[str, Any]) -> str:
    """The answer to a live-usage question, a function of the pool_units result alone: one
    sentence with free, total and used units, whichever of them was asked."""
    if "error" in result:
        return f"There is no pool named {pool}."
    unit = "CPUs" if result.get("unit") == "cpus" else "GPU units"
    if result.get("free") is None:
        return (f"The {pool} pool has {result['total']} {unit}; the cluster has not reported "
                "how many are free yet.")
    return (f"The {pool} pool has {result['free']} free {unit} of {result['total']} "
            f"({result['used']} used).")


def _pool_units(rng: random.Random) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    facts = pool_facts()
    pools = list(facts)
    pool = rng.choice(FAKE_POOLS) if rng.random() < 0.1 else rng.choice(pools)
    text = rng.choice(POOL_UNITS_TEMPLATES).format(p=pool)
    if pool in facts:
        gpu = bool(facts[pool]["units"])
        # The catalog's node sizes (EKS) or the local platform's emulated ones.
        nodes = rng.randint(1, facts[pool]["nodes"])
        total = nodes * (rng.choice([facts[pool]["units"], LOCAL_UNITS_PER_NODE, rng.randint(
            1, 8)]) if gpu else rng.choice([2, 4, 8, 16, 32]))
        used: float | None = rng.randint(0, total)
        if rng.random() < 0.25 and used:  # fractional requests (0.1 CPU for a Serve proxy)
            used = round(used - rng.randint(1, 9) / 10, 1)
        if rng.random() < 0.05:
            used = None
        result = pool_units_result(pool, unit="gpu_units" if gpu else "cpus", total=total,
                                   used=used, nodes=nodes)
    else:
        result = pool_units_result(pool, pools=pools)
    args = {"pool": pool}
    return text, [_tool_call("pool_units", args), {"role": "tool", "content": dumps(result)},
                  {"role": "assistant", "content": pool_units_answer(pool, result)}], args


def _chat(rng: random.Random) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    kind = rng.choice(list(CHAT))
    texts, answer = CHAT[kind]
    return rng.choice(texts), [{"role": "assistant", "content": answer}], {}


INTENTS = {"calculator": (_arith, 0.30), "convert_units": (_convert, 0.25),
           "pool_info": (_pool, 0.22), "pool_units": (_pool_units, 0.18),
           "chat": (_chat, 0.05)}


def stream(seed: int) -> Iterator[Example]:
    """An endless, seeded stream of examples (split not yet assigned)."""
    rng = random.Random(seed)
    names = list(INTENTS)
    weights = [INTENTS[n][1] for n in names]
    i = 0
    while True:
        intent = rng.choices(names, weights)[0]
        text, replies, _ = INTENTS[intent][0](rng)
        text = _style(rng, text)
        r = rng.random()
        messages: list[dict[str, Any]] = []
        with_tools = r < 0.9
        # The agents' graph sends no system prompt unless configured: more prompts without one.
        if r < 0.6:
            messages.append({"role": "system", "content": DEFAULT_SYSTEM})
        elif r < 0.7:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_VARIANTS[1:])})
        toolset = "agent" if rng.random() < 0.5 else "trained"
        messages.append({"role": "user", "content": text})
        messages += replies
        yield Example(id=f"{seed}-{i}", intent=intent, messages=messages, with_tools=with_tools,
                      toolset=toolset)
        i += 1


def generate(seed: int, sizes: dict[str, int], max_attempts_factor: int = 40
             ) -> dict[str, list[Example]]:
    """Examples per split, drawn from one seeded stream; each request text's split is fixed
    by its hash. Validation and held-out requests are unique; train may repeat the few
    requests whose text space is small (greetings)."""
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    seen: dict[str, set[str]] = {s: set() for s in SPLITS}
    budget = max_attempts_factor * max(1, sum(sizes.values()))
    for n, ex in enumerate(stream(seed)):
        if n >= budget or all(len(out[s]) >= sizes.get(s, 0) for s in SPLITS):
            break
        split = split_of(ex.user_text)
        if len(out[split]) >= sizes.get(split, 0):
            continue
        if split != "train" and ex.user_text in seen[split]:
            continue
        seen[split].add(ex.user_text)
        ex.split = split
        out[split].append(ex)
    return out


def write_splits(folder: str | Path, splits: dict[str, list[Example]],
                 meta: dict[str, Any] | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, examples in splits.items():
        with open(folder / SPLIT_FILES[split], "w") as f:
            f.writelines(json.dumps(ex.to_json(), ensure_ascii=False) + "\n" for ex in examples)
    info = {"task": "rayplane-tool-use", "sizes": {s: len(v) for s, v in splits.items()},
            **(meta or {})}
    (folder / "meta.json").write_text(json.dumps(info, indent=2) + "\n")
    return folder


def read_split(folder: str | Path, split: str) -> list[Example]:
    path = Path(folder) / SPLIT_FILES[split]
    with open(path) as f:
        return [Example.from_json(json.loads(line)) for line in f if line.strip()]


def missing_files(folder: str | Path) -> list[str]:
    return [name for name in SPLIT_FILES.values() if not (Path(folder) / name).is_file()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.data", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="Folder to write the splits to.")
    parser.add_argument("--config", help="Training config whose data sizes and seed to use.")
    parser.add_argument("--seed", type=int, help="Seed (default: the config's, else 0).")
    args = parser.parse_args(argv)
    from raycluster.spec import SpecError
    from train.config import DataSpec, TrainConfig

    try:
        spec = TrainConfig.from_file(args.config).data if args.config else DataSpec()
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seed = spec.seed if args.seed is None else args.seed
    splits = generate(seed, spec.sizes)
    folder = write_splits(args.out, splits, {"seed": seed})
    print(f"wrote {', '.join(f'{len(v)} {k}' for k, v in splits.items())} examples to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
