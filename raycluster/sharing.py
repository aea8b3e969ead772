"""Applying a pool's GPU share inside a worker process.

Time-slicing isolates nothing: every pod on a shared GPU sees all of its memory. The share a
unit may use (``Pool.gpu_fraction_per_unit``: 1/replicas) is therefore set in each process
that touches the GPU -- torch's caching allocator refuses to grow past it, so one replica
that over-allocates fails alone instead of taking its neighbours down with CUDA OOM. On MIG
the instance is the process's whole device and the fraction is 1.0.
"""

from __future__ import annotations

from raycluster.catalog import Pool


def limit_torch_gpu_memory(pool: Pool, device: int | None = None) -> float | None:
    """Cap this process's torch allocations on ``device`` to the pool's per-unit share.
    Returns the fraction set, or None where there is no CUDA device (the local platform)."""
    import torch

    if not pool.has_gpu or not torch.cuda.is_available():
        return None
    fraction = pool.gpu_fraction_per_unit
    if fraction < 1.0:
        torch.cuda.set_per_process_memory_fraction(
            fraction, device if device is not None else torch.cuda.current_device())
    return fraction
