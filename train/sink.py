"""Rank 0's metrics sink: per-step metrics to MLflow (batched) and, optionally, W&B, that
loses nothing while the tracking server is down (``train.tracking`` has the driver's side).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from train.tracking import PENDING_METRICS, client, server_up


class MetricsSink:
    """Rank 0's per-step metrics to MLflow (batched) and, optionally, W&B.

    A tracking server that does not answer costs no metric and no training time: ``flush``
    keeps the batch (checking ``/health`` first, so a dead server is one quick connection
    refused) and says so once per outage; the next flush sends everything. ``write_pending``
    puts what is still kept into a checkpoint folder and ``restore`` takes it back on resume,
    so a worker restart or the driver (``read_pending``) still has it."""

    def __init__(self, tracking_uri: str | None, run_id: str | None, wandb_run=None,
                 say: Callable[[str], object] | None = None):
        self.client = None
        self.uri = tracking_uri
        self.run_id = run_id
        if tracking_uri and run_id:
            self.client = client(tracking_uri)
        self.wandb = wandb_run
        self.pending: list = []
        self.say = say or (lambda msg: (sys.stdout.write(msg + "\n"), sys.stdout.flush()))
        self.down_since: float | None = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is not None:
            from mlflow.entities import Metric

            ts = int(time.time() * 1000)
            self.pending += [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def flush(self) -> bool:
        """Send what is kept; False (and kept) while the server does not answer."""
        if self.client is None or not self.pending:
            return True
        try:
            if not server_up(self.uri):
                raise ConnectionError(f"no answer on {self.uri}/health")
            while self.pending:
                batch = self.pending[:900]  # MLflow's batch limit is 1000
                self.client.log_batch(self.run_id, metrics=batch)
                self.pending = self.pending[len(batch):]
        except Exception as err:
            if server_up(self.uri):
                raise  # the server answers: a real error, not an outage
            if self.down_since is None:
                self.down_since = time.monotonic()
                self.say(f"[rank 0] MLflow at {self.uri} is not answering "
                         f"({type(err).__name__}): keeping {len(self.pending)} metrics, "
                         "sending them when it is back")
            return False
        if self.down_since is not None:
            self.say(f"[rank 0] MLflow at {self.uri} is back after "
                     f"{time.monotonic() - self.down_since:.0f}s: metrics sent")
            self.down_since = None
        return True

    def pending_rows(self) -> list[dict[str, Any]]:
        return [{"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}
                for m in self.pending]

    def write_pending(self, folder: str | Path) -> None:
        if self.pending:
            (Path(folder) / PENDING_METRICS).write_text(json.dumps(self.pending_rows()))

    def restore(self, rows: list[dict[str, Any]]) -> None:
        """Keep the metrics a checkpoint had not sent (``read_pending``: a resumed rank 0)."""
        if self.client is None or not rows:
            return
        from mlflow.entities import Metric

        self.pending = [Metric(r["key"], float(r["value"]), int(r["timestamp"]),
                               int(r["step"])) for r in rows] + self.pending

    def close(self) -> None:
        self.flush()
        if self.wandb is not None:
            self.wandb.finish()


__all__ = ["MetricsSink"]
