"""PodDisruptionBudgets: Ray heads and Serve replicas under node drains."""

from __future__ import annotations

from raycluster.policy.base import CLUSTER_LABEL, NODE_TYPE_LABEL, meta


def render_head_pdb(name: str, namespace: str) -> dict:
    """``maxUnavailable: 1``: a node drain (an upgrade of the cpu pool, Karpenter
    consolidation, a spot reclaim of a neighbour) may evict the head, then waits for its
    replacement before it evicts the next. ``0`` would make every drain of the cpu pool hang
    until someone deletes the PDB. A head with GCS fault tolerance (external Redis) comes back
    with its jobs, actors and Serve apps, and its workers keep running and reconnect; without
    it the cluster's running work is lost, so put long work on clusters with GCS FT or accept
    that an eviction restarts it."""
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": meta(f"{name}-head", namespace),
            "spec": {"maxUnavailable": 1,
                     "selector": {"matchLabels": {CLUSTER_LABEL: name, NODE_TYPE_LABEL: "head"}}}}


def render_serve_pdb(name: str, namespace: str) -> dict:
    """Serve replicas drain one worker at a time, so the app keeps answering during drains."""
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": meta(f"{name}-serve-workers", namespace),
            "spec": {"maxUnavailable": 1,
                     "selector": {"matchLabels": {CLUSTER_LABEL: name,
                                                  NODE_TYPE_LABEL: "worker"}}}}
