"""How big a KubeRay worker group is: its pool, what one worker pod asks and advertises, and
how many pods -- for a worker group an environment declares, for a training config (as many
pods as Ray Train's workers need) and for a serve config (one group per pool its models and
ingress use, up to the replicas' autoscaling maximum). What a pool's nodes could never hold
is refused here, with the field named."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from raycluster.capacity import misfit, schedulable_nodes
from raycluster.catalog import Catalog, Pool, SharingMode
from raycluster.environments import WorkerGroupSpec
from raycluster.spec import SpecError
from serve.config import ServeAppConfig
from train.config import TrainConfig, worker_resources


@dataclass(frozen=True)
class GroupShape:
    """What one worker pod of a group asks Kubernetes for and advertises to Ray."""

    pool: Pool
    name: str
    gpu_units: int
    cpus: int
    memory_gib: int
    min_replicas: int
    max_replicas: int
    idle_timeout_seconds: int = 300
    serve: bool = False
    extra_labels: dict[str, str] = field(default_factory=dict)

    @property
    def ray_resources(self) -> dict[str, float]:
        """Custom resources the worker advertises: the pool's resource, counted as the
        catalog counts it (GPU units on GPU pools, CPUs on CPU pools)."""
        amount = self.gpu_units if self.pool.has_gpu else self.cpus
        return {self.pool.ray_resource: float(amount)}


def resolve_group(catalog: Catalog, group: WorkerGroupSpec, field: str) -> GroupShape:
    """A worker group spec against its pool: defaults from the pool's worker shape, and
    refusals (with the field named) for what the pool's nodes cannot hold."""
    pool = catalog.pool(group.pool, f"{field}.pool")
    gpu_units = pool.worker.gpu_units if group.gpu_units is None else group.gpu_units
    cpus = group.cpus or pool.worker.cpus
    memory = group.memory_gib or pool.worker.memory_gib
    check_worker_fits_pool(pool, gpu_units=gpu_units, cpus=cpus, memory_gib=memory, field=field)
    max_replicas = group.max_replicas
    if max_replicas is None:
        per_node = pool.workers_per_node_of(gpu_units=gpu_units, cpus=cpus, memory_gib=memory)
        max_replicas = max(1, per_node * schedulable_nodes(pool))
    return GroupShape(pool=pool, name=group.group_name, gpu_units=gpu_units, cpus=cpus,
                      memory_gib=memory, min_replicas=group.min_replicas,
                      max_replicas=max_replicas,
                      idle_timeout_seconds=group.idle_timeout_seconds)


def check_worker_fits_pool(pool: Pool, *, gpu_units: int, cpus: int, memory_gib: int,
                           field: str) -> None:
    if pool.has_gpu and gpu_units > pool.gpu_units_per_node:
        raise SpecError(f"{field}.gpu_units: {gpu_units} is more than a node of pool "
                        f"{pool.name!r} holds ({pool.gpu_units_per_node} units on "
                        f"{pool.instance_types[0]})", field=f"{field}.gpu_units")
    if not pool.has_gpu and gpu_units:
        raise SpecError(f"{field}.gpu_units: {gpu_units} but pool {pool.name!r} has no GPU "
                        f"({pool.instance_types[0]}); valid: 0", field=f"{field}.gpu_units")
    if pool.has_gpu and gpu_units < 1:
        raise SpecError(f"{field}.gpu_units: a worker on GPU pool {pool.name!r} needs at least "
                        "1 unit (use the cpu pool for CPU work)", field=f"{field}.gpu_units")
    if pool.sharing.mode is SharingMode.time_slicing and gpu_units > 1:
        # The device plugin is configured with failRequestsGreaterThanOne: several replicas
        # of a time-sliced GPU are not several GPUs (gpu_operator.py).
        raise SpecError(f"{field}.gpu_units: {gpu_units} time-slice replicas in one pod would "
                        f"share one GPU of pool {pool.name!r} (no more compute or memory); "
                        "valid: 1, or a whole-GPU pool", field=f"{field}.gpu_units")
    # What a node offers is its allocatable after kube-reserved, the eviction threshold, the
    # DaemonSets and the pod's Linkerd proxy (raycluster.capacity), not its raw size.
    bad = misfit(pool, gpu_units=gpu_units, cpus=cpus, memory_gib=memory_gib)
    if bad:
        raise SpecError(f"{field}.{bad[0]}: {bad[1]}", field=f"{field}.{bad[0]}")


def training_group(catalog: Catalog, train_cfg: TrainConfig, *, field: str) -> GroupShape:
    """The worker group a training config needs: its pool's worker shape, as many workers as
    Ray Train asks (``train.config.worker_resources(local=False)`` per rank)."""
    pool = catalog.pool(train_cfg.pool, f"{field}.pool")
    ask = worker_resources(catalog, train_cfg, local=False)
    gpu = math.ceil(ask.get("GPU", 0.0))
    cpus = math.ceil(ask.get("CPU", pool.worker.cpus)) or pool.worker.cpus
    check_worker_fits_pool(pool, gpu_units=gpu, cpus=cpus,
                           memory_gib=pool.worker.memory_gib, field=field)
    offer = {"CPU": float(cpus), "GPU": float(gpu), pool.ray_resource: float(gpu or cpus)}
    pods = 1
    for key, amount in ask.items():
        if amount <= 0:
            continue
        if key not in offer or offer[key] <= 0:
            raise SpecError(f"{field}: a training worker asks {key}={amount:g}, which no "
                            f"worker of pool {pool.name!r} advertises", field=field)
        pods = max(pods, math.ceil(train_cfg.num_workers * amount / offer[key]))
    if pods > pool.max_workers:
        raise SpecError(f"{field}.num_workers: {train_cfg.num_workers} workers need {pods} "
                        f"pods but pool {pool.name!r} holds at most {pool.max_workers}",
                        field=f"{field}.num_workers")
    return GroupShape(pool=pool, name=pool.name, gpu_units=gpu, cpus=cpus,
                      memory_gib=pool.worker.memory_gib, min_replicas=pods, max_replicas=pods,
                      idle_timeout_seconds=60)


def serve_groups(catalog: Catalog, serve_cfg: ServeAppConfig, *,
                 field: str) -> list[GroupShape]:
    """Worker groups a serve config needs: one per pool its models and its ingress use,
    sized so that every replica fits one pod, as many pods as the replicas' autoscaling
    maximum needs. Refuses replicas larger than a node and more pods than a pool holds.

    Whether a vLLM model may run on its pool at all (a GPU pool, tensor parallelism only on
    whole GPUs) is the serve config's own placement check, which runs first: rendering the
    Serve config (``raycluster.render.render_service``) refuses it with the field named."""
    need: dict[str, dict[str, float]] = {}  # pool -> {units per pod, min pods, max pods}
    cfield = field

    def add(pool: Pool, units: int, min_pods: float, max_pods: float) -> None:
        entry = need.setdefault(pool.name, {"units": 0, "min": 0.0, "max": 0.0})
        entry["units"] = max(entry["units"], units)
        entry["min"] += min_pods
        entry["max"] += max_pods

    ingress_pool = catalog.pool(serve_cfg.ingress.pool, f"{cfield}.ingress.pool")
    ingress_units = 1 if ingress_pool.has_gpu else 0
    add(ingress_pool, ingress_units, 1, 1)
    for j, model in enumerate(serve_cfg.models):
        mfield = f"{cfield}.models[{j}]"
        pool = catalog.pool(model.pool, f"{mfield}.pool")
        tp = model.tensor_parallel_size
        if not model.holds_model:
            # A client of a server outside the replica (an OpenAI upstream; Triton in its own
            # container or elsewhere) runs beside the ingress, on its pool and share of a
            # core; ``pool`` is where a server rayplane renders runs (inference_servers).
            per = max(1, int(ingress_pool.worker.cpus // max(serve_cfg.ingress.cpus, 0.001)))
            add(ingress_pool, ingress_units, math.ceil(model.autoscaling.min_replicas / per),
                math.ceil(model.autoscaling.max_replicas / per))
            continue
        if pool.has_gpu:
            units = max(model.gpu_units, tp)
            if units > pool.gpu_units_per_node:
                which = "tensor_parallel_size" if tp >= units else "gpu_units"
                raise SpecError(f"{mfield}.{which}: one replica needs {units} GPU units but a "
                                f"node of pool {pool.name!r} holds {pool.gpu_units_per_node} "
                                f"({pool.instance_types[0]})", field=f"{mfield}.{which}")
            per_pod = max(units, pool.worker.gpu_units)
            replicas_per_pod = per_pod // units
        else:
            units = 0
            per_pod = 0
            replicas_per_pod = max(1, int(pool.worker.cpus // max(model.cpus, 0.001)))
        auto = model.autoscaling
        add(pool, per_pod, math.ceil(auto.min_replicas / replicas_per_pod),
            math.ceil(auto.max_replicas / replicas_per_pod))
    groups = []
    for name in sorted(need):
        pool = catalog.pool(name)
        entry = need[name]
        units = int(entry["units"]) if pool.has_gpu else 0
        gfield = f"{cfield}.pool({name})"
        check_worker_fits_pool(pool, gpu_units=units, cpus=pool.worker.cpus,
                               memory_gib=pool.worker.memory_gib, field=gfield)
        cap = pool.workers_per_node_of(gpu_units=units, cpus=pool.worker.cpus,
                                       memory_gib=pool.worker.memory_gib) * pool.max_nodes
        max_pods = int(entry["max"])
        if max_pods > cap:
            raise SpecError(f"{cfield}: the models on pool {name!r} need up to {max_pods} "
                            f"workers at their max_replicas, but the pool holds {cap}; lower "
                            "autoscaling.max_replicas or raise the pool's max_nodes",
                            field=cfield)
        groups.append(GroupShape(pool=pool, name=name, gpu_units=units, cpus=pool.worker.cpus,
                                 memory_gib=pool.worker.memory_gib,
                                 min_replicas=int(entry["min"]), max_replicas=max(1, max_pods),
                                 idle_timeout_seconds=600, serve=True))
    return groups


__all__ = [
    "GroupShape",
    "check_worker_fits_pool",
    "resolve_group",
    "serve_groups",
    "training_group",
]
