"""``python -m train.fit --config FILE``: train, evaluate and register.

What users submit: ``ray job submit --working-dir . -- python -m train.fit --config ...``.
The driver validates the run before any worker starts (one line, exit 2), trains the
tokenizer, opens (or continues) the run's MLflow run, runs a Ray Train ``TorchTrainer`` on
the config's pool, evaluates the best checkpoint on the held-out split as a Ray task on the
same pool, logs the model folder to MLflow and registers it (alias ``candidate``) when it
passes the gate. Re-submitting the same run name continues from its last checkpoint.

Exit codes: 0 trained (and registered when it passed), 1 training failed, the model missed
the gate or the MLflow server went down and stayed down past ``mlflow.wait_s``, 2 bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from raycluster.spec import SpecError
from train import tracking
from train.config import TrainConfig, worker_resources
from train.evaluate import evaluate_checkpoint
from train.loop import load_split, train_loop_per_worker
from train.model import MODEL_FILES
from train.platform import Placement, connect, preflight, start_mlflow_run, trainer
from train.tokenizer import render_text, train_tokenizer

RESULT_PREFIX = "RAYPLANE_TRAIN_RESULT "


@dataclass
class FitOutcome:
    name: str
    mlflow_run_id: str
    steps: int
    val_loss: float | None
    restarts: int
    resubmissions: int
    checkpoint: str | None
    eval: dict[str, float]
    passed: bool
    registered_model: str | None
    version: str | None
    train_seconds: float
    eval_seconds: float


def build_tokenizer(cfg: TrainConfig):
    """The BPE trained on the rendered training conversations (deterministic)."""
    texts = [render_text(ex.messages, ex.tools) for ex in load_split(cfg, "train")]
    return train_tokenizer(texts, cfg.data.vocab_size)


def evaluate_on_pool(placement: Placement, cfg: TrainConfig, checkpoint):
    """Held-out evaluation of ``checkpoint`` as a Ray task on the config's pool."""
    import ray

    res = dict(worker_resources(placement.catalog, cfg, placement.local))
    options = {"num_cpus": res.pop("CPU", 0.0), "num_gpus": res.pop("GPU", 0.0),
               "resources": res}
    return ray.get(ray.remote(evaluate_checkpoint).options(**options).remote(
        checkpoint, cfg.to_dict()))


def fit(cfg: TrainConfig, placement: Placement, *, parent_run_id: str | None = None,
        register: bool | None = None, tokenizer=None, log=print) -> FitOutcome:
    """Train ``cfg`` on ``placement`` and evaluate + register; the run must be preflighted."""
    uri = cfg.mlflow.tracking_uri or ""
    tokenizer = tokenizer or build_tokenizer(cfg)
    run, worker_keys = start_mlflow_run(cfg, parent_run_id=parent_run_id)
    log(f"MLflow run {run.run_id} ({'continued' if run.resumed else 'new'}) in experiment "
        f"{cfg.mlflow.experiment!r} at {uri}")
    tracking.set_tags(uri, run.run_id, {"pool": cfg.pool, "local": placement.local,
                                        "num_workers": cfg.num_workers})
    loop_config = {"cfg": cfg.to_dict(), "tokenizer": tokenizer.backend_tokenizer.to_str(),
                   "submission": uuid.uuid4().hex, **worker_keys}
    started = time.perf_counter()
    try:
        result = trainer(train_loop_per_worker, cfg, placement, loop_config).fit()
    except BaseException:
        status = "FAILED" if not _interrupted() else "KILLED"
        with contextlib.suppress(Exception):  # the training error is the one to see
            tracking.end_run(uri, run.run_id, status)
        raise
    train_seconds = time.perf_counter() - started
    best = result.get_best_checkpoint("val_loss", "min") or result.checkpoint
    # A finished run submitted again trains no step: its last report is its newest checkpoint's.
    last = result.metrics or max((m for _, m in result.best_checkpoints or []),
                                 key=lambda m: m.get("step", 0), default={})
    log(f"trained {cfg.name} to step {last.get('step')} in {train_seconds:.0f}s "
        f"(val_loss {last.get('val_loss', float('nan')):.4f}, restarts "
        f"{last.get('restarts', 0)}, resubmissions {last.get('resubmissions', 0)})")
    best_step = _checkpoint_step(best)
    log(f"evaluating checkpoint step {best_step} on {cfg.eval.max_examples} held-out "
        f"conversations")
    ev = evaluate_on_pool(placement, cfg, best)
    log(ev.summary())
    metrics = {**ev.metrics(), "train_seconds": train_seconds,
               "restarts": float(last.get("restarts", 0)),
               "resubmissions": float(last.get("resubmissions", 0))}
    logged_at = int(time.time() * 1000)  # one timestamp: a repeated call logs no duplicate

    def track(what: str, call):
        """An MLflow call that waits for a server that went down (mlflow.wait_s)."""
        return tracking.when_up(uri, cfg.mlflow.wait_s, what, call, log)

    # What rank 0 could not send while the server was down is in the newest checkpoint.
    unsent: list[dict] = []
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as folder:
            unsent = tracking.read_pending(folder)
    if unsent:
        track("log the training metrics",
              lambda: tracking.log_metric_dicts(uri, run.run_id, unsent))
        log(f"logged {len(unsent)} training metrics kept while MLflow was down")
    track("log the evaluation", lambda: tracking.log_metrics(
        uri, run.run_id, metrics, step=cfg.steps, timestamp_ms=logged_at))
    track("log the evaluation",
          lambda: tracking.log_json(uri, run.run_id, "eval_failures.json", ev.failures))
    with best.as_directory() as folder:
        track("log the model",
              lambda: tracking.log_model_folder(uri, run.run_id, folder, MODEL_FILES))
    passed = ev.exact_match >= cfg.eval.min_exact_match
    track("log the model", lambda: tracking.set_tags(uri, run.run_id, {
        "eval_passed": passed, "best_checkpoint": best.path, "best_step": best_step}))
    version = None
    do_register = cfg.mlflow.register_on_pass if register is None else register
    if passed and do_register:
        version = track("register the model", lambda: tracking.register(
            uri, cfg.mlflow.registered_model, run.run_id, {
                "eval_exact_match": round(ev.exact_match, 4), "run_name": cfg.name,
                "pool": cfg.pool, "steps": cfg.steps}))
        log(f"registered {cfg.mlflow.registered_model} version {version} "
            f"(alias {tracking.CANDIDATE}): exact match {ev.exact_match:.1%} >= gate "
            f"{cfg.eval.min_exact_match:.0%}")
    elif not passed:
        log(f"not registered: exact match {ev.exact_match:.1%} is below the gate "
            f"{cfg.eval.min_exact_match:.0%} (eval.min_exact_match)")
    track("finish the run", lambda: tracking.end_run(uri, run.run_id, "FINISHED"))
    return FitOutcome(
        name=cfg.name, mlflow_run_id=run.run_id, steps=int(last.get("step", 0)),
        val_loss=last.get("val_loss"), restarts=int(last.get("restarts", 0)),
        resubmissions=int(last.get("resubmissions", 0)), checkpoint=best.path,
        eval=ev.metrics(), passed=passed,
        registered_model=cfg.mlflow.registered_model if version else None, version=version,
        train_seconds=train_seconds, eval_seconds=ev.seconds)


def _checkpoint_step(checkpoint) -> int | None:
    name = checkpoint.path.rstrip("/").rsplit("/", 1)[-1]
    return int(name.split("_")[-1]) if name.startswith("checkpoint_") else None


def _interrupted() -> bool:
    exc = sys.exc_info()[1]
    return isinstance(exc, KeyboardInterrupt)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.fit", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--config", required=True, help="Training config (YAML).")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="Override a field: steps=50, model.n_layer=2.")
    parser.add_argument("--no-register", action="store_true",
                        help="Evaluate but do not register, whatever the gate says.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = TrainConfig.load(args.config, args.overrides)
        placement = preflight(cfg, connect_to_ray=False)
        # The tokenizer (and the task data it is trained on) before Ray: see
        # raycluster.rayjob.settle_working_dir.
        tokenizer = build_tokenizer(cfg)
        placement = connect(cfg, placement.catalog)
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    print(f"run {cfg.name}: pool {cfg.pool} x{cfg.num_workers} "
          f"({'local platform' if placement.local else 'cluster'}), {cfg.steps} steps, "
          f"storage {cfg.storage_path}", flush=True)
    try:
        outcome = fit(cfg, placement, register=False if args.no_register else None,
                      tokenizer=tokenizer, log=lambda msg: print(msg, flush=True))
    except tracking.TrackingUnavailable as err:
        print(f"error: {err}; the trained checkpoints are in {cfg.storage_path}/{cfg.name}: "
              "submit the run again under the same name to log them", file=sys.stderr,
              flush=True)
        return 1
    print(RESULT_PREFIX + json.dumps(asdict(outcome)), flush=True)
    return 0 if outcome.passed else 1


def result_from_logs(text: str) -> dict[str, Any] | None:
    """The outcome a ``train.fit`` job printed (for scripts and tests reading job logs)."""
    return tracking.result_line(text, RESULT_PREFIX)


if __name__ == "__main__":
    sys.exit(main())
