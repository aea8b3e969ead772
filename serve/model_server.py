"""The model deployment of the CPU app (``model-<name>``): one served model's engine and its
OpenAI serving logic in one replica, so tokens never cross a process boundary one by one.

``ingress.mode: router``: the ingress (serve/ingress.py) calls it through a Serve
``DeploymentHandle``. ``ingress.mode: direct``: the ingress replica holds a ``ModelServer`` of its
own and calls it through :class:`InReplicaModel`, the part of the handle interface it uses,
so both modes share one request path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ray import serve

from serve.protocol import ChatCompletionRequest, CompletionRequest

logger = logging.getLogger("ray.serve")


@serve.deployment
class ModelServer:
    """One served model: downloads its folder, runs its engine (the CPU engine, or a Triton
    server's model: serve/engines/triton.py) and the OpenAI logic."""

    def __init__(self, model: dict, mlflow_tracking_uri: str | None = None):
        from serve.engines.model_source import fetch_model
        from serve.metrics import ModelMetrics
        from serve.serving import OpenAIServing

        self.name = model["name"]
        self.stream_interval_s = float(model.get("stream_interval_ms", 50)) / 1000
        self.source = model["source"]
        self.path = fetch_model(self.source, tracking_uri=mlflow_tracking_uri)
        self._downloaded = str(self.path) != self.source
        self.engine = make_engine(model, self.path)
        # Per model version (model monitoring): the source names the registry version.
        self.metrics = ModelMetrics(self.name, self.source)
        self.serving = OpenAIServing(self.engine, self.name, root=self.source,
                                     observer=self.metrics,
                                     stream_interval_s=self.stream_interval_s,
                                     engine_kind=model.get("engine", "cpu"))
        logger.info("model %s from %s ready (%s, max_model_len %d)", self.name, self.source,
                    self.path, self.engine.max_model_len)

    def card(self) -> dict:
        return self.serving.model_card().model_dump()

    def stats(self) -> dict:
        return {**asdict(self.engine.stats()), "source": self.source}

    async def chat(self, req: ChatCompletionRequest, request_id: str) -> dict:
        return await self.metrics.call(self.serving.chat(req, request_id))

    async def chat_stream(self, req: ChatCompletionRequest, request_id: str):
        async for line in self.metrics.stream(self.serving.chat_stream(req, request_id)):
            yield line

    async def completion(self, req: CompletionRequest, request_id: str) -> dict:
        return await self.metrics.call(self.serving.completion(req, request_id))

    async def completion_stream(self, req: CompletionRequest, request_id: str):
        async for line in self.metrics.stream(self.serving.completion_stream(req, request_id)):
            yield line

    def check_health(self) -> None:
        failure = self.engine.failure()
        if failure is not None:
            raise RuntimeError(failure)

    def __del__(self):
        process = getattr(getattr(self, "engine", None), "process", None)
        if process is not None:  # the Triton server this replica started
            process.stop()
        if getattr(self, "_downloaded", False):
            shutil.rmtree(Path(self.path), ignore_errors=True)


def make_engine(model: dict, path: Path):
    """The engine of one model entry of the app's args (``serve.builder._model_args``)."""
    max_num_seqs = int(model.get("max_num_seqs") or 16)
    if model.get("engine") == "triton":
        from serve.engines.triton import TritonEngine

        triton = model["triton"]
        return TritonEngine(path, url=triton.get("url"), model_name=triton["model_name"],
                            max_num_seqs=max_num_seqs, max_model_len=model.get("max_model_len"),
                            stream_interval_ms=float(model.get("stream_interval_ms", 50)),
                            startup_timeout_s=float(triton.get("startup_timeout_s", 180)),
                            label=model["name"])
    from serve.engines.cpu import CPUEngine

    threads = min(int(model.get("threads") or 1), os.cpu_count() or 1)
    return CPUEngine(path, max_num_seqs=max_num_seqs, max_model_len=model.get("max_model_len"),
                     num_threads=threads)


class InReplicaModel:
    """A ``ModelServer`` living in this replica, called through the part of the
    ``DeploymentHandle`` interface the ingress uses (``options(...).remote(...)``), so both
    ingress modes share one request path."""

    def __init__(self, server: Any):
        self.server = server

    def options(self, *, method_name: str, stream: bool = False) -> _InReplicaMethod:
        return _InReplicaMethod(getattr(self.server, method_name), stream)


class _InReplicaMethod:
    def __init__(self, method, stream: bool):
        self.method, self.stream = method, stream

    def remote(self, *args):
        if self.stream:
            return _InReplicaStream(self.method(*args))
        return self._call(*args)

    async def _call(self, *args):
        result = self.method(*args)
        return await result if asyncio.iscoroutine(result) else result


class _InReplicaStream:
    """An async generator with a ``DeploymentResponseGenerator``'s ``cancel()``."""

    def __init__(self, agen):
        self.agen = agen

    def __aiter__(self):
        return self

    def __anext__(self):
        return self.agen.__anext__()

    def cancel(self) -> None:
        # Closing the generator runs the engine's cleanup (the sequence leaves the batch).
        asyncio.get_running_loop().create_task(self.agen.aclose())


__all__ = ["InReplicaModel", "ModelServer"]
