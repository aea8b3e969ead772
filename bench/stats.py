"""What a benchmark run measured: each request's timings (:class:`RequestResult`) and a run's
summary in ``vllm bench serve``'s terms (:class:`Summary`: throughput, output tokens/s, TTFT,
ITL, TPOT and end-to-end latency percentiles, failures)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""


@dataclass
class Summary:
    system: str
    concurrency: int
    stream: bool
    requests: int
    failures: int
    duration_s: float
    request_throughput: float
    output_tokens_per_s: float
    ttft_ms_p50: float
    ttft_ms_p99: float
    itl_ms_p50: float
    itl_ms_p99: float
    tpot_ms_p50: float
    e2e_ms_p50: float
    e2e_ms_p99: float
    errors: list[str]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(system: str, concurrency: int, stream: bool, results: list[RequestResult],
              duration: float) -> Summary:
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [x for r in ok for x in r.itl]
    ms = 1000.0
    return Summary(
        system=system, concurrency=concurrency, stream=stream, requests=len(results),
        failures=len(results) - len(ok), duration_s=round(duration, 3),
        request_throughput=round(len(ok) / duration, 3),
        output_tokens_per_s=round(tokens / duration, 1),
        ttft_ms_p50=round(pct([r.ttft for r in ok], 50) * ms, 2),
        ttft_ms_p99=round(pct([r.ttft for r in ok], 99) * ms, 2),
        itl_ms_p50=round(pct(itl, 50) * ms, 3), itl_ms_p99=round(pct(itl, 99) * ms, 3),
        tpot_ms_p50=round(pct(tpot, 50) * ms, 3),
        e2e_ms_p50=round(pct([r.e2e for r in ok], 50) * ms, 2),
        e2e_ms_p99=round(pct([r.e2e for r in ok], 99) * ms, 2),
        errors=sorted({r.error for r in results if not r.ok})[:5])


__all__ = ["RequestResult", "Summary", "pct", "summarize"]
