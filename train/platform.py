"""The platform's Ray Train defaults, for ``train.fit``, ``train.tune`` and teams' own code.

``preflight`` validates a run before anything is scheduled (pool, workers the pool and the
running cluster can hold, data path, MLflow server) and connects to Ray; ``run_config``,
``scaling_config`` and ``trainer`` build the Ray objects from the config's pool, and
``rank0_metrics`` gives a train function MLflow (and W&B) logging on rank 0. See
docs/training.md for a team's own ``train_func`` in a few lines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raycluster import rayjob
from raycluster.catalog import Catalog
from raycluster.rayjob import cluster_is_local
from raycluster.spec import SpecError
from train.config import (
    TrainConfig,
    check_cluster_capacity,
    check_pool_capacity,
    platform_catalog,
    scaling_config,
)
from train.data import missing_files
from train.tracking import check_tracking_server


@dataclass
class Placement:
    """Where a validated run goes: the catalog, whether the cluster is the local platform,
    and the cluster's nodes when it was checked."""

    catalog: Catalog
    local: bool
    nodes: list[dict[str, Any]]

    def scaling_config(self, cfg: TrainConfig):
        return scaling_config(self.catalog, cfg, self.local)


def check_data_path(cfg: TrainConfig) -> TrainConfig:
    """An absolute ``data_path`` holding the three splits, or a SpecError naming it."""
    if cfg.data_path is None:
        return cfg
    path = Path(cfg.data_path).expanduser().resolve()
    if not path.is_dir():
        raise SpecError(f"data_path: {cfg.data_path!r} is not a folder; write the task's "
                        f"splits there with `python -m train.data --out {cfg.data_path}` or "
                        "leave data_path out to generate them from data.seed",
                        field="data_path")
    missing = missing_files(path)
    if missing:
        raise SpecError(f"data_path: {cfg.data_path!r} lacks {', '.join(missing)}; "
                        f"`python -m train.data --out {cfg.data_path}` writes them",
                        field="data_path")
    cfg.data_path = str(path)  # workers' working directories differ from the driver's
    return cfg


def connect_ray() -> None:
    """Connect to the cluster (raycluster.rayjob.connect_ray), shipping train/ and raycluster/
    to the workers when this is not a submitted job."""
    import raycluster

    rayjob.connect_ray([str(Path(__file__).parent), str(Path(raycluster.__file__).parent)])


def connect(cfg: TrainConfig, catalog: Catalog) -> Placement:
    """Connect to Ray and check the run fits the running cluster (locally: what its nodes
    advertise)."""
    import ray

    connect_ray()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    local = cfg.local if cfg.local is not None else cluster_is_local(catalog, nodes)
    check_cluster_capacity(catalog, cfg, nodes, local)
    if local and rayjob.in_submitted_job():
        rayjob.settle_working_dir(nodes)
    return Placement(catalog, local, nodes)


def preflight(cfg: TrainConfig, catalog: Catalog | None = None, *, check_mlflow: bool = True,
              connect_to_ray: bool = True) -> Placement:
    """Everything that can be wrong with a run, checked before any worker starts; raises a
    one-line SpecError naming the field. ``connect_to_ray=False`` stops before Ray (then
    call ``connect``)."""
    catalog = catalog or platform_catalog()
    check_pool_capacity(catalog, cfg)
    check_data_path(cfg)
    if check_mlflow:
        check_tracking_server(cfg.mlflow.tracking_uri)
    if not connect_to_ray:
        return Placement(catalog, bool(cfg.local), [])
    return connect(cfg, catalog)


def run_config(cfg: TrainConfig, callbacks: list | None = None):
    """``RunConfig``: the run's name and storage (re-submitting continues it), the best
    ``keep_checkpoints`` by validation loss (the latest is always kept too) and
    ``FailureConfig(max_failures)``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    return RunConfig(
        name=cfg.name, storage_path=cfg.storage_path,
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                           checkpoint_score_attribute="val_loss",
                                           checkpoint_score_order="min"),
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        callbacks=callbacks or [])


def trainer(train_func: Callable[[dict], None], cfg: TrainConfig, placement: Placement,
            train_loop_config: dict[str, Any] | None = None, callbacks: list | None = None):
    """A ``TorchTrainer`` on the config's pool with the platform's run defaults."""
    from ray.train.torch import TorchTrainer

    return TorchTrainer(train_func, train_loop_config=train_loop_config or {},
                        scaling_config=placement.scaling_config(cfg),
                        run_config=run_config(cfg, callbacks))


def rank0_metrics(config: dict[str, Any]):
    """Inside a train function: a sink whose ``log(metrics, step)`` / ``flush()`` write to the
    run's MLflow run on rank 0 and do nothing elsewhere. ``config`` carries
    ``tracking_uri`` and ``mlflow_run_id`` (``worker_config`` of a started run)."""
    import ray.train

    from train.sink import MetricsSink

    if ray.train.get_context().get_world_rank() != 0:
        return MetricsSink(None, None)
    return MetricsSink(config.get("tracking_uri"), config.get("mlflow_run_id"))


def start_mlflow_run(cfg: TrainConfig, kind: str = "train", parent_run_id: str | None = None):
    """The run's MLflow run (continued when the same name was submitted before) and the keys
    a train function needs to log into it."""
    from train.tracking import start_run

    run = start_run(cfg.mlflow.tracking_uri or "", cfg.mlflow.experiment, cfg.name,
                    cfg.storage_path, cfg.flat_params(), kind=kind, parent_run_id=parent_run_id)
    return run, {"tracking_uri": cfg.mlflow.tracking_uri, "mlflow_run_id": run.run_id}
