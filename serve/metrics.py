"""Serving metrics in Prometheus, through ``ray.util.metrics`` (Ray exports them from every
node's metrics agent next to Serve's own ``ray_serve_*`` series; Prometheus scrapes them the
same way locally and on KubeRay). Names are prefixed ``ray_`` on export.

- ``rayplane_serve_requests`` (counter; model, endpoint, status): every HTTP request the
  ingress answered, errors included; ``rayplane_serve_request_errors`` (counter; model,
  endpoint, code) the ones that failed.
- ``rayplane_serve_time_to_first_token_seconds``, ``rayplane_serve_inter_token_latency_seconds``,
  ``rayplane_serve_request_latency_seconds`` (histograms; model).
- ``rayplane_serve_output_tokens`` / ``rayplane_serve_prompt_tokens`` (counters; model):
  ``rate()`` of the first is the model's output tokens per second;
  ``rayplane_serve_output_tokens_per_second`` (histogram; model) is per request.
"""

from __future__ import annotations

_LATENCY = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
_ITL = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1]
_TPS = [1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500]


class IngressMetrics:
    def __init__(self):
        from ray.util import metrics

        self.requests = metrics.Counter(
            "rayplane_serve_requests", description="OpenAI requests answered by the ingress.",
            tag_keys=("model", "endpoint", "status"))
        self.errors = metrics.Counter(
            "rayplane_serve_request_errors", description="OpenAI requests that failed.",
            tag_keys=("model", "endpoint", "code"))

    def record(self, model: str, endpoint: str, status: int, code: str | None = None) -> None:
        self.requests.inc(1, {"model": model, "endpoint": endpoint, "status": str(status)})
        if status >= 400:
            self.errors.inc(1, {"model": model, "endpoint": endpoint,
                                "code": code or str(status)})


class ModelMetrics:
    """The serving layer's observer (serve/serving.py) for one model."""

    def __init__(self, model: str):
        from ray.util import metrics

        tags = ("model",)
        self._tags = {"model": model}
        self.ttft = metrics.Histogram(
            "rayplane_serve_time_to_first_token_seconds", boundaries=_LATENCY,
            description="Time from a request reaching the model to its first token.",
            tag_keys=tags)
        self.itl = metrics.Histogram(
            "rayplane_serve_inter_token_latency_seconds", boundaries=_ITL,
            description="Time between two output tokens of one sequence.", tag_keys=tags)
        self.latency = metrics.Histogram(
            "rayplane_serve_request_latency_seconds", boundaries=_LATENCY,
            description="Time to generate a whole sequence.", tag_keys=tags)
        self.tps = metrics.Histogram(
            "rayplane_serve_output_tokens_per_second", boundaries=_TPS,
            description="Output tokens per second of one sequence.", tag_keys=tags)
        self.output_tokens = metrics.Counter(
            "rayplane_serve_output_tokens", description="Tokens generated.", tag_keys=tags)
        self.prompt_tokens = metrics.Counter(
            "rayplane_serve_prompt_tokens", description="Prompt tokens processed.",
            tag_keys=tags)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds, self._tags)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds, self._tags)

    def finished(self, prompt_tokens: int, completion_tokens: int, seconds: float,
                 first_token_s: float | None) -> None:
        self.latency.observe(seconds, self._tags)
        self.output_tokens.inc(completion_tokens, self._tags)
        self.prompt_tokens.inc(prompt_tokens, self._tags)
        if seconds > 0:
            self.tps.observe(completion_tokens / seconds, self._tags)


__all__ = ["IngressMetrics", "ModelMetrics"]
