"""vLLM on the GPU pools, the pure part: what rayplane knows about a pool turned into Ray's
``LLMConfig`` (``ray.serve.llm``), and the placements it refuses before anything deploys.

- ``accelerator_type`` is the pool's GPU model (Ray's name for it) and every placement-group
  bundle asks for the pool's resource (``pool:<name>``), so replicas land on that pool only.
- ``gpu_memory_utilization`` is derived from the pool's sharing. vLLM's fraction is of the
  memory the process sees: a MIG instance sees only its profile's memory (hard isolation), so
  0.9 of it; a time-slice replica sees the whole GPU while sharing it with ``replicas - 1``
  others and nothing enforces a limit, so it takes ``0.9 / replicas``. The default of 0.9 in
  three time-sliced pods is the classic CUDA out-of-memory (docs/serving.md).
- ``max_num_seqs`` is derived from the unit's memory (``memory_per_unit_gb``): the KV cache is
  what bounds concurrent sequences.
- Tensor parallelism needs whole GPUs: it is refused on time-slice and MIG units, saying why.
- ``models:/`` and ``runs:/`` sources are downloaded from MLflow by a ``ray.serve.llm``
  callback on the replica's node (:class:`serve.engines.vllm.MlflowModelDownload`); ``s3://``
  sources use Ray's S3 mirror.

Unit-tested without vLLM: ``ray.serve.llm`` itself cannot be imported without vLLM, so the
config is validated against the same ``LLMConfig`` model from ``ray.llm._internal``. What runs
on the GPU cluster is in :mod:`serve.engines.vllm`.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

from raycluster.catalog import Pool, SharingMode
from raycluster.spec import SpecError
from serve.config import ModelSpec, SourceKind, source_kind

#: What a vLLM process may take of the memory it sees (vLLM's own default).
MEMORY_HEADROOM = 0.9
#: Sequences per GB of a unit's memory, and the bounds of the derived max_num_seqs.
SEQS_PER_GB = 8
MIN_SEQS, MAX_SEQS = 8, 256
MODEL_CACHE = "/tmp/rayplane-models"
#: The ``ray.serve.llm`` callback that downloads an MLflow model before vLLM loads it.
MODEL_DOWNLOAD_CALLBACK = "serve.engines.vllm:MlflowModelDownload"


def derived_gpu_memory_utilization(pool: Pool) -> float:
    """``gpu_memory_utilization`` for one replica on one unit of ``pool``."""
    return round(MEMORY_HEADROOM * pool.gpu_fraction_per_unit, 4)


def derived_max_num_seqs(pool: Pool) -> int:
    """Concurrent sequences one replica on one unit of ``pool`` can hold KV cache for."""
    seqs = SEQS_PER_GB * math.floor(pool.memory_per_unit_gb)
    return max(MIN_SEQS, min(MAX_SEQS, seqs // 8 * 8))


def _sharing_reason(pool: Pool) -> str:
    if pool.sharing.mode is SharingMode.time_slicing:
        return (f"its units are time-slice replicas ({pool.sharing.replicas} pods take turns on "
                "one GPU, which shards cannot be spread over)")
    return (f"its units are MIG {pool.sharing.mig_profile} instances (MIG instances have no "
            "peer-to-peer/NVLink path for NCCL between them)")


def check_placement(m: ModelSpec, pool: Pool, field: str) -> None:
    """Refuse a vLLM model that cannot run on ``pool`` (SpecError naming the field)."""
    if not pool.has_gpu:
        raise SpecError(f"{field}.pool: {pool.name!r} has no GPU; the vllm engine needs a GPU "
                        "pool (or use engine: cpu)", field=f"{field}.pool")
    tp = m.tensor_parallel_size
    if tp > 1:
        if pool.sharing.mode is not SharingMode.none:
            raise SpecError(
                f"{field}.tensor_parallel_size: {tp} needs whole GPUs, but pool {pool.name!r} "
                f"cannot give them: {_sharing_reason(pool)}; use tensor_parallel_size 1 or a "
                "pool with sharing mode 'none'", field=f"{field}.tensor_parallel_size")
        if tp > pool.gpus_per_node:
            raise SpecError(f"{field}.tensor_parallel_size: {tp} is more than the "
                            f"{pool.gpus_per_node} GPUs of one {pool.instance_types[0]} node of "
                            f"pool {pool.name!r}", field=f"{field}.tensor_parallel_size")
    if m.gpu_units != 1 and m.gpu_units != tp:
        raise SpecError(f"{field}.gpu_units: {m.gpu_units} but a vLLM replica uses one unit per "
                        f"tensor-parallel rank ({tp}); leave gpu_units at 1 and set "
                        "tensor_parallel_size", field=f"{field}.gpu_units")
    limit = derived_gpu_memory_utilization(pool)
    if m.gpu_memory_utilization is not None and m.gpu_memory_utilization > limit:
        share = (f"{pool.sharing.replicas} time-slice replicas share one GPU with no memory "
                 "isolation" if pool.sharing.mode is SharingMode.time_slicing
                 else f"{MEMORY_HEADROOM} of the visible memory")
        raise SpecError(f"{field}.gpu_memory_utilization: {m.gpu_memory_utilization} is more "
                        f"than a unit of pool {pool.name!r} may take ({limit}: {share})",
                        field=f"{field}.gpu_memory_utilization")
    if m.cpus > pool.worker.cpus:
        raise SpecError(f"{field}.cpus: {m.cpus} is more than a worker of pool {pool.name!r} "
                        f"has ({pool.worker.cpus})", field=f"{field}.cpus")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)


def llm_config_dict(m: ModelSpec, pool: Pool, tracking_uri: str | None = None) -> dict[str, Any]:
    """The ``LLMConfig`` (as a dict, ready for a Serve config) of one model on ``pool``."""
    tp = m.tensor_parallel_size
    max_num_seqs = m.max_num_seqs or derived_max_num_seqs(pool)
    engine_kwargs = {**m.engine_kwargs,
                     "gpu_memory_utilization": m.gpu_memory_utilization
                     or derived_gpu_memory_utilization(pool),
                     "max_num_seqs": max_num_seqs,
                     "tensor_parallel_size": tp}
    if m.max_model_len:
        engine_kwargs["max_model_len"] = m.max_model_len
    bundle = {"GPU": 1, pool.ray_resource: 1}
    if m.cpus:
        bundle["CPU"] = m.cpus
    cfg: dict[str, Any] = {
        "model_loading_config": {"model_id": m.name},
        "accelerator_type": pool.gpu_model.ray_accelerator_type if pool.gpu_model else None,
        "engine_kwargs": engine_kwargs,
        # One bundle per tensor-parallel rank, all on one node (whole GPUs of one node).
        "placement_group_config": {"bundles": [dict(bundle) for _ in range(tp)],
                                   "strategy": "STRICT_PACK"},
        "deployment_config": {
            "autoscaling_config": m.autoscaling.serve_options(),
            "max_ongoing_requests": 2 * max_num_seqs,
            "max_queued_requests": m.max_queued_requests,
        },
    }
    kind = source_kind(m.source)
    if kind is SourceKind.s3:
        cfg["model_loading_config"]["model_source"] = {"bucket_uri": m.source.rstrip("/")}
    elif kind is SourceKind.folder:
        cfg["model_loading_config"]["model_source"] = m.source
    else:
        # The registry/run artifact is downloaded on the node before vLLM starts; the folder
        # name changes with the (pinned) source, so a new version never reuses an old one.
        digest = hashlib.sha1(m.source.encode()).hexdigest()[:12]
        local = f"{MODEL_CACHE}/{_safe(m.name)}-{digest}"
        cfg["model_loading_config"]["model_source"] = local
        cfg["callback_config"] = {
            "callback_class": MODEL_DOWNLOAD_CALLBACK,
            "callback_kwargs": {"source": m.source, "dest": local,
                                "tracking_uri": tracking_uri},
        }
    if tracking_uri:
        cfg["runtime_env"] = {"env_vars": {"MLFLOW_TRACKING_URI": tracking_uri}}
    return cfg


def validate_llm_config(cfg: dict[str, Any]):
    """Ray's own ``LLMConfig`` of ``cfg`` (ValueError if Ray refuses it)."""
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig

    return LLMConfig.model_validate(cfg)


__all__ = ["MEMORY_HEADROOM", "MODEL_CACHE", "MODEL_DOWNLOAD_CALLBACK", "check_placement",
           "derived_gpu_memory_utilization", "derived_max_num_seqs", "llm_config_dict",
           "validate_llm_config"]
