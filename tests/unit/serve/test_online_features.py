"""A served model's ``online_features``, in-process: the serve config's checks against the
project's feature repository, and the real ``OpenAIIngress`` (direct mode, the real CPU engine
and tiny model inside it) attaching the features a real Feast store holds (SQLite online
store over the repository, tests/support/online_store.py) to chat requests keyed by their
``metadata``; the online store down or hanging; and the vLLM path's ASGI middleware."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient
from ray import serve

from raycluster.spec import SpecError
from serve import ingress
from serve.builder import app_args
from serve.config import ServeAppConfig
from serve.online_features import HEADER, OnlineFeatureError, OnlineFeatures, app_specs
from tests.support import online_store as ost
from tests.support import tiny_model as tm

FEATURES = ["pool_load:pending_units", "pool_load:free_units", "pool_load:mean_wait_1h_s"]
BODY = {"model": "tiny", "messages": tm.GREETING, "temperature": 0, "max_tokens": 2}


def config(tiny_model, **online) -> ServeAppConfig:
    spec = {"features": FEATURES, "entity": {"join_key": "pool", "from_metadata": "pool"},
            **online}
    return ServeAppConfig.parse({
        "allow_unauthenticated": True, "ingress": {"mode": "direct"},
        "models": [{"name": "tiny", "source": str(tiny_model), "online_features": spec}]})


@pytest.fixture(scope="module")
def store_yaml(tmp_path_factory):
    return ost.sqlite_store(tmp_path_factory.mktemp("feature-store"))


# -- the serve config -------------------------------------------------------------------------


@pytest.mark.parametrize("features, entity, field, says", [
    (["pool_lod:pending_units"], "pool", "models[0].online_features.features[0]",
     "unknown feature view 'pool_lod' (did you mean 'pool_load'?); views: job_outcome, "
     "job_request, pool_load"),
    (["pool_load:pending_units", "pool_load:pending"], "pool",
     "models[0].online_features.features[1]",
     "view 'pool_load' has no feature 'pending' (did you mean 'pending_units'?)"),
    (["pool_load"], "pool", "models[0].online_features.features[0]",
     "'pool_load' is not 'view:feature'"),
    (["job_request:model_size_b"], "pool", "models[0].online_features.features[0]",
     "view 'job_request' is keyed by job_id, not entity.join_key 'pool'"),
    (FEATURES[:1] * 2, "pool", "models[0].online_features.features[1]", "is listed twice"),
])
def test_a_feature_the_repository_lacks_is_one_line_naming_the_field(
        tiny_model, features, entity, field, says):
    with pytest.raises(SpecError) as err:
        ServeAppConfig.parse({"allow_unauthenticated": True, "models": [{
            "name": "tiny", "source": str(tiny_model),
            "online_features": {"features": features, "entity": {"join_key": entity}}}]})
    assert str(err.value).startswith(f"{field}: ")
    assert says in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_keys_and_ranges_are_refused_by_name(tiny_model):
    with pytest.raises(SpecError, match=r"online_features.entity.from_meta: unknown field "
                                        r"\(did you mean 'from_metadata'\?\)"):
        ServeAppConfig.parse({"allow_unauthenticated": True, "models": [{
            "name": "tiny", "source": str(tiny_model), "online_features": {
                "features": FEATURES, "entity": {"join_key": "pool", "from_meta": "pool"}}}]})
    with pytest.raises(SpecError, match=r"online_features.timeout_ms: .*greater than or "
                                        r"equal to 10"):
        config(tiny_model, timeout_ms=1)


def test_the_app_args_carry_the_spec_and_the_join_keys_type(tiny_model):
    cfg = config(tiny_model, timeout_ms=250)
    (spec,) = app_args(cfg)["online_features"].values()
    assert spec == {"features": FEATURES, "entity": {"join_key": "pool", "from_metadata": "pool"},
                    "required": False, "timeout_ms": 250, "store": None, "key_type": "String"}
    plain = ServeAppConfig.parse({"allow_unauthenticated": True, "models": [
        {"name": "tiny", "source": str(tiny_model)}]})
    assert "online_features" not in app_args(plain)


# -- the ingress ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(tiny_model, store_yaml):
    cfg = config(tiny_model, store=str(store_yaml), timeout_ms=5000)
    args = app_args(cfg)
    (model,) = args["models"]
    cls = ingress.OpenAIIngress.func_or_class.__mro__[1]  # the class under @serve.ingress
    instance = cls.__new__(cls)
    cls.__init__(instance, None, None, in_replica=model,
                 online_features=args["online_features"])

    class Context:
        servable_object = instance

    mp = pytest.MonkeyPatch()
    mp.setattr(serve, "get_replica_context", lambda: Context)
    yield TestClient(ingress.api), instance
    mp.undo()


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def chat(client, **body):
    return client.post("/v1/chat/completions", json={**BODY, **body})


def test_metadata_attaches_the_pools_online_values_as_a_system_message(app, tokenizer):
    client, _ = app
    plain = chat(client)
    attached = chat(client, metadata={"pool": "h100-timeslice"})
    assert plain.status_code == attached.status_code == 200
    assert attached.headers[HEADER] == ",".join(FEATURES)
    assert plain.headers[HEADER] == "none; metadata.pool missing"
    # The prompt grew by exactly the system message holding the store's values, inserted
    # after the request's own system message.
    text = ("Online features of pool h100-timeslice (the platform's feature store, read now): "
            "pool_load:pending_units=4, pool_load:free_units=2, "
            "pool_load:mean_wait_1h_s=312.5.")
    messages = [tm.GREETING[0], {"role": "system", "content": text}, *tm.GREETING[1:]]
    expected = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=True, return_dict=False))
    assert attached.json()["usage"]["prompt_tokens"] == expected
    assert expected > plain.json()["usage"]["prompt_tokens"]


def test_streams_get_the_header_too(app):
    client, _ = app
    with client.stream("POST", "/v1/chat/completions",
                       json={**BODY, "stream": True, "metadata": {"pool": "a100-mig"}}) as r:
        assert r.status_code == 200
        assert r.headers[HEADER] == ",".join(FEATURES)
        assert "data: [DONE]" in "".join(r.iter_text())


def test_an_entity_without_values_is_served_without_features(app):
    client, _ = app
    r = chat(client, metadata={"pool": "cpu"})
    assert r.status_code == 200
    assert r.headers[HEADER] == "none; no online values for pool 'cpu'"


@pytest.mark.parametrize("metadata, param, says", [
    ({"pool": 5}, "metadata.pool", "metadata.pool: must be a string (OpenAI metadata values "
                                    "are strings), not int"),
    ("h100-timeslice", "metadata", "metadata: must be an object of string values, not str"),
    # features.online's own check: a pool the catalog lacks is no entity at all.
    ({"pool": "h100-timeslize"}, "metadata.pool", "metadata.pool: pool 'h100-timeslize' is "
                                                  "not in the catalog (did you mean "
                                                  "'h100-timeslice'?); pools: "),
])
def test_a_wrongly_typed_entity_is_a_400_naming_the_field(app, metadata, param, says):
    client, _ = app
    r = chat(client, metadata=metadata)
    assert r.status_code == 400
    error = r.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param,
                                                              None)
    assert error["message"].startswith(says)


def test_required_entity_missing_is_a_400(app, tiny_model, store_yaml):
    client, instance = app
    keep = instance.online["tiny"]
    (spec,) = app_specs(config(tiny_model, store=str(store_yaml), required=True).models
                        ).values()
    instance.online["tiny"] = OnlineFeatures(spec)
    try:
        r = chat(client)
    finally:
        instance.online["tiny"] = keep
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "metadata.pool"
    assert "required" in r.json()["error"]["message"]


def test_online_store_down_is_a_503_naming_it_and_never_a_hang(app, tiny_model, store_yaml,
                                                               monkeypatch):
    client, instance = app
    monkeypatch.setenv(ost.PASSWORD_ENV, "not-a-secret")  # pragma: allowlist secret
    keep = instance.online["tiny"]
    down = ost.postgres_store(store_yaml.parent, ost.closed_port(), "down")
    listener = ost.silent_listener()
    hung = ost.postgres_store(store_yaml.parent, listener.getsockname()[1], "hung")
    try:
        for path, timeout_ms, says in ((down, 5000, "is unavailable: OperationalError"),
                                       (hung, 300, "did not answer within 300 ms")):
            (spec,) = app_specs(config(tiny_model, store=str(path), timeout_ms=timeout_ms
                                       ).models).values()
            instance.online["tiny"] = OnlineFeatures(spec)
            started = time.monotonic()
            r = chat(client, metadata={"pool": "h100-timeslice"})
            took = time.monotonic() - started
            assert r.status_code == 503, r.text
            error = r.json()["error"]
            assert error["message"].startswith(f"online store of {path} ")
            assert says in error["message"]
            assert (error["type"], error["code"]) == ("service_unavailable",
                                                      "online_store_unavailable")
            assert r.headers["retry-after"] == "1"
            assert took < timeout_ms / 1000 + 2
            # Again: a refused connection is refused at once, a hung store costs each request
            # its timeout, not more (its stuck reads hold the model's few read threads only).
            for _ in range(2):
                started = time.monotonic()
                assert chat(client, metadata={"pool": "h100-timeslice"}).status_code == 503
                assert time.monotonic() - started < 2.0
    finally:
        instance.online["tiny"] = keep
        listener.close()


def test_a_store_that_cannot_be_opened_is_a_503_not_the_requests_fault(store_yaml,
                                                                        monkeypatch):
    """A config error of the store (here its password variable is not set) is the service's
    problem, never a 400 on the request's metadata."""
    import asyncio

    monkeypatch.delenv(ost.PASSWORD_ENV, raising=False)
    monkeypatch.delenv("RAYPLANE_POSTGRES_DSN_FILE", raising=False)
    path = ost.postgres_store(store_yaml.parent, ost.closed_port(), "no-password")
    online = OnlineFeatures({"features": FEATURES, "entity": {"join_key": "pool"},
                             "store": str(path), "timeout_ms": 5000})
    with pytest.raises(OnlineFeatureError) as err:
        asyncio.run(online.lookup({"pool": "h100-timeslice"}))
    assert (err.value.status, err.value.code) == (503, "online_store_unavailable")
    assert f"online store of {path} is unavailable: SpecError: " in err.value.message
    assert "needs the environment variable RAYPLANE_FEAST_DB_PASSWORD" in err.value.message


def test_an_int64_join_key_is_parsed_from_the_metadata_string(store_yaml):
    spec = {"features": ["job_request:model_size_b"], "store": str(store_yaml),
            "entity": {"join_key": "job_id"}, "key_type": "Int64"}
    online = OnlineFeatures(spec)
    assert online.entity_value({"job_id": "42"}) == 42
    with pytest.raises(OnlineFeatureError) as err:
        online.entity_value({"job_id": "j-42"})
    assert (err.value.status, err.value.param) == (400, "metadata.job_id")
    assert "'j-42' is not an integer (the join key job_id is Int64)" in err.value.message


# -- the vLLM path: ASGI middleware in front of Ray's ingress ---------------------------------


def test_the_middleware_rewrites_the_body_the_ingress_reads(tiny_model, store_yaml):
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from serve.features_middleware import OnlineFeaturesMiddleware

    async def echo(request: Request) -> JSONResponse:  # what Ray's ingress would read
        return JSONResponse({"body": await request.json(),
                             "length": request.headers.get("content-length")})

    inner = Starlette(routes=[Route("/v1/chat/completions", echo, methods=["POST"])])
    specs = app_specs(config(tiny_model, store=str(store_yaml)).models)
    client = TestClient(OnlineFeaturesMiddleware(inner, online_features=specs))

    r = client.post("/v1/chat/completions", json={**BODY, "metadata": {"pool": "a100-mig"}})
    assert r.headers[HEADER] == ",".join(FEATURES)
    roles = [m["role"] for m in r.json()["body"]["messages"]]
    assert roles == ["system", "system", "user"]
    assert "pool_load:free_units=15" in r.json()["body"]["messages"][1]["content"]
    # The ingress is told the rewritten body's length, not the client's.
    assert int(r.json()["length"]) == len(json.dumps(r.json()["body"]).encode())
    other = client.post("/v1/chat/completions", json={**BODY, "model": "other"})
    assert HEADER not in other.headers
    assert other.json()["body"]["messages"] == tm.GREETING
    bad = client.post("/v1/chat/completions", json={**BODY, "metadata": {"pool": 1}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "metadata.pool"

