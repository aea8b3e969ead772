"""Per-tenant rate limits (serve/limits.py): the token buckets' arithmetic, Retry-After, the
429 body, tokens reserved and settled, tenants kept apart, and the serve config's tenants
refused with the field named."""

from __future__ import annotations

import copy
import json

import pytest

from raycluster.spec import SpecError
from serve.config import ServeAppConfig
from serve.limits import Limiter, Limits, Refusal, Ticket, UsageTap, reservation, usage_tokens
from serve.protocol import ChatCompletionRequest, CompletionRequest, sse


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture()
def clock() -> Clock:
    return Clock()


def limiter(clock, tenants=None, default=None, replicas=1) -> Limiter:
    return Limiter(tenants or {}, default, replicas=replicas, clock=clock)


def admit_all(lim: Limiter, principal: str, n: int, tenant: str | None = None,
              reserve: int | None = 0) -> list[Ticket | Refusal]:
    return [lim.acquire(principal, tenant, reserve) for _ in range(n)]


def test_requests_bucket_bursts_its_minute_then_refills_at_the_rate(clock):
    lim = limiter(clock, {"a": Limits(requests_per_minute=6)})
    got = admit_all(lim, "a", 7, "a")
    assert all(isinstance(g, Ticket) for g in got[:6])
    refused = got[6]
    assert isinstance(refused, Refusal) and refused.kind == "requests"
    # 6 per minute refill one every 10 s: the 7th may come 10 s after the burst.
    assert refused.retry_after_s == pytest.approx(10.0) and refused.retry_after == 10
    clock.t += 9.9
    assert isinstance(lim.acquire("a", "a"), Refusal)
    clock.t += 0.1
    assert isinstance(lim.acquire("a", "a"), Ticket)
    assert isinstance(lim.acquire("a", "a"), Refusal)
    # Idle for a minute: the whole burst again, never more.
    clock.t += 600
    assert sum(isinstance(g, Ticket) for g in admit_all(lim, "a", 10, "a")) == 6


def test_retry_after_is_whole_seconds_rounded_up_and_never_zero(clock):
    lim = limiter(clock, {"a": Limits(requests_per_minute=7)})
    admit_all(lim, "a", 7, "a")
    refused = lim.acquire("a", "a")
    assert refused.retry_after_s == pytest.approx(60 / 7)
    assert refused.retry_after == 9  # 8.57 s -> 9
    clock.t += 60 / 7 - 0.01
    assert lim.acquire("a", "a").retry_after == 1  # 0.01 s left -> 1, not 0


def test_limits_are_shared_by_the_ingress_replicas(clock):
    lim = limiter(clock, {"a": Limits(requests_per_minute=60, tokens_per_minute=600)},
                  replicas=3)
    got = admit_all(lim, "a", 21, "a")
    assert sum(isinstance(g, Ticket) for g in got) == 20  # 60 / 3 in this replica
    refused = got[-1]
    assert refused.retry_after_s == pytest.approx(3.0)  # 20 per minute here
    assert refused.limit == 60 and refused.share == 20
    assert "limit 60 (20 per ingress replica)" in refused.message()
    assert lim.remaining("a", "a")["tokens"] == pytest.approx(200)  # 600 / 3, none reserved


def test_a_request_limit_below_the_replica_count_still_admits(clock):
    lim = limiter(clock, {"a": Limits(requests_per_minute=2)}, replicas=3)
    assert isinstance(lim.acquire("a", "a"), Ticket)
    refused = lim.acquire("a", "a")
    assert refused.retry_after == 90  # 2/3 request per minute in this replica


def test_tokens_are_reserved_up_front_and_settled_with_the_usage(clock):
    lim = limiter(clock, {"a": Limits(tokens_per_minute=100)})
    t1, t2 = lim.acquire("a", "a", 40), lim.acquire("a", "a", 40)
    assert t1.reserved == t2.reserved == 40
    assert lim.remaining("a", "a")["tokens"] == pytest.approx(20)
    refused = lim.acquire("a", "a", 40)
    assert refused.kind == "tokens"
    assert refused.retry_after_s == pytest.approx(20 / (100 / 60))  # 12 s for 20 tokens
    lim.settle(t1, 10)  # used 10 of 40: 30 back
    assert lim.remaining("a", "a")["tokens"] == pytest.approx(50)
    lim.settle(t1, 10)  # once per ticket
    assert lim.remaining("a", "a")["tokens"] == pytest.approx(50)
    lim.settle(t2, None)  # unknown (a stream cut short): the reservation stands
    assert lim.remaining("a", "a")["tokens"] == pytest.approx(50)
    assert isinstance(lim.acquire("a", "a", 40), Ticket)


def test_tokens_counted_after_the_fact_become_a_debt_repaid_over_time(clock):
    lim = limiter(clock, {"a": Limits(tokens_per_minute=120)})
    ticket = lim.acquire("a", "a", 0)  # no max_tokens: nothing reserved
    lim.settle(ticket, 300)  # the response's usage
    assert lim.remaining("a", "a")["tokens"] == pytest.approx(-180)
    refused = lim.acquire("a", "a", 0)
    assert refused.kind == "tokens"
    assert refused.retry_after_s == pytest.approx(181 / 2)  # back to 1 token at 2 per s
    clock.t += 91
    assert isinstance(lim.acquire("a", "a", 0), Ticket)


def test_a_reservation_larger_than_the_limit_waits_for_a_full_bucket(clock):
    lim = limiter(clock, {"a": Limits(tokens_per_minute=100)})
    assert isinstance(lim.acquire("a", "a", 500), Ticket)  # full bucket: admitted
    refused = lim.acquire("a", "a", 500)
    assert refused.retry_after_s == pytest.approx(500 / (100 / 60))  # debt 400, then full


def test_a_refusal_takes_nothing_and_requests_without_tokens_skip_the_token_limit(clock):
    lim = limiter(clock, {"a": Limits(requests_per_minute=10, tokens_per_minute=10)})
    assert isinstance(lim.acquire("a", "a", 10), Ticket)
    assert lim.acquire("a", "a", 10).kind == "tokens"
    assert lim.remaining("a", "a")["requests"] == pytest.approx(9)  # not charged
    # GET /v1/models generates nothing: counted as a request only.
    assert isinstance(lim.acquire("a", "a", None), Ticket)
    assert lim.remaining("a", "a")["requests"] == pytest.approx(8)


def test_one_tenant_over_its_limit_leaves_the_others_alone(clock):
    lim = limiter(clock, {"a": Limits(requests_per_minute=2), "b": Limits(requests_per_minute=2)},
                  default=Limits(requests_per_minute=1))
    assert [isinstance(g, Ticket) for g in admit_all(lim, "a", 5, "a")] == \
        [True, True, False, False, False]
    assert all(isinstance(g, Ticket) for g in admit_all(lim, "b", 2, "b"))
    # Keys without a tenant: the default limits, one budget per key.
    assert isinstance(lim.acquire("key-1111aaaa"), Ticket)
    assert isinstance(lim.acquire("key-1111aaaa"), Refusal)
    assert isinstance(lim.acquire("key-2222bbbb"), Ticket)


def test_unlimited_principals_are_never_refused(clock):
    lim = limiter(clock, {"a": Limits(requests_per_minute=1)})
    assert all(isinstance(g, Ticket) for g in admit_all(lim, "key-0000cafe", 500))
    assert Limiter.from_args({"tenants": [{"name": "a"}], "default": {}}) is None


def test_the_429_body_is_openais_shape_and_names_no_key(clock):
    lim = limiter(clock, default=Limits(tokens_per_minute=60))
    lim.settle(lim.acquire("key-1a2b3c4d", None, 0), 90)
    refused = lim.acquire("key-1a2b3c4d", None, 0)
    body = refused.body()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "tokens" and body["error"]["code"] == "rate_limit_exceeded"
    assert body["error"]["message"] == ("Rate limit reached for key-1a2b3c4d on tokens per "
                                        "minute (TPM): limit 60. Please try again in 31s.")
    assert refused.headers() == {"Retry-After": "31", "x-ratelimit-limit-tokens": "60",
                                 "x-ratelimit-reset-tokens": "31s"}


def test_reservation_is_max_tokens_times_choices():
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert reservation(ChatCompletionRequest.model_validate(chat)) == 0
    assert reservation(ChatCompletionRequest.model_validate({**chat, "max_tokens": 7,
                                                             "n": 3})) == 21
    assert reservation(ChatCompletionRequest.model_validate(
        {**chat, "max_completion_tokens": 5})) == 5
    # Text completions: OpenAI's default max_tokens 16, per choice and per prompt.
    assert reservation(CompletionRequest.model_validate({"model": "m", "prompt": "a"})) == 16
    assert reservation(CompletionRequest.model_validate(
        {"model": "m", "prompt": ["a", "b"], "max_tokens": 4, "n": 2})) == 16
    assert usage_tokens({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}) == 7
    assert usage_tokens({"prompt_tokens": 3, "completion_tokens": 4}) == 7
    assert usage_tokens(None) is None


def _stream() -> list[str]:
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    return [sse({**base, "choices": [{"index": 0, "delta": {"content": 'say "usage":null}'},
                                      "finish_reason": None}], "usage": None}),
            sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                 "usage": None}),
            sse({**base, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2,
                                                  "total_tokens": 7}}),
            "data: [DONE]\n\n"]


def test_usage_tap_reads_the_usage_and_hides_what_the_client_did_not_ask_for():
    lines = _stream()
    hidden = UsageTap(hide=True)
    out = [hidden.see(line) for line in lines]
    assert hidden.used == 7
    events = [json.loads(x[6:]) for x in out if x.startswith("data: {")]
    assert len(events) == 2 and all("usage" not in e for e in events)
    assert events[0]["choices"][0]["delta"]["content"] == 'say "usage":null}'
    assert out[-1] == "data: [DONE]\n\n" and out[2] == ""
    shown = UsageTap(hide=False)
    assert [shown.see(line) for line in lines] == lines and shown.used == 7
    joined = UsageTap(hide=True)  # several events in one piece
    assert joined.see("".join(lines)) == "".join(x for x in out if x)


@pytest.fixture()
def doc() -> dict:
    return {"models": [{"name": "chat", "source": "/models/chat", "pool": "cpu"}],
            "api_keys": {"file": "/etc/rayplane/api-keys"},
            "tenants": [{"name": "research", "api_keys": {"file": "/etc/rayplane/research/keys"},
                         "requests_per_minute": 60, "tokens_per_minute": 20000},
                        {"name": "prod", "api_keys": {"env": "RAYPLANE_PROD_KEYS"},
                         "requests_per_minute": 600}],
            "default_limits": {"requests_per_minute": 30}}


def test_limits_args_carry_the_tenants_by_reference_and_the_replica_count(doc):
    doc["ingress"] = {"replicas": 2}
    args = ServeAppConfig.parse(doc).limits_args()
    assert args["replicas"] == 2
    assert args["tenants"][1] == {"name": "prod", "api_keys": {"env": "RAYPLANE_PROD_KEYS",
                                                               "file": None},
                                  "requests_per_minute": 600, "tokens_per_minute": None}
    lim = Limiter.from_args(args)
    assert lim.limits_of("research") == Limits(60, 20000)
    assert lim.limits_of(None) == Limits(30, None)
    assert ServeAppConfig.parse({k: v for k, v in doc.items()
                                 if k not in ("tenants", "default_limits")}).limits_args() is None
    direct = {**doc, "ingress": {"mode": "direct"}}
    direct["models"] = [{**doc["models"][0], "autoscaling": {"min_replicas": 3,
                                                             "max_replicas": 3}}]
    assert ServeAppConfig.parse(direct).limits_args()["replicas"] == 3


def test_the_rendered_serve_config_hands_the_limits_to_the_ingress(doc):
    from ray.serve.schema import ServeDeploySchema

    from raycluster.catalog import load_catalog
    from serve.app import build_app
    from serve.builder import to_serve_config

    rendered = to_serve_config(ServeAppConfig.parse(doc), load_catalog())
    ServeDeploySchema.model_validate(rendered)
    (app,) = rendered["applications"]
    assert app["args"]["limits"] == ServeAppConfig.parse(doc).limits_args()
    assert "rp-" not in json.dumps(app)  # keys by reference only
    ingress = build_app(app["args"])._bound_deployment
    assert ingress.name == "OpenAIIngress"
    assert ingress._replica_config.init_kwargs["limits"] == app["args"]["limits"]


@pytest.mark.parametrize("change, expected", [
    (lambda d: d["tenants"][0].update(requests_per_minute=0),
     "tenants[0].requests_per_minute: 0: Input should be greater than or equal to 1"),
    (lambda d: d["tenants"][1].update(tokens_per_minute="lots"),
     "tenants[1].tokens_per_minute: 'lots'"),
    (lambda d: d["tenants"][0].update(request_per_minute=5),
     "tenants[0].request_per_minute: unknown field (did you mean 'requests_per_minute'?)"),
    (lambda d: d["tenants"][0].pop("api_keys"), "tenants[0].api_keys: field required"),
    (lambda d: d["tenants"][0].update(api_keys={}),
     "tenants[0].api_keys: name an env variable or a file"),
    (lambda d: d["tenants"][0].update(key="rp-123"), "tenants[0].key: unknown field"),
    (lambda d: d["tenants"][1].update(name="research"),
     "tenants[1].name: 'research' is also tenants[0]"),
    (lambda d: d["tenants"][1].update(name="Prod Team"), "tenants[1].name: 'Prod Team'"),
    (lambda d: d["tenants"][1].update(name="default"), "tenants[1].name: 'default'"),
    (lambda d: d["tenants"][1]["api_keys"].update(file="/etc/rayplane/research/keys"),
     "tenants[1].api_keys.file: '/etc/rayplane/research/keys' is also "
     "tenants[0].api_keys.file"),
    (lambda d: d["tenants"][0].update(api_keys={"file": "/etc/rayplane/api-keys"}),
     "tenants[0].api_keys.file: '/etc/rayplane/api-keys' is also api_keys.file"),
    (lambda d: d["default_limits"].update(tokens_per_minute=-5),
     "default_limits.tokens_per_minute: -5"),
    (lambda d: d.pop("api_keys"), "default_limits: they apply to the keys of api_keys"),
    (lambda d: (d.pop("api_keys"), d.update(allow_unauthenticated=True)),
     "allow_unauthenticated: true contradicts tenants"),
    (lambda d: (d.update(ingress={"mode": "direct"}),
                d["models"][0].update(autoscaling={"min_replicas": 1, "max_replicas": 3})),
     "tenants: with ingress.mode 'direct' every model replica enforces an equal share"),
])
def test_bad_tenants_are_refused_in_one_line_naming_the_field(doc, change, expected):
    bad = copy.deepcopy(doc)
    change(bad)
    with pytest.raises(SpecError) as err:
        ServeAppConfig.parse(bad)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_the_vllm_app_gets_the_tenants_too(doc):
    from raycluster.catalog import load_catalog
    from serve.builder import to_serve_config

    doc["models"][0].update(engine="vllm", pool="a100-mig")
    (app,) = to_serve_config(ServeAppConfig.parse(doc), load_catalog())["applications"]
    assert app["import_path"] == "serve.engines.vllm:build_app"
    assert app["args"]["limits"] == ServeAppConfig.parse(doc).limits_args()


def test_tenants_alone_are_enough_keys(doc):
    doc.pop("api_keys")
    doc.pop("default_limits")
    cfg = ServeAppConfig.parse(doc)
    assert cfg.api_keys is None and [t.name for t in cfg.tenants] == ["research", "prod"]
