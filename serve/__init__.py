"""The OpenAI-compatible Ray Serve application: a serve config (``ServeAppConfig``) renders the
Ray Serve config that ``serve deploy`` and a KubeRay RayService take (``serve.builder``); the
app routes OpenAI requests to a CPU engine (torch + transformers) locally or to vLLM on the GPU
pools. ``serve.deploy`` deploys a config to a cluster (the library beneath ``rayplane serve``).
"""

from serve.config import ApiKeys, Autoscaling, EngineKind, ModelSpec, ServeAppConfig

__all__ = ["ApiKeys", "Autoscaling", "EngineKind", "ModelSpec", "ServeAppConfig"]
