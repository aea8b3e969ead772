"""The serve config: what it renders for Ray Serve (checked against Ray's own schema) and every
bad config refused with the field named, before anything is deployed."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from raycluster.catalog import load_catalog
from raycluster.spec import SpecError
from serve.builder import to_serve_config
from serve.config import ServeAppConfig
from serve.engines.vllm_config import derived_gpu_memory_utilization

CONFIGS = Path(__file__).resolve().parents[3] / "serve" / "configs"
RAYPLANE = [sys.executable, "-c", "from raycluster.cli import main; main()"]


@pytest.fixture()
def doc() -> dict:
    return {
        "name": "openai",
        "models": [{"name": "chat", "source": "models:/chat@champion", "pool": "a100-mig",
                    "autoscaling": {"min_replicas": 0, "max_replicas": 3}}],
        "api_keys": {"file": "/etc/rayplane/api-keys"},
    }


def refused(doc: dict) -> str:
    with pytest.raises(SpecError) as err:
        to_serve_config(ServeAppConfig.parse(doc), load_catalog())
    return str(err.value)


def app_of(doc: dict) -> dict:
    rendered = to_serve_config(ServeAppConfig.parse(doc), load_catalog())
    ServeDeploySchema.model_validate(rendered)  # what `serve deploy` and KubeRay accept
    (app,) = rendered["applications"]
    return app


def test_shipped_configs_render_to_valid_serve_configs():
    for path in sorted(CONFIGS.glob("*.yaml")):
        rendered = to_serve_config(ServeAppConfig.from_file(path), load_catalog())
        ServeDeploySchema.model_validate(rendered)
        assert rendered["applications"][0]["import_path"].startswith("serve.")


def test_cpu_engine_on_a_gpu_pool_takes_a_pool_unit_and_no_ray_cpus(doc):
    app = app_of(doc)
    assert app["import_path"] == "serve.app:build_app"
    deployments = {d["name"]: d for d in app["deployments"]}
    model = deployments["model-chat"]
    # Locally GPU-pool nodes advertise the pool with num-cpus 0: asking for CPUs would
    # never schedule; the pool resource places the replica on that pool, as on EKS.
    assert model["ray_actor_options"] == {"num_cpus": 0, "resources": {"pool:a100-mig": 1.0}}
    assert model["autoscaling_config"]["min_replicas"] == 0  # scale to zero (development)
    assert model["autoscaling_config"]["initial_replicas"] == 1
    assert model["autoscaling_config"]["max_replicas"] == 3
    ingress = deployments["OpenAIIngress"]
    assert ingress["ray_actor_options"]["resources"] == {"pool:cpu": 0.1}
    # Keys are referenced, never inlined.
    assert app["args"]["api_keys"] == {"env": None, "file": "/etc/rayplane/api-keys"}
    assert "rp-" not in json.dumps(app)


def test_direct_ingress_is_one_deployment_on_the_model_pool(doc):
    doc["ingress"] = {"mode": "direct"}
    app = app_of(doc)
    (model,) = app["deployments"]  # no router deployment, no hop
    assert model["name"] == "model-chat"
    assert model["ray_actor_options"] == {"num_cpus": 0, "resources": {"pool:a100-mig": 1.0}}
    assert model["autoscaling_config"]["max_replicas"] == 3
    assert app["args"]["ingress_mode"] == "direct"
    from serve.app import build_app

    built = build_app(app["args"])  # the builder accepts what the config renders
    assert built._bound_deployment.name == "model-chat"


@pytest.mark.parametrize("engine", ["cpu", "vllm"])
def test_every_serving_app_runs_with_the_serve_settings_that_won(doc, engine):
    """Issue 16: the measured Serve settings reach the replicas through the app's runtime_env
    (the same document locally and in the RayService's serveConfigV2), beside the tracking
    server's address."""
    from serve.builder import SERVE_REPLICA_ENV

    doc["models"][0]["engine"] = engine
    doc["mlflow_tracking_uri"] = "http://mlflow:5000"
    env = app_of(doc)["runtime_env"]["env_vars"]
    assert env == {**SERVE_REPLICA_ENV, "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    assert env["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"


def test_cpu_engine_on_the_cpu_pool_takes_cores(doc):
    doc["models"][0].update(pool="cpu", cpus=2)
    model = next(d for d in app_of(doc)["deployments"] if d["name"] == "model-chat")
    assert model["ray_actor_options"] == {"num_cpus": 2.0, "resources": {"pool:cpu": 2.0}}
    assert app_of(doc)["args"]["models"][0]["threads"] == 2


def test_vllm_app_uses_ray_serve_llm_with_pool_knowledge(doc):
    doc["models"][0]["engine"] = "vllm"
    app = app_of(doc)
    assert app["import_path"] == "serve.engines.vllm:build_app"
    (llm,) = app["args"]["llm_configs"]
    assert llm["accelerator_type"] == "A100-80G"
    assert llm["engine_kwargs"]["gpu_memory_utilization"] == 0.9  # a MIG instance is its own
    assert llm["placement_group_config"]["bundles"] == [{"GPU": 1, "pool:a100-mig": 1,
                                                         "CPU": 1.0}]
    assert llm["deployment_config"]["autoscaling_config"]["min_replicas"] == 0


@pytest.mark.parametrize("change, expected", [
    (lambda d: d["models"][0].update(pool="a100-big"),
     "models[0].pool: 'a100-big' is not a pool"),
    (lambda d: d["models"][0].update(engin="cpu"),
     "models[0].engin: unknown field (did you mean 'engine'?)"),
    (lambda d: d["models"][0].update(engine="tgi"), "models[0].engine:"),
    (lambda d: d["models"][0]["autoscaling"].update(min_replicas=4),
     "min_replicas (4) is greater than max_replicas (3)"),
    (lambda d: d.pop("api_keys"), "api_keys: required"),
    (lambda d: d.update(api_keys={}), "api_keys: name an env variable or a file"),
    (lambda d: d["models"].append(dict(d["models"][0])), "models[1].name: 'chat' is also"),
    (lambda d: d["models"][0].update(engine="openai-upstream"),
     "models[0].upstream: required with engine 'openai-upstream'"),
    (lambda d: d["models"][0].update(engine="openai-upstream", upstream={"model": "x"}),
     "models[0].upstream.base_url: required with server 'external'"),
    (lambda d: d["models"][0].update(engine="openai-upstream",
                                     upstream={"base_url": "ftp://h/v1"}),
     "models[0].upstream.base_url: 'ftp://h/v1': must be an http(s) URL"),
    (lambda d: d["models"][0].update(engine="openai-upstream",
                                     upstream={"server": "tgi", "base_url": "http://h/v1"}),
     "base_url: rayplane renders TGI and knows its Service"),
    (lambda d: d["models"][0].update(upstream={"base_url": "http://h/v1"}),
     "models[0].upstream: is for engine 'openai-upstream' and this model's engine is 'cpu'"),
    (lambda d: d["models"][0].update(engine="triton", triton={"server": "external"}),
     "models[0].triton.url: required with server 'external'"),
    (lambda d: d["models"][0].update(engine="triton",
                                     triton={"server": "external", "url": "grpc://h:8001"}),
     "url: 'grpc://h:8001' is not host:port"),
    (lambda d: d["models"][0].update(engine="triton", triton={"url": "h:8001"}),
     "url: only for server 'external'"),
    (lambda d: d["models"][0].update(engine="triton", gpu_units=2),
     "models[0].gpu_units: is a vllm setting and this model's engine is 'triton'"),
    (lambda d: (d.update(ingress={"mode": "direct"}), d["models"][0].update(engine="triton")),
     "ingress.mode: 'direct' is for the cpu engine and this model's engine is 'triton'"),
    (lambda d: d["models"][0].update(source="hf://gpt2"), "unsupported scheme"),
    (lambda d: d["models"][0].update(source="models:/chat"), "not a registry reference"),
    (lambda d: d["models"][0].update(engine_kwargs={"max_num_seqs": 4}),
     "set it as the model's own field"),
    (lambda d: d.update(ingress={"pool": "gpu"}), "ingress.pool: 'gpu' is not a pool"),
    (lambda d: d.update(ingress={"mode": "inline"}),
     "ingress.mode: 'inline': must be one of 'router' or 'direct'"),
    (lambda d: (d.update(ingress={"mode": "direct"}),
                d["models"].append({**d["models"][0], "name": "b"})),
     "ingress.mode: 'direct' serves one model and this config has 2; use 'router'"),
    (lambda d: (d.update(ingress={"mode": "direct"}), d["models"][0].update(engine="vllm")),
     "ingress.mode: 'direct' is for the cpu engine"),
    # vLLM's settings on a CPU-engine model (the default engine) are refused by name.
    (lambda d: d["models"][0].update(gpu_units=2),
     "models[0].gpu_units: is a vllm setting and this model's engine is 'cpu'"),
    (lambda d: d["models"][0].update(gpu_memory_utilization=0.5),
     "models[0].gpu_memory_utilization: is a vllm setting"),
    (lambda d: d["models"][0].update(engine_kwargs={"enforce_eager": True}),
     "models[0].engine_kwargs: is a vllm setting"),
])
def test_bad_configs_are_refused_naming_the_field(doc, change, expected):
    bad = copy.deepcopy(doc)
    change(bad)
    message = refused(bad)
    assert expected in message
    assert "\n" not in message


def test_cli_dry_run_prints_the_serve_config_and_errors_exit_2(tmp_path, doc):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    out = subprocess.run([*RAYPLANE, "serve", "up", str(cfg), "--dry-run"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    ServeDeploySchema.model_validate(json.loads(out.stdout))
    doc["models"][0]["pool"] = "a100-mgi"
    cfg.write_text(yaml.safe_dump(doc))
    out = subprocess.run([*RAYPLANE, "serve", "up", str(cfg), "--dry-run"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2
    err = out.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "models[0].pool: 'a100-mgi' is not a pool (did you mean 'a100-mig'?)" in err


def test_timeslice_derivation_is_visible_in_the_rendered_config(doc):
    doc["models"][0].update(engine="vllm", pool="a100-timeslice")
    (llm,) = app_of(doc)["args"]["llm_configs"]
    pool = load_catalog().pool("a100-timeslice")
    assert llm["engine_kwargs"]["gpu_memory_utilization"] == \
        derived_gpu_memory_utilization(pool) == 0.3


def test_one_ingress_mixes_cpu_triton_and_upstream_models(doc):
    """cpu, triton and openai-upstream models behind one router: each model's deployment gets
    its engine's arguments, and only the replicas that hold a model take a unit of its pool
    (a client of a server elsewhere runs beside the ingress)."""
    doc["models"] = [
        {**doc["models"][0], "name": "chat", "pool": "a100-mig"},
        {"name": "chat-triton", "source": "/models/chat", "engine": "triton",
         "pool": "h100-timeslice"},
        {"name": "chat-triton-eks", "source": "/models/chat", "engine": "triton",
         "pool": "a100-mig", "triton": {"server": "container"}},
        {"name": "hosted", "source": "org/model", "engine": "openai-upstream",
         "upstream": {"base_url": "https://llm.example.com/v1/", "model": "org/model",
                      "api_key": {"env": "HOSTED_KEY"}}},
        {"name": "tgi", "source": "org/model", "engine": "openai-upstream", "pool": "a100-mig",
         "upstream": {"server": "tgi"}}]
    app = app_of(doc)
    assert app["import_path"] == "serve.app:build_app"
    args = {m["name"]: m for m in app["args"]["models"]}
    assert {n: m["engine"] for n, m in args.items()} == {
        "chat": "cpu", "chat-triton": "triton", "chat-triton-eks": "triton",
        "hosted": "openai-upstream", "tgi": "openai-upstream"}
    assert args["chat-triton"]["triton"] == {"model_name": "llm", "startup_timeout_s": 180.0,
                                             "url": None}  # the replica starts its own
    assert args["chat-triton-eks"]["triton"]["url"] == "triton-chat-triton-eks:8001"
    assert args["hosted"]["upstream"]["base_url"] == "https://llm.example.com/v1"
    assert args["hosted"]["upstream"]["api_key"] == {"env": "HOSTED_KEY", "file": None,
                                                     "first": False}
    assert args["tgi"]["upstream"]["base_url"] == "http://tgi-tgi:80/v1"
    resources = {d["name"]: d["ray_actor_options"]["resources"] for d in app["deployments"]}
    assert resources["model-chat"] == {"pool:a100-mig": 1.0}
    assert resources["model-chat-triton"] == {"pool:h100-timeslice": 1.0}
    for client in ("model-chat-triton-eks", "model-hosted", "model-tgi"):
        assert resources[client] == resources["OpenAIIngress"], client


def test_vllm_models_beside_others_get_their_own_app_behind_the_same_endpoint(doc):
    """A mixed spec with vllm: vLLM keeps Ray's own ingress in an application of its own,
    and the router lists and serves its model as an upstream of that application, called with
    the first of the platform's keys."""
    doc["models"].append({"name": "llama", "source": "s3://models/llama", "engine": "vllm",
                          "pool": "a100-mig"})
    rendered = to_serve_config(ServeAppConfig.parse(doc), load_catalog())
    ServeDeploySchema.model_validate(rendered)
    routed, vllm = rendered["applications"]
    assert (routed["name"], vllm["name"]) == ("openai", "openai-vllm")
    assert vllm["route_prefix"] == "/engines/vllm"
    assert vllm["import_path"] == "serve.engines.vllm:build_app"
    (llm,) = vllm["args"]["llm_configs"]
    assert llm["model_loading_config"]["model_id"] == "llama"
    assert vllm["args"]["api_keys"]["file"] == "/etc/rayplane/api-keys"
    stand_in = {m["name"]: m for m in routed["args"]["models"]}["llama"]
    assert stand_in["engine"] == "openai-upstream"
    assert stand_in["upstream"]["base_url"] == "http://127.0.0.1:8000/engines/vllm/v1"
    assert stand_in["upstream"]["api_key"] == {"env": None, "file": "/etc/rayplane/api-keys",
                                               "first": True}
    doc.pop("api_keys")
    doc["allow_unauthenticated"] = True
    assert "api_keys: required beside vllm models" in refused(doc)


def test_an_upstream_key_can_be_the_first_of_the_platforms_keys(tmp_path, monkeypatch):
    from serve.engines.upstream_wire import KeySource

    keys = tmp_path / "keys"
    keys.write_text("# rotated 2026-11-30\nrp-first\nrp-second\n")
    assert KeySource({"file": str(keys), "first": True}).get() == "rp-first"
    monkeypatch.setenv("KEYS", " rp-a, rp-b")
    assert KeySource({"env": "KEYS", "first": True}).get() == "rp-a"
    assert KeySource({"env": "KEYS"}).get() == "rp-a, rp-b"
