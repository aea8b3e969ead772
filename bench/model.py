"""A model of the demo's size for the serving benchmark, built with the training layer's own
code: the demo config's layers and width (train/configs/demo.yaml), a tokenizer trained on the
demo task's conversations, a short training run (about a minute on 2 cores) so that its greedy
output is words and spaces -- a streamer that sends whole words, like the FastAPI baseline's,
then streams it as it would a real reply -- saved in the platform's model format
(docs/model-format.md). Throughput does not depend on how well it is trained otherwise: every
request generates exactly ``max_tokens`` tokens."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "train" / "configs" / "demo.yaml"


def demo_size_model(folder: str | Path, *, config: str | Path = DEMO_CONFIG,
                    n_positions: int = 256, conversations: int = 512, steps: int = 200,
                    batch_size: int = 32) -> Path:
    """Write the model folder to ``folder`` and return it. ``n_positions`` is the context (256,
    more than the demo's 128, so a long ``--max-tokens`` fits)."""
    import torch

    from train.config import TrainConfig
    from train.data import generate
    from train.loop import collate, encode_examples
    from train.model import build_model, save_model_folder
    from train.tokenizer import PAD, render_text, train_tokenizer

    cfg = TrainConfig.from_file(config)
    size = cfg.model.model_copy(update={"n_positions": n_positions})
    examples = generate(cfg.data.seed, {"train": conversations})["train"]
    tok = train_tokenizer([render_text(e.messages, e.tools) for e in examples],
                          cfg.data.vocab_size)
    ids, masks, _ = encode_examples(tok, examples, size.n_positions)
    model = build_model(size, tok, seed=cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    for _ in range(steps):
        pick = torch.randperm(len(ids), generator=gen)[:batch_size].tolist()
        input_ids, attention, labels = collate([ids[i] for i in pick], [masks[i] for i in pick],
                                               tok.convert_tokens_to_ids(PAD))
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return save_model_folder(model, tok, folder)


__all__ = ["demo_size_model"]
