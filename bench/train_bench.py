"""Training throughput: one Ray Train worker against a plain PyTorch loop.

The same model (the demo size unless ``--config`` says otherwise), the same tokenized task,
the same batches, optimizer and thread count, measured in the same run and alternated in
rounds (plain, Ray, plain, Ray, ...) so that both see the same machine. The Ray side is a
``TorchTrainer`` with one worker running the step function through ``prepare_model`` and
reporting to Ray Train every ``--report-every`` steps, as ``train.fit`` does. Throughput is
conversations per second over the steady state (the first ``--warmup`` steps of each round
are not timed). The ratio Ray / plain is the figure; the goal is >= 0.9.

    .venv/bin/python bench/train_bench.py [--config train/configs/demo.yaml] [--steps 150]
        [--rounds 2] [--json out.json]

It starts its own Ray instance in this process (``ray.init``), so it needs no platform.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def prepare(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """Tokenizer and encoded data: built once, shipped to both sides."""
    from train.config import TrainConfig
    from train.loop import encode_examples, load_split
    from train.tokenizer import render_text, train_tokenizer

    cfg = TrainConfig.parse(cfg_dict)
    train = load_split(cfg, "train")
    tok = train_tokenizer([render_text(e.messages, e.tools) for e in train], cfg.data.vocab_size)
    ids, masks, _ = encode_examples(tok, train, cfg.model.n_positions)
    return {"tokenizer": tok.backend_tokenizer.to_str(), "ids": ids, "masks": masks}


def run_steps(cfg_dict: dict[str, Any], data: dict[str, Any], steps: int, warmup: int,
              threads: int, in_ray: bool, report_every: int) -> dict[str, float]:
    """The measured loop, identical for both sides but for Ray's prepare_model/report."""
    import torch

    from train.config import TrainConfig
    from train.loop import batch_indices, collate
    from train.model import build_model
    from train.tokenizer import PAD, tokenizer_from_json

    torch.set_num_threads(threads)
    cfg = TrainConfig.parse(cfg_dict)
    tok = tokenizer_from_json(data["tokenizer"])
    model = build_model(cfg.model, tok, seed=cfg.seed)
    if in_ray:
        import ray.train
        import ray.train.torch

        model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    pad = tok.convert_tokens_to_ids(PAD)
    ids, masks = data["ids"], data["masks"]
    model.train()
    examples = tokens = 0
    started = 0.0
    for step in range(1, steps + 1):
        if step == warmup + 1:
            started = time.perf_counter()
            examples = tokens = 0
        idx = batch_indices(len(ids), cfg.batch_size, cfg.seed, step, 0)
        x, a, y = collate([ids[i] for i in idx], [masks[i] for i in idx], pad)
        loss = model(input_ids=x, attention_mask=a, labels=y).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        examples += len(idx)
        tokens += int(a.sum())
        if in_ray and step % report_every == 0:
            import ray.train

            ray.train.report({"step": step, "loss": float(loss.detach())})
    seconds = time.perf_counter() - started
    return {"examples_per_s": examples / seconds, "tokens_per_s": tokens / seconds,
            "seconds": seconds, "threads": torch.get_num_threads()}


def ray_worker(config: dict[str, Any]) -> None:
    import ray
    import ray.train

    data = ray.get(config["data"])  # fetched before the timed steps
    result = run_steps(config["cfg"], data, config["steps"], config["warmup"],
                       config["threads"], True, config["report_every"])
    # Ray Train's Result carries the metrics of checkpointed reports only: hand the figures
    # back through a file (the bench's Ray instance is on this machine).
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["out"]).write_text(json.dumps(result))


def run_ray(cfg_dict, data, steps, warmup, threads, report_every, storage) -> dict[str, float]:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        ray_worker,
        train_loop_config={"cfg": cfg_dict, "data": ray.put(data), "steps": steps,
                           "warmup": warmup, "threads": threads, "report_every": report_every,
                           "out": str(Path(storage) / "result.json")},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": threads}),
        run_config=RunConfig(name=f"train-bench-{time.time_ns()}", storage_path=storage))
    trainer.fit()
    return json.loads((Path(storage) / "result.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "train/configs/demo.yaml"))
    parser.add_argument("--steps", type=int, default=150, help="Steps per round.")
    parser.add_argument("--warmup", type=int, default=20, help="Untimed steps per round.")
    parser.add_argument("--rounds", type=int, default=2, help="Rounds of (plain, Ray).")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--report-every", type=int, default=50)
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--json", help="Write the results here too.")
    args = parser.parse_args(argv)

    import tempfile

    import ray

    from train.config import TrainConfig

    cfg = TrainConfig.load(args.config, [f"data.train_size={args.train_size}",
                                         "storage_path=/tmp/rayplane-train-bench"])
    cfg_dict = cfg.to_dict()
    print(f"model {cfg.model.n_layer}x{cfg.model.n_embd}, batch {cfg.batch_size}, "
          f"{args.threads} threads, {args.steps} steps/round ({args.warmup} untimed), "
          f"{args.rounds} rounds", flush=True)
    data = prepare(cfg_dict)
    # The data object is passed by reference into the (remote) Ray worker: ray.put in
    # run_ray; the plain loop uses it directly.
    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False,
             runtime_env={"py_modules": [str(REPO / "train"), str(REPO / "raycluster")]})
    rounds = []
    with tempfile.TemporaryDirectory(prefix="train-bench-") as storage:
        for r in range(args.rounds):
            plain = run_steps(cfg_dict, data, args.steps, args.warmup, args.threads, False,
                              args.report_every)
            in_ray = run_ray(cfg_dict, data, args.steps, args.warmup, args.threads,
                             args.report_every, storage)
            rounds.append({"plain": plain, "ray": in_ray,
                           "ratio": in_ray["examples_per_s"] / plain["examples_per_s"]})
            print(f"round {r + 1}: plain {plain['examples_per_s']:.1f} ex/s, Ray Train "
                  f"{in_ray['examples_per_s']:.1f} ex/s, ratio {rounds[-1]['ratio']:.3f}",
                  flush=True)
    ray.shutdown()
    plain_med = statistics.median(r["plain"]["examples_per_s"] for r in rounds)
    ray_med = statistics.median(r["ray"]["examples_per_s"] for r in rounds)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "model": f"{cfg.model.n_layer} layers x {cfg.model.n_embd}",
        "batch_size": cfg.batch_size, "threads": args.threads, "steps": args.steps,
        "plain_examples_per_s": plain_med, "ray_examples_per_s": ray_med,
        "ratio": ray_med / plain_med, "rounds": rounds,
    }
    print(f"Ray Train / plain PyTorch throughput: {result['ratio']:.3f} "
          f"(median of {args.rounds} rounds: {ray_med:.1f} vs {plain_med:.1f} "
          f"conversations/s; goal >= 0.9)", flush=True)
    print("RAYPLANE_TRAIN_BENCH " + json.dumps({k: v for k, v in result.items()
                                                  if k != "rounds"}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
