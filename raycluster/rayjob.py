"""How a driver joins the platform's Ray cluster: ``ray job submit``'s own, or a client's.

Shared by every workload that runs as a Ray job (train, features): connecting with the right
address and runtime environment, and the local platform's one working-directory hazard.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from raycluster.catalog import Catalog

#: Set by Ray's job supervisor in a submitted job's driver.
JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def in_submitted_job() -> bool:
    """Whether this process is the driver of a ``ray job submit`` job."""
    return bool(os.environ.get(JOB_ENV))


def connect_ray(py_modules: list[str], **init_kwargs: Any) -> None:
    """Connect to the cluster: inside ``ray job submit`` the job's own; otherwise
    RAY_ADDRESS (or a new local Ray), shipping ``py_modules`` (this checkout's package
    folders) to the workers."""
    import ray

    if ray.is_initialized():
        return
    init_kwargs.setdefault("log_to_driver", True)
    if in_submitted_job():
        job_env = (json.loads(os.environ[JOB_ENV]).get("runtime_env") or {}).get(
            "env_vars") or {}
        if os.environ.get("RAY_ADDRESS") and "RAY_ADDRESS" not in job_env:
            # The job's actors find their cluster for ray.util.state calls (Ray Train's
            # placement-group cleaner frees a dead controller's workers that way) from
            # RAY_ADDRESS, else by scanning the machine for Ray instances, which fails where
            # several clusters share one (the local platform beside another): pin it to
            # the cluster this job runs on (merged into the job's runtime env).
            init_kwargs["runtime_env"] = {
                "env_vars": {"RAY_ADDRESS": os.environ["RAY_ADDRESS"]}}
        ray.init(**init_kwargs)
        return
    ray.init(runtime_env={"py_modules": py_modules}, **init_kwargs)


def cluster_is_local(catalog: Catalog, nodes: list[dict[str, Any]]) -> bool:
    """A cluster is the local platform when a node advertises a GPU pool's resource but has
    no GPU (the emulation); KubeRay GPU workers always advertise their GPUs."""
    gpu_pool_resources = {p.ray_resource for p in catalog.gpu_pools}
    for node in nodes:
        if not node.get("Alive", True):
            continue
        res = node.get("Resources", {})
        if gpu_pool_resources & set(res) and not res.get("GPU"):
            return True
    return False


def settle_working_dir(nodes: list[dict[str, Any]]) -> None:
    """The local platform runs all its Ray nodes on one machine with one temp dir, so every
    node's runtime-env agent unpacks the job's working_dir into the same folder, removing it
    first; the driver's cwd and files read meanwhile vanish. Wait until each node has set the
    job's environment up (a no-op task per node), then leave the cwd (everything cwd-relative
    must be resolved before). On KubeRay each node has its own disk: not needed."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def noop() -> None:
        return None

    # max_calls=1: each no-op's worker exits after it. Kept idle, a worker whose node was
    # set up before another node's agent re-unpacked the shared folder would keep a deleted
    # cwd, and the job's next task reusing it fails on anything calling os.getcwd() (Feast's
    # import does, through gunicorn).
    task = ray.remote(num_cpus=0, max_calls=1)(noop)
    ray.get([task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote() for n in nodes], timeout=120)
    os.chdir(tempfile.gettempdir())


__all__ = ["JOB_ENV", "cluster_is_local", "connect_ray", "in_submitted_job", "settle_working_dir"]
