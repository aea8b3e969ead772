"""The training function every Ray Train worker runs (``train_loop_per_worker``).

One function serves ``train.fit``, every trial of ``train.tune`` and the benchmark: DDP via
``ray.train.torch.prepare_model``, mixed precision on GPU, a sharded loader (each worker
samples only its own shard), validation + ``ray.train.report`` with a checkpoint every
``checkpoint_every`` steps, and resume from ``ray.train.get_checkpoint()`` at the step after
the checkpoint's. Batches are a function of (seed, step, rank), so a resumed run trains on
exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from train.config import TrainConfig
from train.data import Example, generate, read_split
from train.sink import MetricsSink
from train.tokenizer import PAD, SPECIAL_TOKENS, render
from train.tracking import read_pending

TRAIN_STATE = "train_state.pt"
TRAIN_STATE_JSON = "train_state.json"
IGNORE = -100


# -- data ---------------------------------------------------------------------------------


def load_split(cfg: TrainConfig, split: str) -> list[Example]:
    """A split of the task: read from ``data_path``, or generated from ``data.seed``."""
    if cfg.data_path:
        return read_split(cfg.data_path, split)
    return generate(cfg.data.seed, {split: cfg.data.sizes[split]})[split]


def encode_examples(tokenizer, examples: list[Example], max_len: int
                    ) -> tuple[list[list[int]], list[list[int]], int]:
    """(ids, loss masks, examples dropped for length), encoding all segments in one batch."""
    backend = tokenizer.backend_tokenizer
    special = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    rendered = [render(ex.messages, ex.tools) for ex in examples]
    texts = sorted({s.text for segs in rendered for s in segs if s.text not in special})
    encoded = backend.encode_batch(texts, add_special_tokens=False)
    table = {t: e.ids for t, e in zip(texts, encoded, strict=True)}
    all_ids, all_masks, dropped = [], [], 0
    for segs in rendered:
        ids: list[int] = []
        mask: list[int] = []
        for seg in segs:
            piece = [special[seg.text]] if seg.text in special else table[seg.text]
            ids += piece
            mask += [int(seg.train)] * len(piece)
        if len(ids) > max_len:
            dropped += 1
            continue
        all_ids.append(ids)
        all_masks.append(mask)
    return all_ids, all_masks, dropped


def collate(ids: list[list[int]], masks: list[list[int]], pad_id: int):
    """Right-padded input_ids, attention_mask and labels (-100 outside assistant turns)."""
    import torch

    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    labels = torch.full((len(ids), width), IGNORE, dtype=torch.long)
    for i, (x, m) in enumerate(zip(ids, masks, strict=True)):
        n = len(x)
        input_ids[i, :n] = torch.tensor(x)
        attention[i, :n] = 1
        labels[i, :n] = torch.tensor([t if keep else IGNORE for t, keep in zip(x, m,
                                                                                strict=True)])
    return input_ids, attention, labels


def batch_indices(n: int, batch_size: int, seed: int, step: int, rank: int) -> np.ndarray:
    """The examples of ``step`` on ``rank``: fixed by (seed, step, rank), so resume is exact."""
    rng = np.random.default_rng([seed, step, rank])
    return rng.choice(n, size=min(batch_size, n), replace=False)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio (step counts from 1)."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# -- the worker -----------------------------------------------------------------------------


@dataclass
class Resume:
    step: int = 0
    restarts: int = 0          # worker-group restarts within one submission (FailureConfig)
    resubmissions: int = 0     # submissions of the same run name that continued it
    submission: str = ""


def say(message: str) -> None:
    """One line to the worker's stdout, which Ray forwards to the job's log. (Ray Train
    patches ``print`` into its logger and tees it when stdout is wrapped: lines doubled.)"""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def _threads(cfg: TrainConfig, local_world_size: int) -> int:
    import ray

    if cfg.threads_per_worker:
        return cfg.threads_per_worker
    assigned = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
    if assigned >= 1:
        return int(assigned)
    # Local GPU-pool nodes advertise no CPUs: the workers of the node share its cores.
    return max(1, (os.cpu_count() or 1) // max(1, local_world_size))


def _report(metrics: dict[str, Any], checkpoint=None, name: str | None = None) -> None:
    """Every rank reports (it is a barrier); only rank 0 hands over a checkpoint."""
    import ray.train

    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """``config``: {"cfg": TrainConfig as a dict, "tokenizer": tokenizer JSON,
    "mlflow_run_id": str | None, "submission": str}."""
    import ray.train
    import ray.train.torch
    import torch
    from transformers.utils import logging as hf_logging

    from train.model import build_model, save_model_folder, with_loss
    from train.tokenizer import load_tokenizer, tokenizer_from_json

    hf_logging.disable_progress_bar()  # "Writing model shards" bars at every checkpoint
    cfg = TrainConfig.parse(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(_threads(cfg, ctx.get_local_world_size()))
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"

    # -- resume -----------------------------------------------------------------------
    resume = Resume(submission=config.get("submission", ""))
    checkpoint = ray.train.get_checkpoint()
    state: dict[str, Any] | None = None
    unsent: list[dict[str, Any]] = []
    tokenizer = None
    model = None
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            from transformers import GPT2LMHeadModel

            tokenizer = load_tokenizer(folder)
            model = with_loss(GPT2LMHeadModel.from_pretrained(folder))
            state = torch.load(Path(folder) / TRAIN_STATE, map_location="cpu", weights_only=True)
            saved = json.loads((Path(folder) / TRAIN_STATE_JSON).read_text())
            unsent = read_pending(folder)  # metrics MLflow had not taken by then
        resume.step = int(saved["step"])
        same = saved.get("submission") == resume.submission
        resume.restarts = int(saved.get("restarts", 0)) + (1 if same else 0)
        resume.resubmissions = int(saved.get("resubmissions", 0)) + (0 if same else 1)
        if same:
            # Reached only when Ray restarted the worker group (FailureConfig).
            say(f"[rank {rank}] worker restart {resume.restarts}: resuming from checkpoint "
                  f"step {resume.step}")
        else:
            say(f"[rank {rank}] run {cfg.name!r} re-submitted: continuing from checkpoint "
                  f"step {resume.step}")
    if tokenizer is None:
        tokenizer = tokenizer_from_json(config["tokenizer"])
    if model is None:
        model = build_model(cfg.model, tokenizer, seed=cfg.seed)
    pad_id = tokenizer.convert_tokens_to_ids(PAD)

    # -- data: each worker keeps its own shard ----------------------------------------
    train_ids, train_masks, dropped = encode_examples(
        tokenizer, load_split(cfg, "train")[rank::world], cfg.model.n_positions)
    val_ids, val_masks, _ = encode_examples(
        tokenizer, load_split(cfg, "val")[rank::world], cfg.model.n_positions)
    if dropped and rank == 0:
        say(f"[rank 0] {dropped} training conversations are longer than "
              f"model.n_positions={cfg.model.n_positions} and were left out")
    if not train_ids:
        raise ValueError(f"worker {rank} has no training data: data.train_size "
                         f"({cfg.data.train_size}) is smaller than num_workers ({world}) or "
                         "every conversation is longer than model.n_positions")

    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.98))
    amp_dtype = None
    if on_gpu and cfg.amp:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])

    # -- rank 0's loggers ---------------------------------------------------------------
    sink = MetricsSink(None, None)
    if rank == 0:
        wandb_run = None
        if cfg.wandb is not None:
            wandb_run = _setup_wandb(cfg, config)
        sink = MetricsSink(config.get("tracking_uri"), config.get("mlflow_run_id"), wandb_run,
                           say=say)
        sink.restore(unsent)
        if resume.step:
            sink.log({"resumed_from_step": resume.step, "restarts": resume.restarts,
                      "resubmissions": resume.resubmissions}, step=resume.step)
            sink.flush()

    def autocast():
        if amp_dtype is None:
            import contextlib

            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=amp_dtype)

    def validate() -> float:
        # The unwrapped module: DDP's forward would sync with the other ranks, whose
        # validation shards may need a different number of batches.
        net = getattr(model, "module", model)
        net.eval()
        total = torch.zeros(2, dtype=torch.float64, device=device)
        order = sorted(range(len(val_ids)), key=lambda i: len(val_ids[i]))
        with torch.no_grad():
            for i in range(0, len(order), 64):
                chunk = order[i:i + 64]
                x, a, y = collate([val_ids[j] for j in chunk], [val_masks[j] for j in chunk],
                                  pad_id)
                x, a, y = x.to(device), a.to(device), y.to(device)
                with autocast():
                    logits = net(input_ids=x, attention_mask=a).logits.float()
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.size(-1)), y[:, 1:].reshape(-1),
                    ignore_index=IGNORE, reduction="sum")
                total += torch.stack([loss.double(), (y[:, 1:] != IGNORE).sum().double()])
        if world > 1:
            torch.distributed.all_reduce(total)
        net.train()
        return float(total[0] / total[1].clamp(min=1))

    # -- the loop -------------------------------------------------------------------------
    model.train()
    t_window, tokens_window, ex_window = time.perf_counter(), 0, 0
    loss_window: list[float] = []
    last_loss = float("nan")
    run_start = time.perf_counter()
    first_step = resume.step + 1
    if rank == 0:
        say(f"[rank 0] training {cfg.name}: steps {first_step}..{cfg.steps}, {world} "
            f"worker(s), {torch.get_num_threads()} thread(s) each, device {device}")
    for step in range(first_step, cfg.steps + 1):
        idx = batch_indices(len(train_ids), cfg.batch_size, cfg.seed, step, rank)
        x, a, y = collate([train_ids[i] for i in idx], [train_masks[i] for i in idx], pad_id)
        x, a, y = x.to(device), a.to(device), y.to(device)
        lr = lr_at(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast():
            loss = model(input_ids=x, attention_mask=a, labels=y).loss
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        last_loss = float(loss.detach())
        loss_window.append(last_loss)
        tokens_window += int(a.sum())
        ex_window += len(idx)

        if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
            elapsed = time.perf_counter() - t_window
            metrics = {"train_loss": sum(loss_window) / len(loss_window), "lr": lr,
                       "tokens_per_s": tokens_window * world / max(elapsed, 1e-9),
                       "examples_per_s": ex_window * world / max(elapsed, 1e-9)}
            sink.log(metrics, step)
            sink.flush()
            done = step - first_step + 1
            eta = (time.perf_counter() - run_start) / done * (cfg.steps - step)
            say(f"[rank 0] step {step}/{cfg.steps} loss {metrics['train_loss']:.4f} "
                f"lr {lr:.2e} {metrics['examples_per_s']:.1f} ex/s eta {eta:.0f}s")
            t_window, tokens_window, ex_window, loss_window = time.perf_counter(), 0, 0, []

        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            val_loss = validate()
            metrics = {"step": step, "val_loss": val_loss, "train_loss": last_loss,
                       "restarts": resume.restarts, "resubmissions": resume.resubmissions,
                       "resumed_from_step": resume.step}
            if rank == 0:
                sink.log({"val_loss": val_loss}, step)
                sink.flush()
                with tempfile.TemporaryDirectory(prefix="rayplane-ckpt-") as tmp:
                    save_model_folder(model, tokenizer, tmp)
                    torch.save({"optimizer": optimizer.state_dict(),
                                **({"scaler": scaler.state_dict()} if scaler.is_enabled()
                                   else {})}, Path(tmp) / TRAIN_STATE)
                    sink.write_pending(tmp)  # what MLflow has not taken yet (it is down)
                    (Path(tmp) / TRAIN_STATE_JSON).write_text(json.dumps({
                        "run": cfg.name, "step": step, "val_loss": val_loss,
                        "restarts": resume.restarts, "resubmissions": resume.resubmissions,
                        "submission": resume.submission, "time": time.time()}))
                    _report(metrics, ray.train.Checkpoint.from_directory(tmp),
                            f"checkpoint_{step:06d}")
                say(f"[rank 0] step {step}: val_loss {val_loss:.4f}, checkpoint saved")
            else:
                _report(metrics, None, f"checkpoint_{step:06d}")
    sink.close()


def _setup_wandb(cfg: TrainConfig, config: dict[str, Any]):
    """Ray's W&B integration (``setup_wandb``) on rank 0; the W&B run id is the MLflow run
    id, so a resumed run continues the same W&B run."""
    from ray.air.integrations.wandb import setup_wandb

    spec = cfg.wandb
    assert spec is not None
    folder = spec.dir or str(Path(tempfile.gettempdir()) / "rayplane-wandb")
    Path(folder).mkdir(parents=True, exist_ok=True)
    run_id = config.get("mlflow_run_id") or cfg.name
    if spec.mode.value != "online":
        # W&B's own switch; Ray's integration asks for an API key unless it is set.
        os.environ["WANDB_MODE"] = spec.mode.value
    return setup_wandb(config=cfg.flat_params(), project=spec.project, mode=spec.mode.value,
                       dir=folder, entity=spec.entity, trial_id=run_id, trial_name=cfg.name,
                       group=cfg.name, rank_zero_only=True)
