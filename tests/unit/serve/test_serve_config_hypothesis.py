"""Any serve config is either refused in one line naming the field, or renders a Ray Serve
config that Ray itself accepts (``ray.serve.schema.ServeDeploySchema``; for vLLM, each model's
``LLMConfig`` is Ray's own check inside the render). Configs are the two shipped ones (CPU
engine locally, vLLM on EKS) with a few fields changed at random, to plausible values (other
pools, engines, replica bounds, sizes, ingress modes, tenants) or hostile ones (wrong types,
negatives, unknown keys)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raycluster.catalog import load_catalog
from raycluster.spec import SpecError
from serve.builder import to_serve_config
from serve.config import ServeAppConfig

CONFIGS = Path(__file__).resolve().parents[3] / "serve" / "configs"
BASES = [yaml.safe_load((CONFIGS / name).read_text()) for name in ("local.yaml", "eks-vllm.yaml")]
CATALOG = load_catalog()
#: A refusal starts with the path of the field at fault (``models[0].autoscaling: ...``), or
#: is a rule of the whole config naming the field it is about (``api_keys: required ...``).
NAMES_FIELD = re.compile(r"^[a-z_]+[\[.:]")

HOSTILE = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(),
                    st.text(max_size=12), st.lists(st.integers(0, 3), max_size=2),
                    st.dictionaries(st.text(max_size=4), st.integers(0, 3), max_size=2))
POOLS = st.sampled_from([*CATALOG.by_name, "a100", "gpu"])
MODEL_FIELDS = {
    "name": st.one_of(st.sampled_from(["-bad", "x" * 130, ""]),
                      st.from_regex(r"[a-z][a-z0-9._:/-]{0,20}", fullmatch=True)),
    "source": st.sampled_from(["models:/m@champion", "models:/m/3", "models:/m", "runs:/abc/model",
                               "s3://bucket/prefix", "/models/tiny", "http://x/m", " "]),
    "pool": POOLS,
    "engine": st.sampled_from(["cpu", "vllm", "tgi"]),
    "autoscaling": st.fixed_dictionaries({}, optional={
        "min_replicas": st.integers(-1, 5), "max_replicas": st.integers(0, 5),
        "initial_replicas": st.integers(-1, 6), "target_ongoing_requests": st.floats(-1, 64),
        "upscale_delay_s": st.floats(-1, 60), "downscale_delay_s": st.floats(-1, 600)}),
    "max_num_seqs": st.integers(0, 2000), "max_model_len": st.integers(0, 40000),
    "max_queued_requests": st.integers(-2, 100), "stream_interval_ms": st.floats(-1, 2000),
    "cpus": st.floats(-1, 16), "gpu_units": st.integers(0, 9),
    "tensor_parallel_size": st.integers(0, 9), "gpu_memory_utilization": st.floats(-0.5, 1.5),
    "engine_kwargs": st.dictionaries(st.sampled_from(["enforce_eager", "max_num_seqs", "dtype"]),
                                     st.one_of(st.booleans(), st.integers(1, 8)), max_size=2),
}
APP_FIELDS = {
    "name": st.sampled_from(["openai", "app-2", ""]),
    "route_prefix": st.sampled_from(["/", "/v1", "api", "/a/b"]),
    "api_keys": st.fixed_dictionaries({}, optional={"env": st.sampled_from(["KEYS", "1BAD"]),
                                                    "file": st.just("/etc/keys")}),
    "allow_unauthenticated": st.booleans(),
    "mlflow_tracking_uri": st.sampled_from(["http://mlflow:5000", None]),
    "ingress": st.fixed_dictionaries({}, optional={
        "mode": st.sampled_from(["router", "direct", "sidecar"]), "replicas": st.integers(0, 4),
        "cpus": st.floats(-1, 4), "pool": POOLS, "max_ongoing_requests": st.integers(0, 512)}),
    "http": st.fixed_dictionaries({}, optional={
        "host": st.sampled_from(["127.0.0.1", "0.0.0.0"]), "port": st.integers(0, 70000),
        "proxy_location": st.sampled_from(["HeadOnly", "EveryNode", "Disabled", "Nowhere"])}),
}
if "tenants" in ServeAppConfig.model_fields:  # per-tenant limits (issue 14, part tenants)
    APP_FIELDS["tenants"] = st.lists(st.fixed_dictionaries(
        {"name": st.sampled_from(["team-a", "team-b", "default", "Team"]),
         "api_keys": st.fixed_dictionaries({"file": st.sampled_from(["/k/a", "/k/b",
                                                                      "/etc/keys"])})},
        optional={"requests_per_minute": st.integers(0, 100),
                  "tokens_per_minute": st.integers(0, 10**5)}), max_size=2)


@st.composite
def serve_configs(draw) -> dict:
    """A shipped config with one or two fields changed (of the app or of a model)."""
    doc = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 2))):
        where = draw(st.sampled_from(["model", "model", "model", "app", "app", "new model",
                                      "unknown"]))
        if where == "new model":
            doc["models"].append({**copy.deepcopy(doc["models"][0]),
                                  "name": draw(MODEL_FIELDS["name"])})
        elif where == "model":
            model = draw(st.sampled_from(doc["models"]))
            key = draw(st.sampled_from(sorted(MODEL_FIELDS)))
            model[key] = draw(st.one_of(MODEL_FIELDS[key], MODEL_FIELDS[key], MODEL_FIELDS[key],
                                        HOSTILE))
        elif where == "app":
            key = draw(st.sampled_from(sorted(APP_FIELDS)))
            doc[key] = draw(st.one_of(APP_FIELDS[key], APP_FIELDS[key], APP_FIELDS[key],
                                      HOSTILE))
        else:
            doc[draw(st.sampled_from(["replicas", "min_workers", "modles"]))] = draw(HOSTILE)
    return json.loads(json.dumps(doc))


def assert_refused_naming_the_field(err: SpecError) -> None:
    message = str(err)
    assert "\n" not in message, f"not one line: {message!r}"
    assert NAMES_FIELD.match(message), f"names no field: {message!r}"


@pytest.fixture(scope="module")
def deploy_schema():
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=serve_configs())
def test_a_serve_config_is_refused_naming_the_field_or_renders_what_ray_accepts(
        doc, deploy_schema):
    try:
        config = ServeAppConfig.parse(doc)
        rendered = to_serve_config(config, CATALOG)
    except SpecError as err:
        assert_refused_naming_the_field(err)
        return
    deploy_schema.model_validate(rendered)
    app, = rendered["applications"]
    assert app["name"] == config.name and app["route_prefix"] == config.route_prefix
    if config.engine.value == "cpu":
        # Ray would also take a deployment the app does not define; the names must match.
        names = {d["name"] for d in app["deployments"]}
        assert {m.deployment_name for m in config.models} <= names
