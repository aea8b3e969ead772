"""rayplane's dashboards against the session platform's real Prometheus, after real traffic:
chat and completion requests through the official openai client to the tiny model (one
refused by the model), agent runs of an agents app through langgraph-sdk (one failing) and a
Ray Train run submitted with ``ray job submit``. Then every panel query of rayplane's
dashboards but the DCGM ones (no GPU here; promtool parses those in
tests/unit/infra/test_monitoring.py) runs over the traffic's time range, as Grafana would,
and must return data. The same Prometheus evaluates infra/monitoring's rules, and the Ray
head wrote the same Ray dashboards that ``rayplane render`` ships."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from raycluster import monitoring
from tests.integration.conftest import rayplane
from tests.support import tiny_model as tm

APP, PREFIX = "dashboards-agents", "/dashboards-agents"
DCGM = re.compile(r"\bDCGM_FI_\w+|rayplane:gpu_\w+")
pytestmark = [pytest.mark.skipif(not shutil.which("prometheus"),
                                 reason="needs prometheus on PATH (make test installs it)"),
              pytest.mark.timeout(600)]

#: A Ray Train run on a GPU pool's node (its pool resource; the worker runs on CPU here).
TRAIN = """
import ray.train
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer


def loop(config):
    import time
    for step in range(3):
        time.sleep(2)
        ray.train.report({"loss": 1.0 / (step + 1)})


TorchTrainer(loop, scaling_config=ScalingConfig(
    num_workers=1, resources_per_worker={"CPU": 0, "pool:a100-timeslice": 1}),
    run_config=RunConfig(name="dashboards-train", storage_path=STORAGE)).fit()
"""


def prometheus(cluster, path: str, **params) -> list[dict]:
    url = f"{cluster.prometheus_url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=30) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]["result"] if "result" in body["data"] else body["data"]


def has_data(series: list[dict]) -> bool:
    """Some series with a finite value (a quantile over no new observations is NaN)."""
    return any(math.isfinite(float(v)) for s in series
               for _, v in s.get("values", [s.get("value", (0, "NaN"))]))


def total(cluster, name: str) -> float:
    """The sum of every series of counter ``name`` now (0 when there is none yet)."""
    result = prometheus(cluster, "query", query=f"sum({name})")
    return float(result[0]["value"][1]) if result else 0.0


def wait_for_series(cluster, *names: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    missing = list(names)
    while missing and time.monotonic() < deadline:
        missing = [n for n in missing if not prometheus(cluster, "query", query=n)]
        time.sleep(2)
    assert not missing, f"no series {missing} in Prometheus after {timeout} s"


def wait_for_increase(cluster, before: dict[str, float], timeout: float = 90) -> None:
    """Until Prometheus has scraped each counter above its value in ``before``. Waiting for the
    series to exist is not enough: earlier tests of the session may have made it already."""
    deadline = time.monotonic() + timeout
    waiting = dict(before)
    while waiting and time.monotonic() < deadline:
        waiting = {n: v for n, v in waiting.items() if total(cluster, n) <= v}
        time.sleep(2)
    assert not waiting, f"no new samples of {sorted(waiting)} in Prometheus after {timeout} s"


def live_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel, query with Grafana's All) of every panel that needs no GPU."""
    return [(name, title, monitoring.expand_variables(expr, board, rate_interval="1m"))
            for name, board in sorted(monitoring.rayplane_dashboards().items())
            for title, expr in monitoring.panel_queries(board) if not DCGM.search(expr)]


@pytest.fixture(scope="module")
def traffic(local_cluster, cluster_env, agent_model, tmp_path_factory):
    """Serving, agent and training traffic; its start time and counts."""
    from langgraph_sdk import get_sync_client
    from openai import BadRequestError, OpenAI

    start = time.time()
    folder = tmp_path_factory.mktemp("dashboards")
    job = folder / "job"
    job.mkdir()
    (job / "train_tiny.py").write_text(f"STORAGE = {str(folder / 'runs')!r}\n{TRAIN}")
    ray = str(Path(sys.executable).parent / "ray")
    train = subprocess.Popen([ray, "job", "submit", "--working-dir", str(job), "--",
                              "python", "train_tiny.py"], env=cluster_env, cwd=folder,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cfg = folder / "agents.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": APP, "route_prefix": PREFIX, "graphs": ["tools"],
        "model": {"base_url": agent_model["base_url"], "model": agent_model["model"],
                  "api_key_file": agent_model["key_file"], "timeout_s": 60, "max_retries": 0},
        "registered_model": "dashboards-unused", "mlflow_tracking_uri": local_cluster.mlflow_uri,
        "checkpointer": {"timeout_s": 3}, "mcp": {"enabled": False}, "cpus": 0.25,
        "autoscaling": {"min_replicas": 1, "max_replicas": 1},
        "api_keys": {"file": str(local_cluster.api_key_path)}}))
    out = rayplane(cluster_env, "agents", "up", "-f", str(cfg))
    assert out.returncode == 0, out.stderr + out.stdout
    up = time.time()
    try:
        key = Path(agent_model["key_file"]).read_text().strip()
        model = OpenAI(base_url=agent_model["base_url"], api_key=key, timeout=60, max_retries=0)
        agents = get_sync_client(url=f"{local_cluster.serve_url}{PREFIX}", api_key=key,
                                 timeout=120)
        question = {"messages": [{"role": "user", "content": "What is 12*7?"}]}

        def chat(**kw):
            return model.chat.completions.create(model=agent_model["model"],
                                                 messages=tm.GREETING, max_tokens=8, **kw)

        # A first request and run, then the rest once their series exist: rate() needs the
        # increase between two samples, and Ray exports a new series' first value with
        # everything that happened before it.
        before = {n: total(local_cluster, n) for n in ("ray_rayplane_serve_model_requests_total",
                                                          "ray_rayplane_agents_runs_total")}
        chat(temperature=0)
        runs = [agents.runs.wait(None, "tools", input=question)]
        wait_for_increase(local_cluster, before)
        for _ in range(3):
            chat(temperature=0)
        for _ in range(2):
            for _chunk in chat(stream=True):
                pass
        model.completions.create(model=agent_model["model"], prompt="Hello", max_tokens=4)
        with pytest.raises(BadRequestError):  # longer than the model's context: its 400
            model.chat.completions.create(model=agent_model["model"], max_tokens=4, messages=[
                {"role": "user", "content": "hello " * 4000}])
        runs.append(agents.runs.wait(None, "tools", input=question))
        try:  # no messages a graph can read: the run fails
            runs.append(agents.runs.wait(None, "tools", input={"messages": 5}))
        except Exception as err:  # noqa: BLE001 - the API answers the failed run's error
            runs.append(err)
        sent = time.time()
        train_out, _ = train.communicate(timeout=300)
        assert train.returncode == 0, train_out[-3000:]
        print(f"\nagents app up {up - start:.0f} s, traffic {sent - up:.0f} s, training done "
              f"{time.time() - sent:.0f} s later")
        yield {"start": start, "runs": runs}
    finally:
        if train.poll() is None:
            train.kill()
        down = time.time()
        rayplane(cluster_env, "agents", "down", "-f", str(cfg), timeout=120)
        print(f"\nagents app down {time.time() - down:.0f} s")


def test_every_panel_returns_data_after_traffic(local_cluster, traffic):
    queries = live_queries()
    assert len(queries) >= 30
    t0 = time.monotonic()
    missing: list[str] = []
    deadline = time.monotonic() + 120  # Ray's agents export every 10 s, Prometheus scrapes 5 s
    while True:
        end = time.time()
        missing = [f"{name} / {title}: {q}" for name, title, q in queries
                   if not has_data(prometheus(local_cluster, "query_range", query=q,
                                              start=traffic["start"] - 30, end=end, step=5))]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(5)
    print(f"\n{len(queries)} panel queries, {len(queries) - len(missing)} with data, "
          f"{time.monotonic() - t0:.0f} s after the traffic")
    assert not missing, "panels without data:\n" + "\n".join(missing)


def test_the_local_prometheus_evaluates_the_rules(local_cluster, traffic):
    groups = prometheus(local_cluster, "rules")["groups"]
    loaded = {r["name"] for g in groups for r in g["rules"] if r["type"] == "alerting"}
    assert loaded == {r["alert"] for r in monitoring.alerts()}
    assert all(g["rules"] and all(r["health"] == "ok" for r in g["rules"]) for g in groups), [
        (r["name"], r.get("lastError")) for g in groups for r in g["rules"]
        if r["health"] != "ok"]
    # recording rules over the traffic: the model version the app loaded is a label
    deadline = time.monotonic() + 60
    series: list[dict] = []
    while time.monotonic() < deadline and not series:
        series = prometheus(local_cluster, "query", query="rayplane:model_requests:rate5m")
        time.sleep(3)
    assert series and all(s["metric"]["model_version"].isdigit() for s in series), series
    assert prometheus(local_cluster, "query", query="rayplane:serve_requests:rate5m")


def test_the_ray_head_wrote_the_dashboards_render_ships(local_cluster):
    folder = local_cluster.temp_dir / "session_latest" / "metrics" / "grafana" / "dashboards"
    written = {p.name: json.loads(p.read_text()) for p in folder.glob("*.json")}
    for name, board in monitoring.ray_dashboards().items():
        file = name.removeprefix("ray-").replace("-", "_") + "_grafana_dashboard.json"
        assert written[file]["uid"] == board["uid"]
        assert written[file]["panels"] == board["panels"], file


def test_failures_are_counted_per_model_version_and_graph(local_cluster, traffic):
    """The refused request is the model version's 400 with its OpenAI code; the failed run is
    the graph's error (what the error-ratio alerts and panels divide)."""
    wait_for_series(local_cluster, "ray_rayplane_serve_model_request_errors_total",
                    'ray_rayplane_agents_runs_total{status="error"}')
    refused = prometheus(local_cluster, "query", query=(
        'ray_rayplane_serve_model_request_errors_total{code="context_length_exceeded"}'))
    assert refused and all(s["metric"]["model_version"].isdigit() for s in refused), refused
    assert prometheus(local_cluster, "query",
                      query='ray_rayplane_serve_model_requests_total{status="400"}')
    failed = prometheus(local_cluster, "query",
                        query='ray_rayplane_agents_runs_total{graph="tools", status="error"}')
    assert failed and float(failed[0]["value"][1]) >= 1, failed
    assert prometheus(local_cluster, "query",
                      query='ray_rayplane_agents_runs_total{graph="tools", status="success"}')
