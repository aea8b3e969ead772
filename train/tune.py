"""``python -m train.tune --config SWEEP``: a Ray Tune sweep over the training run.

Each trial is a training run of the same code as ``train.fit`` (a ``TorchTrainer`` of
``train.loop.train_loop_per_worker`` on the base config's pool), with the learning rate,
width, depth and batch size the search proposes; ``TuneReportCallback`` hands every
validation report to Tune. Optuna proposes the configurations, ASHA stops the trials whose
validation loss lags at a rung. Every trial is an MLflow child run of the sweep's run. The
best configuration (a training config ready for ``train.fit``) and its model folder are
written out and logged to the sweep's run (artifact ``model``), so ``--register`` (or
``rayplane models register RUN_ID``) can register it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Self

import yaml
from pydantic import Field, model_validator

from raycluster.spec import Spec, SpecError
from train.config import TrainConfig, apply_override, local_capacity, platform_catalog


class SearchSpace(Spec):
    """What Optuna searches over (each trial takes one value of each)."""

    lr: tuple[float, float] = Field(default=(3e-4, 1e-2),
                                    description="Learning rate range, sampled log-uniformly.")
    n_embd: list[int] = Field(default_factory=lambda: [32, 64, 96],
                              description="Model widths to try (multiples of model.n_head).")
    n_layer: list[int] = Field(default_factory=lambda: [1, 2, 3],
                               description="Model depths to try.")
    batch_size: list[int] = Field(default_factory=lambda: [16, 32],
                                  description="Per-worker batch sizes to try.")

    @model_validator(mode="after")
    def _ranges(self) -> Self:
        lo, hi = self.lr
        if not 0 < lo < hi:
            raise ValueError(f"lr: ({lo}, {hi}) must be an increasing pair of positive numbers")
        for name in ("n_embd", "n_layer", "batch_size"):
            values = getattr(self, name)
            if not values or any(v < 1 for v in values):
                raise ValueError(f"{name}: {values} must be a non-empty list of positive ints")
        return self


class SweepConfig(Spec):
    """A sweep: the training config it varies, the search space and the scheduler."""

    spec_kind = "sweep config"

    name: str = Field(description="Sweep name: the Tune experiment and the MLflow parent run.")
    base: str = Field(description="Training config the trials vary (path, relative to this "
                                  "file or the working directory).")
    set: list[str] = Field(default_factory=list,
                           description="KEY=VALUE overrides of the base config, as --set.")
    search: SearchSpace = Field(default_factory=SearchSpace, description="Search space.")
    num_samples: int = Field(default=6, ge=1, description="Trials to run.")
    max_concurrent_trials: int | None = Field(
        default=None, ge=1, description="Trials at once (default: what the pool holds).")
    grace_period: int = Field(default=1, ge=1,
                              description="ASHA: validation reports before a trial can stop.")
    reduction_factor: float = Field(default=2.0, gt=1,
                                    description="ASHA: 1/reduction_factor of trials go on at "
                                                "each rung.")
    seed: int = Field(default=0, description="Optuna sampler seed.")
    points_to_evaluate: list[dict[str, float | int]] = Field(
        default_factory=list,
        description="Configurations to try first (e.g. the current one), as {lr, n_embd, "
                    "n_layer, batch_size}; Optuna proposes the rest.")
    output_dir: str | None = Field(default=None,
                                   description="Where the best config and model go (default: "
                                               "<storage_path>/<name>/best).")

    @model_validator(mode="after")
    def _points(self) -> Self:
        keys = {"lr", "n_embd", "n_layer", "batch_size"}
        for i, point in enumerate(self.points_to_evaluate):
            if set(point) != keys:
                raise ValueError(f"points_to_evaluate[{i}]: {point} must give exactly "
                                 f"{', '.join(sorted(keys))}")
        return self

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
        path = Path(path)
        if not path.is_file():
            raise SpecError(f"{path}: no such file")
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict):
            raise SpecError(f"{path}: expected a mapping at the top level")
        for item in overrides or []:
            apply_override(data, item)
        sweep = cls.parse(data, source=str(path))
        base = Path(sweep.base)
        if not base.is_absolute() and not base.is_file():
            base = path.parent / base
        if not base.is_file():
            raise SpecError(f"{path}: base: {sweep.base!r} is not a file (relative paths are "
                            f"tried from the working directory and from {path.parent})",
                            field="base")
        sweep.base = str(base)
        return sweep

    def base_config(self, extra: list[str] | None = None) -> TrainConfig:
        cfg = TrainConfig.load(self.base, [*self.set, *(extra or [])])
        for width in self.search.n_embd:
            if width % cfg.model.n_head:
                raise SpecError(f"search.n_embd: {width} is not a multiple of the base "
                                f"config's model.n_head ({cfg.model.n_head})",
                                field="search.n_embd")
        return cfg


def report_steps(cfg: TrainConfig) -> int:
    """How many validation reports a full trial makes (ASHA's max_t)."""
    return math.ceil(cfg.steps / cfg.checkpoint_every)


def trial_config(base: dict[str, Any], params: dict[str, Any], name: str,
                 threads: int | None) -> TrainConfig:
    data = json.loads(json.dumps(base))
    data["name"] = name
    data["lr"] = float(params["lr"])
    data["batch_size"] = int(params["batch_size"])
    data["model"]["n_embd"] = int(params["n_embd"])
    data["model"]["n_layer"] = int(params["n_layer"])
    if threads and not data.get("threads_per_worker"):
        data["threads_per_worker"] = threads
    data["mlflow"]["register_on_pass"] = False
    return TrainConfig.parse(data)


def run_trial(params: dict[str, Any], *, base: dict[str, Any], sweep: str, tokenizer: str,
              parent_run_id: str | None, local: bool, threads: int | None) -> None:
    """One Tune trial: a training run of ``train.loop`` through a TorchTrainer whose
    reports reach Tune (``TuneReportCallback``)."""
    import uuid

    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from train import tracking
    from train.loop import train_loop_per_worker
    from train.platform import Placement, start_mlflow_run, trainer

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(base, params, f"{sweep}-{trial_id}", threads)
    run, keys = start_mlflow_run(cfg, kind="trial", parent_run_id=parent_run_id)
    tracking.set_tags(cfg.mlflow.tracking_uri or "", run.run_id, {"sweep": sweep,
                                                                   "trial_id": trial_id})
    loop_config = {"cfg": cfg.to_dict(), "tokenizer": tokenizer,
                   "submission": uuid.uuid4().hex, **keys}
    placement = Placement(platform_catalog(), local, [])
    trainer(train_loop_per_worker, cfg, placement, loop_config,
            callbacks=[TuneReportCallback()]).fit()
    tracking.end_run(cfg.mlflow.tracking_uri or "", run.run_id, "FINISHED")


def sweep(sw: SweepConfig, cfg: TrainConfig, placement, *, register: bool = False,
          tokenizer=None, log=print) -> dict[str, Any]:
    """Run the sweep; returns the summary written to ``<output_dir>/sweep.json``."""
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from train import tracking
    from train.fit import build_tokenizer, evaluate_on_pool
    from train.model import MODEL_FILES

    uri = cfg.mlflow.tracking_uri or ""
    capacity = (local_capacity(placement.catalog, cfg, placement.nodes) // cfg.num_workers
                if placement.local else sw.num_samples)
    concurrent = max(1, min(sw.max_concurrent_trials or capacity, capacity or 1))
    # Locally the trials share the machine's cores: no more threads than cores in all.
    threads = max(1, (os.cpu_count() or 1) // concurrent) if placement.local else None
    parent = tracking.start_run(uri, cfg.mlflow.experiment, sw.name, cfg.storage_path,
                                {"sweep.base": sw.base, "sweep.num_samples": sw.num_samples,
                                 "sweep.search": sw.search.model_dump_json(),
                                 **{f"base.{k}": v for k, v in cfg.flat_params().items()}},
                                kind="sweep")
    log(f"sweep {sw.name}: {sw.num_samples} trials, {concurrent} at once, ASHA max_t "
        f"{report_steps(cfg)} reports; MLflow run {parent.run_id}")
    tokenizer = (tokenizer or build_tokenizer(cfg)).backend_tokenizer.to_str()
    space = {"lr": ray.tune.loguniform(*sw.search.lr),
             "n_embd": ray.tune.choice(sw.search.n_embd),
             "n_layer": ray.tune.choice(sw.search.n_layer),
             "batch_size": ray.tune.choice(sw.search.batch_size)}
    searcher = ConcurrencyLimiter(
        OptunaSearch(metric="val_loss", mode="min", seed=sw.seed,
                     points_to_evaluate=sw.points_to_evaluate or None),
        max_concurrent=concurrent)
    # stop_last_trials=False: a trial that reaches max_t ends on its own (its Train run
    # finishes and releases its workers) instead of being stopped at its last report.
    scheduler = ASHAScheduler(time_attr="training_iteration", metric="val_loss", mode="min",
                              max_t=report_steps(cfg), grace_period=sw.grace_period,
                              reduction_factor=sw.reduction_factor, stop_last_trials=False)
    trainable = ray.tune.with_parameters(
        run_trial, base=cfg.to_dict(), sweep=sw.name, tokenizer=tokenizer,
        parent_run_id=parent.run_id, local=placement.local, threads=threads)
    # The trial itself only drives a TorchTrainer (its workers hold the pool's resources):
    # a sliver of a CPU (Tune refuses an empty request), which also keeps it off the GPU
    # pools' nodes, as their CPUs belong to the training workers.
    trainable = ray.tune.with_resources(trainable, {"CPU": 0.05})
    tuner = ray.tune.Tuner(
        trainable, param_space=space,
        tune_config=ray.tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                        num_samples=sw.num_samples),
        run_config=ray.tune.RunConfig(name=sw.name, storage_path=cfg.storage_path))
    started = time.perf_counter()
    grid = tuner.fit()
    seconds = time.perf_counter() - started

    trials = []
    full = cfg.steps
    for res in grid:
        m = res.metrics or {}
        trials.append({"trial_id": m.get("trial_id"), "config": res.config,
                       "val_loss": m.get("val_loss"), "step": m.get("step"),
                       "reports": m.get("training_iteration"),
                       "stopped_early": bool(m.get("step") is not None and m["step"] < full),
                       "checkpoint": m.get("checkpoint_path"),
                       "error": str(res.error) if res.error else None})
    _close_trial_runs(uri, cfg.mlflow.experiment, sw.name, trials)
    done = [t for t in trials if t["val_loss"] is not None]
    if not done:
        raise RuntimeError(f"sweep {sw.name}: no trial reported a validation loss: "
                           f"{[t['error'] for t in trials]}")
    best = min(done, key=lambda t: t["val_loss"])
    worst = max(done, key=lambda t: t["val_loss"])
    out = Path(sw.output_dir or Path(cfg.storage_path) / sw.name / "best")
    out.mkdir(parents=True, exist_ok=True)
    best_cfg = trial_config(cfg.to_dict(), best["config"], f"{sw.name}-best", None)
    best_cfg.mlflow.register_on_pass = cfg.mlflow.register_on_pass
    best_cfg.threads_per_worker = cfg.threads_per_worker
    (out / "best_config.yaml").write_text(yaml.safe_dump(best_cfg.to_dict(), sort_keys=False))
    model_dir = out / "model"
    if best["checkpoint"]:
        shutil.rmtree(model_dir, ignore_errors=True)
        model_dir.mkdir()
        for name in MODEL_FILES:
            shutil.copy2(Path(best["checkpoint"]) / name, model_dir / name)
    summary = {"sweep": sw.name, "mlflow_run_id": parent.run_id, "seconds": seconds,
               "trials": trials, "best": best, "worst": worst,
               "stopped_early": sum(t["stopped_early"] for t in trials),
               "best_config": str(out / "best_config.yaml"), "model_dir": str(model_dir)}
    tracking.log_metrics(uri, parent.run_id, {
        "best_val_loss": best["val_loss"], "worst_val_loss": worst["val_loss"],
        "trials": len(trials), "stopped_early": summary["stopped_early"],
        "sweep_seconds": seconds})
    tracking.set_tags(uri, parent.run_id, {f"best.{k}": v for k, v in best["config"].items()})
    tracking.log_json(uri, parent.run_id, "sweep.json", summary)
    client = tracking.client(uri)
    client.log_artifact(parent.run_id, str(out / "best_config.yaml"))
    if model_dir.is_dir():
        tracking.log_model_folder(uri, parent.run_id, model_dir)
    log(f"best trial {best['trial_id']}: val_loss {best['val_loss']:.4f} {best['config']}; "
        f"worst {worst['val_loss']:.4f}; {summary['stopped_early']} of {len(trials)} trials "
        f"stopped early by ASHA; best config: {out / 'best_config.yaml'}")
    if register and best["checkpoint"]:
        from ray.train import Checkpoint

        ev = evaluate_on_pool(placement, best_cfg, Checkpoint(best["checkpoint"]))
        log(ev.summary())
        tracking.log_metrics(uri, parent.run_id, ev.metrics())
        summary["eval"] = ev.metrics()
        if ev.exact_match >= best_cfg.eval.min_exact_match:
            summary["version"] = tracking.register(
                uri, cfg.mlflow.registered_model, parent.run_id,
                {"eval_exact_match": round(ev.exact_match, 4), "sweep": sw.name})
            log(f"registered {cfg.mlflow.registered_model} version {summary['version']} "
                f"(alias {tracking.CANDIDATE})")
        else:
            log(f"not registered: exact match {ev.exact_match:.1%} is below the gate "
                f"{best_cfg.eval.min_exact_match:.0%}")
    (out / "sweep.json").write_text(json.dumps(summary, indent=2, default=str))
    tracking.end_run(uri, parent.run_id, "FINISHED")
    return summary


def _close_trial_runs(uri: str, experiment: str, sweep_name: str,
                      trials: list[dict[str, Any]]) -> None:
    """Trials ASHA stopped never finish their MLflow run: end it as KILLED and say why."""
    from train import tracking

    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return
    by_name = {f"{sweep_name}-{t['trial_id']}": t for t in trials if t["trial_id"]}
    runs = c.search_runs([exp.experiment_id],
                         filter_string=f"tags.`{tracking.KIND_TAG}` = 'trial' and "
                                       f"tags.sweep = '{sweep_name}'", max_results=1000)
    for run in runs:
        trial = by_name.get(run.data.tags.get(tracking.RUN_NAME_TAG, ""))
        if trial is None:
            continue
        c.set_tag(run.info.run_id, "stopped_early", str(trial["stopped_early"]))
        if run.info.status == "RUNNING":
            c.set_terminated(run.info.run_id, "KILLED" if trial["stopped_early"] else "FAILED")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.tune", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--config", required=True, help="Sweep config (YAML).")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="Override a field of the sweep config.")
    parser.add_argument("--set-base", dest="base_overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="Override a field of the base training "
                                                  "config (storage_path=..., steps=...).")
    parser.add_argument("--register", action="store_true",
                        help="Evaluate the best trial and register it when it passes.")
    args = parser.parse_args(argv)
    from train.fit import build_tokenizer
    from train.platform import connect, preflight

    try:
        sw = SweepConfig.load(args.config, args.overrides)
        cfg = sw.base_config(args.base_overrides)
        placement = preflight(cfg, connect_to_ray=False)
        tokenizer = build_tokenizer(cfg)  # before Ray: see raycluster.rayjob.settle_working_dir
        placement = connect(cfg, placement.catalog)
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    summary = sweep(sw, cfg, placement, register=args.register, tokenizer=tokenizer,
                    log=lambda msg: print(msg, flush=True))
    print("RAYPLANE_TUNE_RESULT " + json.dumps({k: summary[k] for k in (
        "sweep", "mlflow_run_id", "stopped_early", "best_config", "model_dir")} | {
        "best_val_loss": summary["best"]["val_loss"],
        "worst_val_loss": summary["worst"]["val_loss"], "trials": len(summary["trials"]),
        "version": summary.get("version")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
