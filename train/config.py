"""The training run spec (``TrainConfig``) and the Ray resources its workers ask for.

A config names a pool of the catalog; everything Ray needs follows from it: the resources a
worker asks (``worker_resources``), ``use_gpu``, the most workers the pool can hold. The same
functions render KubeRay RayJobs (raycluster) and run ``python -m train.fit`` on the cluster,
so nothing about a pool is typed twice. ``check_capacity`` refuses a run the pool or the
running cluster cannot hold before any worker is scheduled.
"""

from __future__ import annotations

import os
import re
from enum import StrEnum
from pathlib import Path
from typing import Any, Self

import yaml
from pydantic import Field, field_validator, model_validator

from raycluster.catalog import Catalog, Pool, load_catalog
from raycluster.spec import Spec, SpecError

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9_.]{0,61}[a-z0-9])?$")
_URI = re.compile(r"^[a-z][a-z0-9+.-]*://")


def check_run_name(v: str) -> str:
    """A run's name (train.fit's and train.duration's): it names folders, MLflow runs and
    Kubernetes objects."""
    if not _NAME.match(v):
        raise ValueError("must be lowercase letters, digits, '-', '_' or '.', starting "
                 "and ending with a letter or digit, at most 63 characters")
    return v


def check_storage_path(v: str) -> str:
    """Where a run's checkpoints live: a URI, or an absolute path (made so)."""
    if _URI.match(v):
        return v
    path = Path(v).expanduser()
    if not path.is_absolute():
        raise ValueError("must be an absolute path or a URI such as s3://bucket/runs: "
                 "a job's working directory is temporary, so relative paths "
                 "would lose the checkpoints")
    return str(path)


def default_storage_path() -> str:
    """Where runs keep checkpoints when the config does not say: RAYPLANE_STORAGE_PATH, else
    the local platform's state folder (``.rayplane/runs``), else ``~/ray_results/rayplane``."""
    if os.environ.get("RAYPLANE_STORAGE_PATH"):
        return os.environ["RAYPLANE_STORAGE_PATH"]
    if os.environ.get("RAYPLANE_STATE_DIR"):
        return str(Path(os.environ["RAYPLANE_STATE_DIR"]) / "runs")
    return str(Path.home() / "ray_results" / "rayplane")


class ModelSize(Spec):
    """GPT-2 architecture size (``transformers.GPT2Config``)."""

    n_layer: int = Field(ge=1, le=48, description="Transformer blocks.")
    n_head: int = Field(ge=1, le=64, description="Attention heads per block.")
    n_embd: int = Field(ge=8, le=8192, description="Hidden size (a multiple of n_head).")
    n_positions: int = Field(default=256, ge=32, le=8192,
                             description="Longest sequence (prompt + answer) in tokens.")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0,
                           description="Dropout of embeddings, attention and residuals.")

    @model_validator(mode="after")
    def _heads_divide(self) -> Self:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd: {self.n_embd} is not a multiple of n_head "
                             f"({self.n_head})")
        return self


class DataSpec(Spec):
    """The synthetic tool-use task (train/data.py) and its tokenizer."""

    seed: int = Field(default=0, description="Seed of the generator (same seed, same data).")
    train_size: int = Field(default=20000, ge=1, description="Training conversations.")
    val_size: int = Field(default=400, ge=1, description="Validation conversations (val loss).")
    heldout_size: int = Field(default=400, ge=1,
                              description="Held-out conversations (the evaluation).")
    vocab_size: int = Field(default=1024, ge=300, le=65536,
                            description="Byte-level BPE vocabulary size (upper bound).")

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": self.train_size, "val": self.val_size, "heldout": self.heldout_size}


class MLflowSpec(Spec):
    tracking_uri: str | None = Field(
        default_factory=lambda: os.environ.get("MLFLOW_TRACKING_URI") or None,
        description="MLflow tracking server (default: env MLFLOW_TRACKING_URI).")
    experiment: str = Field(default="rayplane-train", description="MLflow experiment name.")
    registered_model: str = Field(default="rayplane-tool-llm",
                                  description="Registered model a passing run becomes a "
                                              "version of (alias 'candidate').")
    register_on_pass: bool = Field(default=True,
                           description="Register the model when it passes the eval gate.")
    wait_s: float = Field(default=600.0, ge=0,
                          description="How long the driver waits for a tracking server that "
                                      "went down during the run before it fails (seconds).")


class EvalSpec(Spec):
    """The evaluation on the held-out split and the gate for registration."""

    min_exact_match: float = Field(default=0.9, ge=0.0, le=1.0,
                                   description="Gate: held-out exact match needed to register.")
    max_examples: int = Field(default=400, ge=1, description="Held-out conversations scored.")
    max_new_tokens: int = Field(default=64, ge=1, le=1024,
                                description="Longest generated turn.")
    batch_size: int = Field(default=64, ge=1, description="Prompts decoded together.")


class WandbMode(StrEnum):
    online = "online"
    offline = "offline"
    disabled = "disabled"


class WandbSpec(Spec):
    """Weights & Biases as a second logger (Ray's own integration, rank 0 only)."""

    project: str = Field(description="W&B project.")
    mode: WandbMode = Field(default=WandbMode.offline,
                            description="online needs WANDB_API_KEY; offline writes to dir.")
    dir: str | None = Field(default=None, description="Where offline runs are written "
                                                      "(default: the run's storage folder).")
    entity: str | None = Field(default=None, description="W&B entity (team).")


class RunConfigFile(Spec):
    """A run's YAML config (train.fit's and train.duration's): loaded with ``--set``
    overrides, dumped for the workers, flattened for MLflow params."""

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> Self:
        """The config at ``path`` with ``key.sub=value`` overrides (values are YAML)."""
        path = Path(path)
        if not path.is_file():
            raise SpecError(f"{path}: no such file", field="config")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise SpecError(f"{path}: not valid YAML ({err})".replace("\n", " "),
                            field="config") from None
        if not isinstance(data, dict):
            raise SpecError(f"{path}: expected a mapping at the top level", field="config")
        for item in overrides or []:
            apply_override(data, item)
        return cls.parse(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def flat_params(self) -> dict[str, Any]:
        """Scalars for MLflow params: ``model.n_layer`` etc."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out


class TrainConfig(RunConfigFile):
    """One training run: ``python -m train.fit --config FILE``."""

    spec_kind = "training config"

    name: str = Field(description="Run name: the Ray Train run (RunConfig.name) and the MLflow "
                                  "run. Re-submitting the same name continues the run.")
    pool: str = Field(default="a100-timeslice", description="Catalog pool the workers run on.")
    num_workers: int = Field(default=1, ge=1, description="Ray Train workers (DDP ranks).")
    model: ModelSize = Field(description="Model size.")
    data: DataSpec = Field(default_factory=DataSpec, description="The synthetic task.")
    data_path: str | None = Field(default=None,
                                  description="Folder of train/val/heldout .jsonl "
                                              "(python -m train.data); default: generated "
                                              "in each worker from data.seed.")
    steps: int = Field(ge=1, description="Optimizer steps of the whole run.")
    lr: float = Field(gt=0, le=1.0, description="Peak learning rate (AdamW).")
    warmup_steps: int = Field(default=0, ge=0, description="Linear warm-up steps.")
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1,
                                description="Cosine decay ends at lr * min_lr_ratio.")
    weight_decay: float = Field(default=0.01, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(default=1.0, gt=0, description="Gradient norm clip.")
    batch_size: int = Field(ge=1, description="Conversations per step per worker.")
    log_every: int = Field(default=10, ge=1, description="Steps between logged train metrics.")
    checkpoint_every: int = Field(ge=1, description="Steps between validation + checkpoint.")
    keep_checkpoints: int = Field(default=2, ge=1,
                                  description="Checkpoints kept, the best by val loss.")
    max_failures: int = Field(default=3, ge=-1,
                              description="Worker failures to recover from (-1: always).")
    storage_path: str = Field(default_factory=default_storage_path,
                              description="Where checkpoints live: an absolute path (local, "
                                          "EFS) or a URI (s3://).")
    mlflow: MLflowSpec = Field(default_factory=MLflowSpec, description="Tracking + registry.")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="Held-out evaluation.")
    wandb: WandbSpec | None = Field(default=None, description="Optional W&B logging.")
    amp: bool = Field(default=True, description="Mixed precision (bf16/fp16) on GPU workers.")
    threads_per_worker: int | None = Field(
        default=None, ge=1, description="torch threads per worker (default: the worker's CPUs, "
                                        "or the node's cores shared by its workers).")
    local: bool | None = Field(default=None,
                               description="Run as on the local platform (no GPUs; pools "
                                           "emulated). Default: detected from the cluster.")
    seed: int = Field(default=0, description="Seed of model init and batch order.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_run_name(v)

    @field_validator("storage_path")
    @classmethod
    def _storage(cls, v: str) -> str:
        return check_storage_path(v)

    @model_validator(mode="after")
    def _cross_fields(self) -> Self:
        if self.checkpoint_every > self.steps:
            raise ValueError(f"checkpoint_every: {self.checkpoint_every} is more than steps "
                             f"({self.steps}); no checkpoint would be written")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps: {self.warmup_steps} must be less than steps "
                             f"({self.steps})")
        return self


def apply_override(data: dict[str, Any], item: str) -> None:
    """``a.b=3`` sets data["a"]["b"] = 3 (the value parsed as YAML)."""
    if "=" not in item:
        raise SpecError(f"--set {item!r}: expected KEY=VALUE, e.g. steps=100 or model.n_layer=2")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SpecError(f"--set {key}: {part} is not a mapping")
        node = child
    node[parts[-1]] = value


# -- pools and Ray resources --------------------------------------------------------------


def platform_catalog() -> Catalog:
    """The catalog the cluster runs with: RAYPLANE_CATALOG, else the platform's."""
    return load_catalog(os.environ.get("RAYPLANE_CATALOG") or None)


def worker_resources(catalog: Catalog, cfg: TrainConfig, local: bool) -> dict[str, float]:
    """The Ray resources one training worker asks for.

    On KubeRay: the pool worker's CPUs, its GPU units (whole GPUs, time-slice replicas or MIG
    instances, each seen by Ray as one GPU) and the pool's custom resource ``pool:<name>``,
    so the worker lands on that pool's worker group. Locally the GPU pools' nodes advertise
    ``pool:<name>`` with no CPU and no GPU (the head owns the cores), so a worker asks only the
    pool resource; a local CPU-pool worker takes one core.
    """
    pool = catalog.pool(cfg.pool, "pool")
    if local:
        if pool.has_gpu:
            return {"CPU": 0.0, pool.ray_resource: float(pool.worker.gpu_units)}
        return {"CPU": 1.0, pool.ray_resource: 1.0}
    resources = {"CPU": float(pool.worker.cpus), **pool.ray_resources(1)}
    if pool.has_gpu:
        resources["GPU"] = float(pool.worker.gpu_units)
    return resources


def use_gpu(catalog: Catalog, cfg: TrainConfig, local: bool) -> bool:
    return catalog.pool(cfg.pool, "pool").has_gpu and not local


def scaling_config(catalog: Catalog, cfg: TrainConfig, local: bool):
    """``ray.train.ScalingConfig`` for the config's pool."""
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu(catalog, cfg, local),
                         resources_per_worker=worker_resources(catalog, cfg, local))


def check_pool_capacity(catalog: Catalog, cfg: TrainConfig) -> Pool:
    """Refuse more workers than the pool can ever hold (catalog: workers per node x
    max_nodes)."""
    pool = catalog.pool(cfg.pool, "pool")
    if cfg.num_workers > pool.max_workers:
        raise SpecError(
            f"num_workers: {cfg.num_workers} is more than pool {pool.name!r} can hold "
            f"({pool.max_workers} = {pool.workers_per_node} workers per node x "
            f"{pool.max_nodes} nodes)", field="num_workers")
    return pool


def local_capacity(catalog: Catalog, cfg: TrainConfig, nodes: list[dict[str, Any]]) -> int:
    """How many workers of this config the running (local) cluster can hold at once."""
    per_worker = worker_resources(catalog, cfg, local=True)
    total: dict[str, float] = {}
    for node in nodes:
        if not node.get("Alive", True):
            continue
        for key, value in node.get("Resources", {}).items():
            total[key] = total.get(key, 0.0) + value
    fits = [int(total.get(k, 0.0) // v) for k, v in per_worker.items() if v > 0]
    return min(fits) if fits else 0


def check_cluster_capacity(catalog: Catalog, cfg: TrainConfig, nodes: list[dict[str, Any]],
                           local: bool) -> None:
    """Locally, the cluster is fixed: refuse what its nodes do not advertise."""
    if not local:
        return
    pool = catalog.pool(cfg.pool, "pool")
    cap = local_capacity(catalog, cfg, nodes)
    if cfg.num_workers > cap:
        per = worker_resources(catalog, cfg, local=True)
        raise SpecError(
            f"num_workers: {cfg.num_workers} workers of pool {pool.name!r} (each {per}) do not "
            f"fit this local cluster, which holds {cap}; lower num_workers or restart it with "
            f"`rayplane up --workers-per-pool {cfg.num_workers}`", field="num_workers")
