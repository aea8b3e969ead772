"""The platform's own history, generated: jobs submitted to the pools and the pools' load.

Nothing is downloaded (issue 17): a seeded simulation writes what the platform would record.
Every 10 minutes each pool's load is snapshotted (``pool_load``: running, pending and free
units, GPU utilisation, the mean queue wait of the jobs that started in the hour before);
jobs arrive through the day (more in working hours) on the catalog's pools and carry their
request (units, model size) and, once finished, their outcome (queue wait, duration, GPU
utilisation).

The labels are a function of what a model can see at submission plus noise, so a model can
beat the mean (issue 17's "beats the mean-duration baseline"):

- ``queue_wait_s`` grows with the pool's pending units and with the units the job asks for
  beyond the free ones (the pool's snapshot at or before submission: the very row Feast's
  point-in-time join hands the model);
- ``duration_s`` grows with the model size over the units times the pool's speed, and with
  the pool's GPU utilisation (contention on shared GPUs);
- both carry lognormal noise.

``python -m features.data --out DIR [--seed N] [--days D]`` writes ``jobs.parquet`` and
``pool_load.parquet`` (what the feature repository's sources read).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from raycluster.catalog import Catalog, load_catalog

JOBS_FILE = "jobs.parquet"
POOL_LOAD_FILE = "pool_load.parquet"
#: Snapshot period of the pools' load.
SNAPSHOT_EVERY = timedelta(minutes=10)
#: The default history ends here (fixed, so a seed gives the same rows on every machine).
DEFAULT_END = datetime(2026, 11, 1, tzinfo=UTC)
#: Jobs per day across the platform.
JOBS_PER_DAY = 215
#: Relative speed of one unit of a pool (an A100 time-slice replica = 1): a 3g.40gb MIG slice
#: owns 3/7 of an A100 without sharing, an H100 replica is ~2x an A100 one; the cpu pool is
#: what a GPU-less worker manages. A pool missing here counts as 1.
POOL_SPEED = {"cpu": 0.08, "a100-timeslice": 1.0, "a100-mig": 1.4, "h100-timeslice": 2.2}
#: Share of the jobs each pool receives (missing pools get the mean share).
POOL_SHARE = {"cpu": 0.15, "a100-timeslice": 0.4, "a100-mig": 0.15, "h100-timeslice": 0.3}

JOB_COLUMNS = {"job_id": "int64", "pool": "object", "submitted_at": "datetime64[ns, UTC]",
               "requested_units": "int64", "model_size_b": "float64",
               "queue_wait_s": "float64", "duration_s": "float64",
               "gpu_utilization": "float64", "created": "datetime64[ns, UTC]"}
POOL_LOAD_COLUMNS = {"pool": "object", "event_timestamp": "datetime64[ns, UTC]",
                     "running_units": "int64", "pending_units": "int64", "free_units": "int64",
                     "gpu_utilization": "float64", "mean_wait_1h_s": "float64",
                     "created": "datetime64[ns, UTC]"}


@dataclass(frozen=True)
class PlatformHistory:
    jobs: pd.DataFrame
    pool_load: pd.DataFrame


def pool_capacities(catalog: Catalog | None = None) -> dict[str, int]:
    """Units each pool can hold at once (its workers: GPU units, or CPU workers on cpu)."""
    catalog = catalog or load_catalog()
    return {p.name: max(1, int(p.max_workers)) for p in catalog.pools}


def generate(seed: int = 0, days: int = 14, end: datetime = DEFAULT_END,
             jobs_per_day: int = JOBS_PER_DAY,
             capacities: dict[str, int] | None = None) -> PlatformHistory:
    """The seeded history of ``days`` days up to ``end``: the same seed, the same frames."""
    rng = np.random.default_rng(seed)
    capacities = capacities or pool_capacities()
    pools = sorted(capacities)
    end_ts = pd.Timestamp(end)  # a naive time is UTC
    end_ts = (end_ts.tz_localize("UTC") if end_ts.tzinfo is None else end_ts.tz_convert("UTC")
              ).floor(SNAPSHOT_EVERY)
    times = pd.date_range(end=end_ts, periods=int(days * timedelta(days=1) / SNAPSHOT_EVERY),
                          freq=SNAPSHOT_EVERY, tz="UTC")
    load = {p: _pool_series(rng, times, capacities[p]) for p in pools}
    jobs = _jobs(rng, times, load, capacities, jobs_per_day * days)
    frames = []
    for p in pools:
        frame = pd.DataFrame({"pool": p, "event_timestamp": times, **load[p]})
        frame["mean_wait_1h_s"] = _mean_wait_1h(jobs[jobs["pool"] == p], times)
        frames.append(frame)
    pool_load = pd.concat(frames, ignore_index=True)
    # A snapshot is written a few seconds after the moment it describes.
    pool_load["created"] = pool_load["event_timestamp"] + pd.to_timedelta(
        rng.integers(1, 30, len(pool_load)), unit="s")
    return PlatformHistory(jobs=_typed(jobs, JOB_COLUMNS),
                           pool_load=_typed(pool_load, POOL_LOAD_COLUMNS))


def _pool_series(rng: np.random.Generator, times: pd.DatetimeIndex,
                 capacity: int) -> dict[str, np.ndarray]:
    """One pool's load: a daily cycle (busy in working hours) plus an AR(1) wander."""
    hours = times.hour.to_numpy() + times.minute.to_numpy() / 60
    daily = 0.55 + 0.3 * np.sin((hours - 8) / 24 * 2 * np.pi)
    wander = np.zeros(len(times))
    shocks = rng.normal(0, 0.06, len(times))
    for i in range(1, len(times)):
        wander[i] = 0.93 * wander[i - 1] + shocks[i]
    demand = np.clip(daily + wander, 0.02, 1.6)  # above 1: more asked than the pool holds
    running = np.minimum(np.round(demand * capacity), capacity).astype(np.int64)
    pending = np.round(np.maximum(demand - 0.85, 0) * capacity * 1.5
                       + rng.poisson(0.3, len(times))).astype(np.int64)
    free = (capacity - running).astype(np.int64)
    util = np.clip(running / capacity * rng.uniform(0.7, 0.98, len(times)), 0, 1)
    return {"running_units": running, "pending_units": pending, "free_units": free,
            "gpu_utilization": util}


def _jobs(rng: np.random.Generator, times: pd.DatetimeIndex, load: dict[str, dict],
          capacities: dict[str, int], n: int) -> pd.DataFrame:
    pools = sorted(capacities)
    start, stop = times[0].value, (times[-1] + SNAPSHOT_EVERY).value
    # Arrivals: uniform times thinned by a daily cycle (more jobs in working hours).
    cand = rng.integers(start, stop, n * 3)
    hour = (cand // 3_600_000_000_000) % 24
    keep = rng.random(len(cand)) < 0.4 + 0.6 * np.exp(-((hour - 14) / 5.0) ** 2)
    # Whole seconds (Feast's stores keep microseconds at best), no two jobs in the same
    # second: the Ray offline store collapses entity rows that share keys and timestamp.
    submitted = np.unique(cand[keep] // 1_000_000_000 * 1_000_000_000)
    submitted = np.sort(rng.choice(submitted, min(n, len(submitted)), replace=False))
    n = len(submitted)
    share = np.array([POOL_SHARE.get(p, 1 / len(pools)) for p in pools])
    pool_idx = rng.choice(len(pools), n, p=share / share.sum())
    pool = np.array(pools)[pool_idx]
    cap = np.array([capacities[p] for p in pools])[pool_idx]
    units = rng.choice([1, 2, 4, 8], n, p=[0.45, 0.3, 0.17, 0.08])
    units = np.minimum(units, cap).astype(np.int64)
    # Models in billions of parameters; the cpu pool runs only small ones.
    gpu = np.array([POOL_SPEED.get(p, 1.0) >= 0.5 for p in pools])[pool_idx]
    size = np.round(np.exp(rng.normal(np.log(3.0), 1.0, n)), 2).clip(0.1, 70)
    size = np.where(gpu, size, np.round(size / 10, 2).clip(0.1, None))
    # The snapshot a job sees: the latest at or before its submission (what Feast joins).
    slot = np.searchsorted(times.asi8, submitted, side="right") - 1
    feats = {k: np.array([load[p][k][s] for p, s in zip(pool, slot, strict=True)])
             for k in ("running_units", "pending_units", "free_units", "gpu_utilization")}
    short = np.maximum(units + feats["pending_units"] - feats["free_units"], 0) / cap
    wait = (20 + 1800 * short + 90 * feats["pending_units"] / (feats["free_units"] + 1)
            ) * rng.lognormal(0, 0.3, n)
    speed = np.array([POOL_SPEED.get(p, 1.0) for p in pool])
    duration = (120 + 900 * size / (units * speed)) * (1 + feats["gpu_utilization"]) \
        * rng.lognormal(0, 0.25, n)
    duration = np.minimum(duration, 2 * 86400)  # the platform stops a job after two days
    job_util = np.clip(0.45 + 0.08 * np.log1p(size) - 0.04 * np.log2(units)
                       + rng.normal(0, 0.08, n), 0.02, 1.0)
    sub = pd.to_datetime(submitted, utc=True)
    return pd.DataFrame({
        "job_id": np.arange(1, n + 1, dtype=np.int64), "pool": pool, "submitted_at": sub,
        "requested_units": units, "model_size_b": size, "queue_wait_s": np.round(wait, 1),
        "duration_s": np.round(duration, 1), "gpu_utilization": np.round(job_util, 3),
        # The outcome is recorded when the job ends.
        "created": sub + pd.to_timedelta(np.round(wait + duration, 1), unit="s")})


def _mean_wait_1h(jobs: pd.DataFrame, times: pd.DatetimeIndex) -> np.ndarray:
    """Per snapshot: the mean queue wait of the pool's jobs that started in the hour before
    (only waits known by then), 0 when none did."""
    started = (jobs["submitted_at"] + pd.to_timedelta(jobs["queue_wait_s"], unit="s"))
    order = np.argsort(started.to_numpy())
    t = pd.DatetimeIndex(started).asi8[order]
    waits = np.concatenate([[0.0], np.cumsum(jobs["queue_wait_s"].to_numpy()[order])])
    now = times.asi8
    hi = np.searchsorted(t, now, side="right")
    lo = np.searchsorted(t, now - 3_600_000_000_000, side="right")
    count = hi - lo
    total = waits[hi] - waits[lo]
    return np.round(np.where(count > 0, total / np.maximum(count, 1), 0.0), 1)


def _typed(frame: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    frame = frame[list(columns)].copy()
    for name, dtype in columns.items():
        if dtype != "object" and not dtype.startswith("datetime"):
            frame[name] = frame[name].astype(dtype)
    return frame.reset_index(drop=True)


def write(history: PlatformHistory, folder: Path | str) -> dict[str, Path]:
    """``<folder>/jobs.parquet`` and ``<folder>/pool_load.parquet``; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"jobs": folder / JOBS_FILE, "pool_load": folder / POOL_LOAD_FILE}
    history.jobs.to_parquet(paths["jobs"], index=False)
    history.pool_load.to_parquet(paths["pool_load"], index=False)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m features.data", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Folder for the parquet files.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--days", type=int, default=14)
    args = parser.parse_args(argv)
    history = generate(seed=args.seed, days=args.days)
    for name, path in write(history, args.out).items():
        print(f"{name}: {len(getattr(history, name))} rows -> {path}")
    return 0



__all__ = ["DEFAULT_END", "JOBS_FILE", "JOB_COLUMNS", "POOL_LOAD_COLUMNS", "POOL_LOAD_FILE",
           "POOL_SPEED", "SNAPSHOT_EVERY", "PlatformHistory", "generate", "pool_capacities",
           "write"]

if __name__ == "__main__":
    sys.exit(main())
