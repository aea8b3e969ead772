"""Serving engines behind one interface (``Engine``, serve/engines/base.py): ``cpu`` (torch +
transformers, continuous batching) and ``vllm`` (``ray.serve.llm`` on the GPU pools)."""

from serve.engines.base import (
    Delta,
    Engine,
    EngineError,
    EngineOverloaded,
    EngineStats,
    SamplingParams,
)

__all__ = ["Delta", "Engine", "EngineError", "EngineOverloaded", "EngineStats", "SamplingParams"]
