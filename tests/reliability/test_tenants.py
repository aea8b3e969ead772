"""Tenants on the real Serve app: one tenant over its requests or tokens per minute gets 429
with ``Retry-After`` and OpenAI's error body, through the official ``openai`` client, while
another tenant's requests keep succeeding at their usual latency.

The tiny model (tests/support/tiny_model.py) is deployed with ``rayplane serve up`` from the
registry, behind the platform's API key (default limits) and three tenants' keys, each in its
own file as a platform team would mount them: team-a (6 requests per minute), team-b (600)
and team-c (200 tokens per minute). Bounded: about 60 requests, a few seconds of waiting for
Retry-After, one deploy.
"""

from __future__ import annotations

import secrets
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import yaml
from openai import OpenAI

from tests.support import tiny_model as tm
from tests.support.platform import rayplane

APP, PREFIX, REGISTERED, MODEL = "tenants-tests", "/tenants-tests", "tenants-tiny", "tiny-chat"
A_RPM, C_TPM = 6, 200
pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


@pytest.fixture(scope="module")
def tenants(local_cluster, cluster_env, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("tenant-keys")
    keys = {}
    for name in ("team-a", "team-b", "team-c"):
        keys[name] = "rp-" + secrets.token_urlsafe(24)
        (folder / name).write_text(keys[name] + "\n")
        (folder / name).chmod(0o600)
    tm.register_model(tm.cached_tiny_model("1"), REGISTERED,
                      tracking_uri=local_cluster.mlflow_uri)
    doc = yaml.safe_load(tm.serve_config_yaml(
        name=APP, source=f"models:/{REGISTERED}@champion", pool="a100-mig",
        route_prefix=PREFIX, api_key_file=local_cluster.api_key_path))
    doc["default_limits"] = {"requests_per_minute": 600}
    doc["tenants"] = [
        {"name": "team-a", "api_keys": {"file": str(folder / "team-a")},
         "requests_per_minute": A_RPM},
        {"name": "team-b", "api_keys": {"file": str(folder / "team-b")},
         "requests_per_minute": 600},
        {"name": "team-c", "api_keys": {"file": str(folder / "team-c")},
         "tokens_per_minute": C_TPM}]
    cfg = folder.parent / "serve.yaml"
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = rayplane(cluster_env, "serve", "up", str(cfg))
    assert out.returncode == 0, out.stderr + out.stdout
    base_url = f"{local_cluster.serve_url}{PREFIX}/v1"
    yield {"base_url": base_url, "keys": keys,
           "platform_key": Path(local_cluster.api_key_path).read_text().strip()}
    rayplane(cluster_env, "serve", "down", APP, timeout=120)


def client(tenants, name: str, retries: int = 0) -> OpenAI:
    key = tenants["platform_key"] if name == "platform" else tenants["keys"][name]
    return OpenAI(base_url=tenants["base_url"], api_key=key, max_retries=retries, timeout=60)


def ask(c: OpenAI, **kw):
    return c.chat.completions.create(model=MODEL, messages=tm.GREETING, temperature=0,
                                     max_tokens=4, **kw)


def test_a_tenant_past_its_requests_per_minute_gets_429_and_others_do_not(tenants):
    a, b = client(tenants, "team-a"), client(tenants, "team-b")
    start = time.monotonic()
    ok = 0
    with pytest.raises(openai.RateLimitError) as refused:
        for _ in range(3 * A_RPM):
            ask(a)
            ok += 1
    elapsed = time.monotonic() - start
    # A minute's worth at once (the bucket is full), plus what refilled meanwhile.
    assert A_RPM <= ok <= A_RPM + elapsed * A_RPM / 60 + 1, (ok, elapsed)
    err = refused.value
    assert err.status_code == 429
    assert err.body["type"] == "requests" and err.body["code"] == "rate_limit_exceeded"
    assert err.body["param"] is None and "team-a" in err.body["message"]
    retry_after = int(err.response.headers["retry-after"])
    assert 1 <= retry_after <= 60 / A_RPM
    assert tenants["keys"]["team-a"] not in err.body["message"]

    # team-b is another budget: all of its requests go through while team-a is refused.
    b_ok, a_refused, a_sent = 0, 0, 0
    t0 = time.monotonic()
    for _ in range(6):
        b_ok += bool(ask(b).choices[0].message.content)
        a_sent += 1
        try:
            ask(a)
        except openai.RateLimitError:
            a_refused += 1
    refilled = (time.monotonic() - t0) * A_RPM / 60
    print(f"team-a: {ok} admitted in {elapsed:.1f} s, then 429 (Retry-After {retry_after} s); "
          f"team-b: {b_ok}/6 ok while team-a got {a_refused}/{a_sent} 429s")
    assert b_ok == 6
    assert a_refused >= a_sent - int(refilled) - 1


def test_a_flood_from_one_tenant_does_not_slow_another(tenants):
    """team-a sends as fast as 4 threads can (every one a 429) while team-b asks one request
    at a time: team-b's requests all succeed, at about their usual latency."""
    a, b = client(tenants, "team-a"), client(tenants, "team-b")

    def timed() -> float:
        t = time.perf_counter()
        assert ask(b).choices[0].message.content
        return time.perf_counter() - t

    baseline = [timed() for _ in range(5)]
    stop = time.monotonic() + 6
    counts = {"429": 0, "ok": 0}

    def flood():
        while time.monotonic() < stop:
            try:
                ask(a)
                counts["ok"] += 1
            except openai.RateLimitError:
                counts["429"] += 1

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(flood) for _ in range(4)]
        during = []
        while time.monotonic() < stop:
            during.append(timed())
        for f in futures:
            f.result()
    print(f"team-b latency p50 {statistics.median(baseline) * 1000:.0f} ms alone, "
          f"{statistics.median(during) * 1000:.0f} ms during team-a's flood "
          f"({counts['429']} refused, {counts['ok']} admitted); team-b {len(during)}/"
          f"{len(during)} ok")
    assert counts["429"] > 10 and counts["ok"] <= 2
    assert len(during) >= 3


def test_the_openai_client_waits_retry_after_and_then_succeeds(tenants):
    """The client's own retry honours Retry-After: team-a's next request goes through once
    its bucket has refilled, without the caller doing anything."""
    a = client(tenants, "team-a")
    try:  # make sure team-a's bucket is empty
        for _ in range(A_RPM + 1):
            ask(a)
    except openai.RateLimitError:
        pass
    start = time.monotonic()
    reply = ask(client(tenants, "team-a", retries=3))
    waited = time.monotonic() - start
    print(f"team-a with the openai client's retries: answered after {waited:.1f} s")
    assert reply.choices[0].message.content
    assert 1 <= waited <= 3 * 60 / A_RPM


def test_tokens_per_minute_count_streams_too_without_showing_their_usage(tenants):
    c = client(tenants, "team-c")
    start = time.monotonic()
    first = ask(c)
    used = first.usage.total_tokens
    assert used > 0
    # A client that asks for usage sees it, counted the same.
    chunks = list(ask(c, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.total_tokens == used
    admitted = 2
    with pytest.raises(openai.RateLimitError) as refused:
        for _ in range(C_TPM // used + 3):
            chunks = list(ask(c, stream=True))
            # The ingress counted this stream from a usage chunk this client never sees.
            assert all(ch.usage is None and ch.choices for ch in chunks)
            admitted += 1
    refill = (time.monotonic() - start) * C_TPM / 60
    err = refused.value
    assert err.body["type"] == "tokens" and err.body["code"] == "rate_limit_exceeded"
    assert "team-c" in err.body["message"] and "tokens per minute" in err.body["message"]
    # Each request reserves its max_tokens (4) and is charged its usage: refused once the
    # bucket holds less than 4, never before (what refilled meanwhile aside).
    assert admitted * used > C_TPM - 4
    assert (admitted - 1) * used <= C_TPM - 4 + refill
    retry_after = int(err.response.headers["retry-after"])
    assert 1 <= retry_after <= 60 * (used + 4) / C_TPM + 1
    print(f"team-c: {used} tokens per request, {admitted} admitted, then 429 "
          f"(tokens, Retry-After {retry_after} s)")
    # The other tenants and the platform's own key are untouched.
    assert ask(client(tenants, "team-b")).choices[0].message.content
    assert ask(client(tenants, "platform")).choices[0].message.content


def test_unknown_keys_are_still_401_not_429(tenants):
    bad = OpenAI(base_url=tenants["base_url"], api_key="rp-no-such-tenant", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        ask(bad)


def test_no_tenant_key_in_any_log(local_cluster, tenants):
    """Nothing the requests above went through wrote a key: Serve's logs (ingress, proxy,
    controller, replicas), the platform's own logs."""
    roots = [local_cluster.logs_dir, local_cluster.temp_dir / "session_latest" / "logs"]
    needles = {name: key.encode() for name, key in tenants["keys"].items()}
    files = [p for root in roots if root.exists() for p in root.rglob("*") if p.is_file()]
    assert files
    found = [f"{name} in {p}" for p in files for name, key in needles.items()
             if key in p.read_bytes()]
    assert not found, found
