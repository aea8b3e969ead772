"""The OpenAI API of the deployed Serve app, through the official openai client (sync, async,
streaming) and LangChain, against the local platform (real Ray nodes, MLflow, HTTP): the
conformance suite every engine runs.

The model is a tiny GPT-2 in the platform's format, trained to reproduce a few conversations
(tests/support/tiny_model.py), registered in the fixture's MLflow server as ``runs:/<run_id>/model`` and
deployed with ``rayplane serve up`` from ``models:/NAME@champion``. Each test runs against:

- ``router``: the cpu model of a mixed app, one ingress in front of three engines (``cpu``,
  ``triton``, ``openai-upstream``). It attaches online features (serve/online_features.py): a
  request whose ``metadata`` names a pool gets the pool's load from the platform's feature
  store (``feature_store_ready``) as a system message;
- ``direct``: the cpu model answering HTTP in its own replica (an app of its own);
- ``triton``: the same weights served by a Triton server the replica started (nvidia-pytriton's
  ``tritonserver``, Python backend over the CPU engine, KServe v2 gRPC), in the mixed app;
- ``upstream``: the same weights served by Hugging Face's ``transformers serve``
  (tests/support/upstream.py), proxied by the mixed app.

A case the server behind an engine cannot pass is skipped with that server's limitation named
(``limitation``).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.integration.conftest import rayplane
from tests.support import tiny_model as tm
from tests.support.openai_suite import limitation, once
from tests.support.procs import listening, pids_with
from tests.support.upstream import free_port

MODEL = "tiny-chat"
#: The mixed app's models by the engine that serves them.
MODELS = {"cpu": MODEL, "triton": "tiny-chat-triton", "openai-upstream": "tiny-chat-upstream"}
#: An upstream model of the mixed app whose server is down (a port nothing listens on).
DOWN = "tiny-chat-down"
REGISTERED = "serve-openai-tiny"
APPS = {"router": ("openai-tests", "/openai-tests"),
        "direct": ("openai-tests-direct", "/openai-tests-direct")}
pytestmark = pytest.mark.timeout(900)
#: What the served model attaches to a request whose metadata names a pool.
POOL = "h100-timeslice"
LOAD = ("running_units", "pending_units", "free_units", "gpu_utilization", "mean_wait_1h_s")
ONLINE_FEATURES = [f"pool_load:{name}" for name in LOAD]
@pytest.fixture(scope="module")
def model_dir() -> Path:
    return tm.cached_tiny_model("1")


@pytest.fixture(scope="module")
def registered(local_cluster, model_dir) -> str:
    return tm.register_model(model_dir, REGISTERED, tracking_uri=local_cluster.mlflow_uri)


def _serve_up(cluster_env, tmp_path_factory, local_cluster, config: dict) -> str:
    import yaml

    cfg = tmp_path_factory.mktemp("serve") / "serve.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    out = rayplane(cluster_env, "serve", "up", str(cfg))
    assert out.returncode == 0, out.stderr + out.stdout
    base_url = f"{local_cluster.serve_url}{config['route_prefix']}/v1"
    assert base_url in out.stdout  # the endpoint is printed
    return base_url


@pytest.fixture(scope="module")
def mixed_app(local_cluster, cluster_env, registered, tmp_path_factory, feature_store_ready,
              upstream_server):
    """One app, one ingress, three engines: the cpu model (with online features), the same
    registered weights on a Triton server, and transformers serve as an OpenAI upstream."""
    import yaml

    name, prefix = APPS["router"]
    config = yaml.safe_load(tm.serve_config_yaml(
        name=name, source=f"models:/{REGISTERED}@champion", pool="a100-mig",
        route_prefix=prefix, api_key_file=local_cluster.api_key_path))
    cpu = config["models"][0]
    cpu["online_features"] = {
        "features": ONLINE_FEATURES, "entity": {"join_key": "pool", "from_metadata": "pool"},
        "timeout_ms": 2000}
    config["models"] += [
        {"name": MODELS["triton"], "source": cpu["source"], "pool": "h100-timeslice",
         "engine": "triton", "max_num_seqs": 16, "triton": {"server": "process"}},
        {"name": MODELS["openai-upstream"], "source": upstream_server["model"],
         "engine": "openai-upstream",
         "upstream": {"base_url": upstream_server["base_url"],
                      "model": upstream_server["model"], "read_timeout_s": 60}},
        {"name": DOWN, "source": upstream_server["model"], "engine": "openai-upstream",
         "upstream": {"base_url": f"http://127.0.0.1:{free_port()}/v1",
                      "connect_timeout_s": 2, "retries": 1}}]
    base_url = _serve_up(cluster_env, tmp_path_factory, local_cluster, config)
    yield {"base_url": base_url, "health": f"{local_cluster.serve_url}{prefix}/healthz"}
    rayplane(cluster_env, "serve", "down", name, timeout=120)


@pytest.fixture(scope="module", params=["direct", "router", "triton", "upstream"])
def deployed(request, local_cluster, cluster_env, registered, tmp_path_factory):
    """The app each test runs against (pytest runs every test against one, then the next):
    ``model`` is what to ask for, ``engine`` what serves it."""
    key = local_cluster.api_key_path.read_text().strip()
    version = registered
    if request.param == "direct":
        import yaml

        name, prefix = APPS["direct"]
        config = yaml.safe_load(tm.serve_config_yaml(
            name=name, source=f"models:/{REGISTERED}@champion", pool="a100-mig",
            route_prefix=prefix, api_key_file=local_cluster.api_key_path,
            ingress_mode="direct"))
        base_url = _serve_up(cluster_env, tmp_path_factory, local_cluster, config)
        yield {"base_url": base_url, "key": key, "version": version, "param": "direct",
               "engine": "cpu", "model": MODEL,
               "health": f"{local_cluster.serve_url}{prefix}/healthz"}
        rayplane(cluster_env, "serve", "down", name, timeout=120)
        return
    app = request.getfixturevalue("mixed_app")
    engine = {"router": "cpu", "triton": "triton", "upstream": "openai-upstream"}[request.param]
    yield {**app, "key": key, "version": version, "param": request.param, "engine": engine,
           "model": MODELS[engine]}


@pytest.fixture(scope="module")
def model(deployed) -> str:
    return deployed["model"]


@pytest.fixture(scope="module")
def client(deployed) -> OpenAI:
    return OpenAI(base_url=deployed["base_url"], api_key=deployed["key"], timeout=60)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def chat_prompt_len(tokenizer, messages, tools=None) -> int:
    return len(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                             tokenize=True, return_dict=False))


def test_models_lists_the_registered_version(model, client, deployed):
    cards = {m.id: m.model_extra for m in client.models.list().data}
    if deployed["param"] == "direct":
        assert list(cards) == [model]
    else:  # one ingress, three engines: each model listed with what serves it
        assert {name: card["engine"] for name, card in cards.items()} == \
            {**{name: engine for engine, name in MODELS.items()}, DOWN: "openai-upstream"}
    assert cards[model]["engine"] == deployed["engine"]
    if deployed["engine"] != "openai-upstream":
        # The alias was resolved at deploy time: the app names the exact registry version.
        assert cards[model]["root"] == f"models:/{REGISTERED}/{deployed['version']}"


def test_stream_joins_to_non_stream_text_with_exact_usage(model, client, tokenizer):
    full = client.chat.completions.create(model=model, messages=tm.GREETING, temperature=0,
                                          max_tokens=60)
    text = full.choices[0].message.content
    assert text == tm.GREETING_REPLY
    assert full.choices[0].finish_reason == "stop"
    # Exact usage: the prompt as the chat template renders it; the reply's tokens plus EOS.
    prompt = chat_prompt_len(tokenizer, tm.GREETING)
    completion = len(tokenizer.encode(text, add_special_tokens=False)) + 1
    assert (full.usage.prompt_tokens, full.usage.completion_tokens, full.usage.total_tokens) \
        == (prompt, completion, prompt + completion)

    chunks = list(client.chat.completions.create(
        model=model, messages=tm.GREETING, temperature=0, max_tokens=60, stream=True,
        stream_options={"include_usage": True}))
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == text
    reasons = [c.choices[0].finish_reason for c in with_choices]
    assert reasons[-1] == "stop" and all(r is None for r in reasons[:-1])
    # Streamed, not one blob: the first token goes out at once, the rest follow (batched
    # every stream_interval_ms, so a fast machine sends few chunks: count is not the test).
    contents = [c.choices[0].delta.content for c in with_choices if c.choices[0].delta.content]
    assert len(contents) >= 2 and len(contents[0]) < len(text)
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


def test_a_stream_reaches_the_client_while_it_is_generated(model, client, deployed):
    """Through the platform's ingress the first text arrives long before the last: HAProxy
    once held a stream's small writes back and a client got all of it at its end."""
    limitation(deployed, "ignore_eos")
    start, first = time.perf_counter(), None
    for chunk in client.chat.completions.create(
            model=model, messages=tm.GREETING, temperature=0, max_tokens=200, stream=True,
            extra_body={"ignore_eos": True}):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
    total = time.perf_counter() - start
    # 200 tokens take a few hundred ms; the first text goes out at the first token.
    assert first is not None and total - first >= 0.05, (first, total)


def test_max_tokens_gives_length_and_counts_exactly(model, client):
    r = client.chat.completions.create(model=model, messages=tm.GREETING, temperature=0,
                                       max_tokens=5)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    assert tm.GREETING_REPLY.startswith(r.choices[0].message.content)


def test_stop_sequence_cuts_before_it(model, client, deployed):
    limitation(deployed, "stop")
    r = client.chat.completions.create(model=model, messages=tm.GREETING, temperature=0,
                                       max_tokens=60, stop=["help"])
    assert r.choices[0].message.content == tm.GREETING_REPLY.split("help")[0]
    assert r.choices[0].finish_reason == "stop"


def test_n_choices_with_seed_are_reproducible(model, client, deployed):
    limitation(deployed, "n")
    kw = {"model": model, "messages": tm.GREETING, "temperature": 1.0, "top_p": 0.95,
          "max_tokens": 12, "n": 3, "seed": 7, "extra_body": {"ignore_eos": True}}
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in a.choices)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.completion_tokens == 3 * 12  # every choice counted, the prompt once
    assert a.usage.prompt_tokens == b.usage.prompt_tokens < a.usage.completion_tokens


def test_async_clients_concurrently_get_the_same_greedy_answer(model, deployed):
    async def main():
        client = AsyncOpenAI(base_url=deployed["base_url"], api_key=deployed["key"], timeout=60)
        rs = await asyncio.gather(*[
            client.chat.completions.create(model=model, messages=m, temperature=0,
                                           max_tokens=60)
            for m in [tm.GREETING, tm.VERSION_QUESTION] * 4])
        streamed = []
        stream = await client.chat.completions.create(model=model, messages=tm.GREETING,
                                                      temperature=0, stream=True)
        async for chunk in stream:
            streamed.append(chunk.choices[0].delta.content or "")
        await client.close()
        return rs, "".join(streamed)

    rs, streamed = asyncio.run(main())
    assert [r.choices[0].message.content for r in rs] == \
        [tm.GREETING_REPLY, tm.version_reply("1")] * 4
    assert streamed == tm.GREETING_REPLY


def test_tool_call_comes_back_as_tool_calls(model, client, deployed):
    limitation(deployed, "tools")
    r = client.chat.completions.create(model=model, messages=tm.TOOL_QUESTION, tools=tm.TOOLS,
                                       temperature=0, max_tokens=60)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "calculator"
    assert json.loads(call.function.arguments) == tm.TOOL_CALL["arguments"]
    assert not choice.message.content

    # Streamed: the markup never leaks into content; the call arrives whole.
    chunks = list(client.chat.completions.create(model=model, messages=tm.TOOL_QUESTION,
                                                 tools=tm.TOOLS, temperature=0, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert content == "" and len(calls) == 1
    assert calls[0].function.name == "calculator"
    assert json.loads(calls[0].function.arguments) == tm.TOOL_CALL["arguments"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # The tool's result sent back: the model answers from it.
    follow = tm.TOOL_QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"result": 84})}]
    r2 = client.chat.completions.create(model=model, messages=follow, tools=tm.TOOLS,
                                        temperature=0, max_tokens=60)
    assert r2.choices[0].message.content == tm.TOOL_ANSWER


def test_named_tool_choice_forces_that_tool(model, client, deployed):
    limitation(deployed, "tools")
    r = client.chat.completions.create(
        model=model, messages=tm.TOOL_QUESTION, tools=tm.TOOLS, temperature=0, max_tokens=60,
        tool_choice={"type": "function", "function": {"name": "calculator"}})
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "calculator"
    assert isinstance(json.loads(call.function.arguments), dict)


def test_text_completions_stream_and_not(model, client, deployed):
    r = client.completions.create(model=model, prompt=tm.COMPLETION_PROMPT, temperature=0,
                                  max_tokens=40)
    assert r.choices[0].text == tm.COMPLETION_TEXT
    assert r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=model, prompt=tm.COMPLETION_PROMPT,
                                            temperature=0, max_tokens=40, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    limitation(deployed, "echo")
    echo = client.completions.create(model=model, prompt=tm.COMPLETION_PROMPT, temperature=0,
                                     max_tokens=40, echo=True)
    assert echo.choices[0].text == tm.COMPLETION_PROMPT + tm.COMPLETION_TEXT


@pytest.mark.parametrize("kwargs, param", [
    ({"temperature": 5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": 100000}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x" * 3000}]}, "messages"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": tm.TOOLS},
     None),
])
def test_bad_request_is_400_and_server_keeps_serving(model, client, kwargs, param, deployed):
    if param in ("max_tokens", "messages"):
        limitation(deployed, "context")
    request = {"model": model, "messages": tm.GREETING, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**request)
    body = err.value.body
    assert body["type"] == "invalid_request_error" and body["message"]
    if param:
        assert body["param"].startswith(param)
    ok = client.chat.completions.create(model=model, messages=tm.GREETING, temperature=0,
                                        max_tokens=3)
    assert ok.choices[0].message.content


def test_malformed_json_and_unknown_fields(model, deployed):
    headers = {"Authorization": f"Bearer {deployed['key']}"}
    r = httpx.post(f"{deployed['base_url']}/chat/completions", content=b"{not json",
                   headers=headers | {"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    limitation(deployed, "unknown_fields")
    # Fields the server does not know are accepted (and logged), as OpenAI clients send them.
    r = httpx.post(f"{deployed['base_url']}/chat/completions", headers=headers, timeout=30,
                   json={"model": model, "messages": tm.GREETING, "max_tokens": 3,
                         "temperature": 0, "metadata": {"a": "b"}, "some_new_flag": True})
    assert r.status_code == 200, r.text


def test_wrong_or_missing_key_is_401(model, deployed):
    bad = OpenAI(base_url=deployed["base_url"], api_key="rp-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=model, messages=tm.GREETING)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.get(f"{deployed['base_url']}/models", timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=tm.GREETING)
    assert err.value.body["code"] == "model_not_found"


def test_langchain_chat_openai(model, deployed):
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=model, base_url=deployed["base_url"], api_key=deployed["key"],
                     temperature=0, max_tokens=60)
    reply = llm.invoke([SystemMessage(tm.GREETING[0]["content"]),
                        HumanMessage(tm.GREETING[1]["content"])])
    assert reply.content == tm.GREETING_REPLY
    assert reply.usage_metadata["output_tokens"] > 0
    streamed = "".join(c.content for c in llm.stream(
        [SystemMessage(tm.GREETING[0]["content"]), HumanMessage(tm.GREETING[1]["content"])]))
    assert streamed == tm.GREETING_REPLY
    limitation(deployed, "tools")
    with_tools = llm.bind_tools(tm.TOOLS)
    msg = with_tools.invoke([HumanMessage(tm.TOOL_QUESTION[0]["content"])])
    assert msg.tool_calls[0]["name"] == "calculator"
    assert msg.tool_calls[0]["args"] == tm.TOOL_CALL["arguments"]


def test_client_disconnect_frees_the_engine_slot(model, deployed):
    """A client that goes away mid-stream, on a busy replica: its sequence leaves the batch
    (``aborted``) instead of generating to the end for nobody. The other clients keep the
    engine's steps slow enough that the tiny model cannot finish first."""
    from concurrent.futures import ThreadPoolExecutor

    limitation(deployed, "counters")

    def health():
        return httpx.get(deployed["health"], timeout=30).json()["models"][model]

    before = health()["aborted"]
    headers = {"Authorization": f"Bearer {deployed['key']}"}
    body = {"model": model, "messages": tm.GREETING, "stream": True, "ignore_eos": True,
            "temperature": 0}  # no max_tokens: the rest of the context

    def stay() -> int:
        with httpx.stream("POST", f"{deployed['base_url']}/chat/completions", json=body,
                          headers=headers, timeout=60) as r:
            return sum(line.startswith("data: ") for line in r.iter_lines())

    with ThreadPoolExecutor(8) as pool:
        staying = [pool.submit(stay) for _ in range(8)]
        with httpx.stream("POST", f"{deployed['base_url']}/chat/completions", json=body,
                          headers=headers, timeout=30) as r:
            assert r.status_code == 200
            events = 0
            for line in r.iter_lines():
                events += line.startswith("data: ")
                if events >= 3:
                    break  # leaving the block closes the connection mid-stream
        assert all(f.result() > 3 for f in staying)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        h = health()
        if h["aborted"] > before and h["running"] == 0:
            break
        time.sleep(0.5)
    assert h["aborted"] > before and h["running"] == 0, h


def test_metrics_reach_prometheus(model, local_cluster, client, deployed):
    """Ray's metrics agents export our series in Prometheus format on every node."""
    once(deployed, "Ray's metrics export")
    client.chat.completions.create(model=model, messages=tm.GREETING, temperature=0,
                                   max_tokens=5)
    nodes = httpx.get(f"{local_cluster.dashboard_url}/nodes?view=summary",
                      headers=local_cluster.auth_headers(), timeout=30).json()
    ports = {n["raylet"]["metricsExportPort"] for n in nodes["data"]["summary"]
             if n["raylet"].get("state") == "ALIVE"}
    wanted = {"ray_rayplane_serve_requests", "ray_rayplane_serve_time_to_first_token_seconds",
              "ray_rayplane_serve_inter_token_latency_seconds", "ray_rayplane_serve_output_tokens",
              "ray_serve_num_http_requests"}
    seen: set[str] = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not wanted <= seen:
        for port in ports:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            except httpx.HTTPError:
                continue
            for line in text.splitlines():
                if line.startswith("ray_") and f'model="{model}"' in line or \
                        line.startswith("ray_serve_num_http_requests"):
                    seen.add(line.split("{")[0].removesuffix("_total").removesuffix("_bucket")
                             .removesuffix("_count").removesuffix("_sum"))
        time.sleep(2)
    assert wanted <= seen, f"missing {wanted - seen}"


def test_ingress_is_haproxy_listening_on_loopback_only(local_cluster, client, deployed):
    """The local platform's Serve ingress is HAProxy (Ray Serve's own mode), and everything
    it listens on -- the endpoint, its stats page, its Prometheus exporter -- is loopback."""
    once(deployed, "the ingress")
    assert client.models.list().data
    procs = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline[0].endswith(b"/haproxy") and any(
                    str(local_cluster.haproxy_dir).encode() in arg for arg in cmdline):
                procs.append(int(entry.name))
    assert procs, f"no HAProxy running with its files in {local_cluster.haproxy_dir}"
    sockets = set().union(*(listening(pid) for pid in procs))
    assert ("127.0.0.1", local_cluster.ports["serve"]) in sockets, sockets
    assert len(sockets) >= 3, f"endpoint, stats and metrics expected: {sockets}"
    assert {addr for addr, _ in sockets} == {"127.0.0.1"}, sockets


def test_a_request_naming_the_pool_gets_its_online_features(model, client, tokenizer, cluster_env,
                                                            monkeypatch, deployed):
    once(deployed, "online features (the cpu model's)")
    from features.store import feature_store
    from serve.online_features import HEADER, system_text

    def ask(**extra):
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=tm.GREETING, temperature=0, max_tokens=2, **extra)
        return raw.headers.get(HEADER), raw.parse()

    # The store's values for the pool now, read with Feast directly as the replicas read them.
    for key in ("RAYPLANE_STATE_DIR", "RAYPLANE_POSTGRES_DSN_FILE"):
        monkeypatch.setenv(key, cluster_env[key])
    row = feature_store().get_online_features(features=ONLINE_FEATURES,
                                              entity_rows=[{"pool": POOL}]).to_dict()
    values = {f"pool_load:{name}": row[name][0] for name in LOAD}
    header, with_features = ask(metadata={"pool": POOL})
    plain_header, plain = ask()
    assert header == ",".join(ONLINE_FEATURES)
    assert plain_header == "none; metadata.pool missing"
    # The prompt grew by exactly the system message holding the store's values for the pool.
    messages = [tm.GREETING[0], {"role": "system", "content": system_text("pool", POOL, values)},
                *tm.GREETING[1:]]
    assert with_features.usage.prompt_tokens == chat_prompt_len(tokenizer, messages)
    assert with_features.usage.prompt_tokens > plain.usage.prompt_tokens


def test_tritons_own_metrics_reach_the_platforms_prometheus(model, client, deployed,
                                                          local_cluster):
    """Triton's own series (requests per model, queue time) in the platform's Prometheus,
    scraped through the target file the replica left (job inference-servers)."""
    if deployed["engine"] != "triton":
        pytest.skip("the Triton server's own metrics")
    client.chat.completions.create(model=model, messages=tm.GREETING, max_tokens=2)
    query = 'sum(nv_inference_request_success{job="inference-servers",model="llm",server="triton"})'
    deadline, value = time.monotonic() + 60, 0.0
    while time.monotonic() < deadline and value < 1:
        r = httpx.get(f"{local_cluster.prometheus_url}/api/v1/query", params={"query": query},
                      timeout=10).json()["data"]["result"]
        value = float(r[0]["value"][1]) if r else 0.0
        time.sleep(2)
    assert value >= 1, f"{query} = {value}"


def test_a_killed_triton_server_is_restarted_and_requests_resume(model, deployed, record_property):
    """SIGKILL the Triton server under the model's replica: requests meanwhile fail fast with
    a retryable 503 (counted), the replica's health check fails, Serve replaces the replica,
    which starts a new server, and requests succeed again."""
    if deployed["engine"] != "triton":
        pytest.skip("the Triton engine's own fault")
    import os
    import signal

    client = OpenAI(base_url=deployed["base_url"], api_key=deployed["key"], timeout=30,
                    max_retries=0)
    ask = {"model": model, "messages": tm.GREETING, "temperature": 0, "max_tokens": 3}
    assert client.chat.completions.create(**ask).choices[0].message.content
    (old,) = pids_with("--model-repository=", exe="tritonserver")
    os.kill(old, signal.SIGKILL)
    failures, statuses, started = 0, set(), time.monotonic()
    while time.monotonic() - started < 180:
        try:
            client.chat.completions.create(**ask)
            if pids_with("--model-repository=", exe="tritonserver") not in ([], [old]):
                break
        except openai.APIStatusError as err:
            failures += 1
            statuses.add(err.status_code)
        time.sleep(0.5)
    recovered_s = time.monotonic() - started
    record_property("failed_requests", failures)
    record_property("recovered_s", round(recovered_s, 1))
    print(f"triton killed: {failures} requests failed ({sorted(statuses)}), "
          f"served again after {recovered_s:.1f}s")
    new = pids_with("--model-repository=", exe="tritonserver")
    assert new and old not in new, "no new Triton server"
    assert statuses <= {503}, f"failures were {statuses}, not the retryable 503"
    for _ in range(4):  # served again, answer for answer
        r = client.chat.completions.create(model=model, messages=tm.GREETING, temperature=0,
                                           max_tokens=60)
        assert r.choices[0].message.content == tm.GREETING_REPLY


def test_an_upstream_that_is_down_is_a_bounded_error_naming_it(model, deployed):
    """An upstream nobody answers at: 502 or 503 naming it (its host, never its key), well
    within connect_timeout_s x (retries + 1), on the stream too."""
    if deployed["engine"] != "openai-upstream":
        pytest.skip("the upstream engine's own fault")
    client = OpenAI(base_url=deployed["base_url"], api_key=deployed["key"], timeout=30,
                    max_retries=0)
    for stream in (False, True):
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as err:
            out = client.chat.completions.create(model=DOWN, messages=tm.GREETING,
                                                 max_tokens=3, stream=stream)
            list(out) if stream else None
        assert time.monotonic() - started < 10
        assert err.value.status_code in (502, 503), err.value
        assert "127.0.0.1" in err.value.message, err.value.message
    ok = client.chat.completions.create(model=model, messages=tm.GREETING,
                                        temperature=0, max_tokens=3)
    assert ok.choices[0].message.content  # its neighbours keep serving
