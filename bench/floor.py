"""Serve's own floor: a deployment that answers ``{}`` at once, deployed beside the OpenAI app
as ``import_path: bench.floor:app`` (the local platform's Ray workers import it from the
checkout, as they import ``serve``). Its latency is what any Serve request costs on this
cluster before an app does work."""

from __future__ import annotations

from ray import serve


@serve.deployment(name="Floor", ray_actor_options={"num_cpus": 0})
class Floor:
    async def __call__(self, request) -> dict:
        return {}


app = Floor.bind()

__all__ = ["Floor", "app"]
