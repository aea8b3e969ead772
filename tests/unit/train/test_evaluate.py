"""Exact-match evaluation, checked with a real (if trivial) causal LM: a lookup model that
continues every reference conversation correctly, and one that gets the answers wrong."""

from __future__ import annotations

import pytest
import torch

from train.data import generate
from train.evaluate import evaluate
from train.tokenizer import encode_segments, render, render_text, train_tokenizer


class LookupLM(torch.nn.Module):
    """Predicts the next token of whichever reference sequence has the same prefix (one
    token per step, through ``past_key_values`` exactly like a transformer)."""

    def __init__(self, sequences: list[list[int]], vocab: int, corrupt_answers_of=()):
        super().__init__()
        self.table: dict[tuple[int, ...], int] = {}
        for seq in sequences:
            for i in range(1, len(seq)):
                self.table.setdefault(tuple(seq[:i]), seq[i])
        self.vocab = vocab
        self.corrupt = set(corrupt_answers_of)
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = type("Config", (), {"n_positions": 512})()

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=True):
        full = input_ids if past_key_values is None else torch.cat([past_key_values, input_ids],
                                                                   dim=1)
        mask = attention_mask if attention_mask is not None else torch.ones_like(full)
        logits = torch.zeros(full.shape[0], full.shape[1], self.vocab)
        for b, (tokens, keep) in enumerate(zip(full.tolist(), mask.tolist())):
            row = [t for t, k in zip(tokens, keep) if k]  # left padding is not content
            nxt = self.table.get(tuple(row), 1)
            if tuple(row) in self.corrupt:
                nxt = 7  # a wrong first token of the answer
            logits[b, -1, nxt] = 1.0
        return type("Out", (), {"logits": logits, "past_key_values": full})()


@pytest.fixture(scope="module")
def setup():
    data = generate(4, {"train": 400, "val": 1, "heldout": 40})
    tok = train_tokenizer([render_text(e.messages, e.tools) for e in data["train"]], 500)
    seqs = [encode_segments(tok, render(e.messages, e.tools))[0] for e in data["heldout"]]
    return data["heldout"], tok, seqs


def test_a_model_that_continues_every_reference_scores_one(setup):
    examples, tok, seqs = setup
    result = evaluate(LookupLM(seqs, len(tok)), tok, examples, batch_size=8)
    assert result.exact_match == 1.0
    assert result.tool_call_exact_match == 1.0 and result.answer_exact_match == 1.0
    assert result.conversations == len(examples)
    assert result.turns == sum(len(e.turns()) for e in examples)
    assert result.failures == []


def test_wrong_answers_count_against_their_conversations(setup):
    examples, tok, seqs = setup
    tool_examples = [i for i, e in enumerate(examples) if e.intent != "chat"][:10]
    corrupt = []
    for i in tool_examples:
        prompt, _ = examples[i].turns()[-1]
        ids, _ = encode_segments(tok, render(prompt, examples[i].tools,
                                             add_generation_prompt=True))
        corrupt.append(tuple(ids))
    result = evaluate(LookupLM(seqs, len(tok), corrupt), tok, examples, batch_size=8)
    assert result.exact_match == pytest.approx(1 - len(tool_examples) / len(examples))
    assert result.tool_call_exact_match == 1.0
    assert result.answer_exact_match < 1.0
    assert result.failures and result.failures[0]["expected"] != result.failures[0]["got"]
    assert "exact match" in result.summary()


def test_padded_batches_decode_like_single_prompts(setup):
    """Left padding with position ids: a real GPT-2 decodes each prompt of a mixed-length
    batch exactly as it decodes that prompt alone."""
    from train.config import ModelSize
    from train.evaluate import greedy_decode
    from train.model import build_model

    examples, tok, _ = setup
    model = build_model(ModelSize(n_layer=2, n_head=2, n_embd=32, n_positions=256), tok, seed=3)
    model.eval()
    prompts = [encode_segments(tok, render(e.messages[:2], e.tools, True))[0]
               for e in examples[:6]]
    assert len({len(p) for p in prompts}) > 1
    batched = greedy_decode(model, prompts, end_id=1, max_new_tokens=12, max_positions=256,
                            batch_size=6)
    alone = [greedy_decode(model, [p], 1, 12, 256, 1)[0] for p in prompts]
    assert batched == alone
