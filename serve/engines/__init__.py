"""Serving engines: ``cpu`` (torch + transformers, continuous batching) and ``vllm``
(``ray.serve.llm`` on the GPU pools)."""

from serve.engines.base import Delta, EngineError, EngineOverloaded, SamplingParams

__all__ = ["Delta", "EngineError", "EngineOverloaded", "SamplingParams"]
