"""Evaluation on the held-out split: exact match of tool calls and answers.

Every assistant turn of a held-out conversation is a prompt (the conversation up to it, with
the reference earlier turns, rendered by the chat template) and an expected text. The model
decodes greedily until ``<|end|>``; a turn counts when its text is exactly the expected one
(for a tool call: the same ``<tool_call>{...}</tool_call>``, byte for byte). A conversation
counts when all its turns do; ``exact_match`` is the share of conversations that count.

``python -m train.evaluate MODEL_DIR [--data DIR | --config CFG]`` evaluates a model folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from train.data import Example
from train.tokenizer import END, PAD, encode_segments, render


@dataclass
class EvalResult:
    exact_match: float
    tool_call_exact_match: float
    answer_exact_match: float
    conversations: int
    turns: int
    by_intent: dict[str, float]
    seconds: float
    failures: list[dict[str, Any]] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        out = {"eval_exact_match": self.exact_match,
               "eval_tool_call_exact_match": self.tool_call_exact_match,
               "eval_answer_exact_match": self.answer_exact_match,
               "eval_conversations": float(self.conversations),
               "eval_seconds": self.seconds}
        out.update({f"eval_exact_match_{k}": v for k, v in self.by_intent.items()})
        return out

    def summary(self) -> str:
        intents = ", ".join(f"{k} {v:.1%}" for k, v in sorted(self.by_intent.items()))
        return (f"held-out exact match {self.exact_match:.1%} of {self.conversations} "
                f"conversations (tool calls {self.tool_call_exact_match:.1%}, answers "
                f"{self.answer_exact_match:.1%}; {intents}) in {self.seconds:.1f}s")


def greedy_decode(model, prompts: list[list[int]], end_id: int, max_new_tokens: int,
                  max_positions: int, batch_size: int, pad_id: int = 0) -> list[list[int]]:
    """Greedy continuations, stopping at ``end_id``, with a KV cache. Prompts are sorted by
    length and left-padded within a batch; the attention mask hides the padding and the
    position ids count only real tokens, so every row decodes as it would alone."""
    import torch

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        budget = min(max_new_tokens, max_positions - width)
        if budget <= 0:
            continue
        x = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            n = len(prompts[i])
            x[row, width - n:] = torch.tensor(prompts[i])
            mask[row, width - n:] = 1
        x, mask = x.to(device), mask.to(device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
        past = None
        generated = []
        with torch.no_grad():
            for _ in range(budget):
                outputs = model(input_ids=x, attention_mask=mask, position_ids=positions,
                                past_key_values=past, use_cache=True)
                past = outputs.past_key_values
                nxt = outputs.logits[:, -1, :].argmax(dim=-1)
                generated.append(nxt)
                done |= nxt == end_id
                if bool(done.all()):
                    break
                x = nxt[:, None]
                positions = positions[:, -1:] + 1
                mask = torch.cat([mask, torch.ones_like(x)], dim=1)
        tokens = torch.stack(generated, dim=1).tolist()
        for row, i in zip(tokens, chunk, strict=True):
            out[i] = row[: row.index(end_id)] if end_id in row else row
    return out


def evaluate(model, tokenizer, examples: list[Example], max_new_tokens: int = 64,
             batch_size: int = 64, max_failures_kept: int = 20) -> EvalResult:
    started = time.perf_counter()
    model.eval()
    end_id = tokenizer.convert_tokens_to_ids(END)
    pad_id = tokenizer.convert_tokens_to_ids(PAD)
    prompts: list[list[int]] = []
    expected: list[str] = []
    owner: list[tuple[int, str]] = []
    for ci, ex in enumerate(examples):
        for messages, text in ex.turns():
            ids, _ = encode_segments(tokenizer, render(messages, ex.tools,
                                                       add_generation_prompt=True))
            prompts.append(ids)
            expected.append(text)
            owner.append((ci, "tool_call" if text.startswith("<tool_call>") else "answer"))
    max_positions = model.config.n_positions
    outputs = greedy_decode(model, prompts, end_id, max_new_tokens, max_positions, batch_size,
                            pad_id)
    conv_ok = [True] * len(examples)
    kind_hits: dict[str, list[int]] = defaultdict(list)
    failures: list[dict[str, Any]] = []
    for (ci, kind), ids, want in zip(owner, outputs, expected, strict=True):
        got = tokenizer.decode(ids, skip_special_tokens=False)
        ok = got == want
        kind_hits[kind].append(int(ok))
        if not ok:
            conv_ok[ci] = False
            if len(failures) < max_failures_kept:
                failures.append({"id": examples[ci].id, "intent": examples[ci].intent,
                                 "user": examples[ci].user_text, "expected": want, "got": got})
    intents: dict[str, list[int]] = defaultdict(list)
    for ex, ok in zip(examples, conv_ok, strict=True):
        intents[ex.intent].append(int(ok))

    def share(xs: list[int]) -> float:
        return sum(xs) / len(xs) if xs else 0.0

    return EvalResult(
        exact_match=share([int(x) for x in conv_ok]),
        tool_call_exact_match=share(kind_hits["tool_call"]),
        answer_exact_match=share(kind_hits["answer"]),
        conversations=len(examples), turns=len(prompts),
        by_intent={k: share(v) for k, v in intents.items()},
        seconds=time.perf_counter() - started, failures=failures)


def evaluate_folder(folder: str, examples: list[Example], max_new_tokens: int = 64,
                    batch_size: int = 64, threads: int | None = None) -> EvalResult:
    """Evaluate a model folder (or a checkpoint folder, which holds one)."""
    import torch
    from transformers.utils import logging as hf_logging

    from train.model import load_model_folder

    hf_logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model_folder(folder, device)
    return evaluate(model, tokenizer, examples, max_new_tokens, batch_size)


def evaluate_checkpoint(checkpoint, cfg_dict: dict[str, Any]) -> EvalResult:
    """Ray task body: evaluate a Ray Train checkpoint (a model folder) on the held-out split
    of the run's config."""
    import os

    import ray

    from train.config import TrainConfig
    from train.loop import load_split

    cfg = TrainConfig.parse(cfg_dict)
    examples = load_split(cfg, "heldout")[: cfg.eval.max_examples]
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
    threads = cfg.threads_per_worker or (int(cpus) if cpus >= 1 else os.cpu_count() or 1)
    with checkpoint.as_directory() as folder:
        return evaluate_folder(folder, examples, cfg.eval.max_new_tokens, cfg.eval.batch_size,
                               threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate",
                                     description="Held-out exact match of a model folder.")
    parser.add_argument("model_dir")
    parser.add_argument("--config", help="Training config (its data seed and sizes).")
    parser.add_argument("--data", help="Data folder with heldout.jsonl (python -m train.data).")
    parser.add_argument("--limit", type=int, default=None, help="Conversations to score.")
    parser.add_argument("--json", action="store_true", help="Print the metrics as JSON.")
    args = parser.parse_args(argv)
    from raycluster.spec import SpecError
    from train.config import DataSpec, TrainConfig
    from train.data import generate, read_split

    try:
        if args.data:
            examples = read_split(args.data, "heldout")
        else:
            spec = TrainConfig.load(args.config).data if args.config else DataSpec()
            examples = generate(spec.seed, {"heldout": spec.heldout_size})["heldout"]
    except (SpecError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = evaluate_folder(args.model_dir, examples[: args.limit])
    if args.json:
        print(json.dumps(result.metrics(), indent=2))
    else:
        print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
