"""`rayplane up --metrics`: a real Prometheus scraping every Ray node of the local platform
through the service-discovery file Ray's head keeps, and Ray's own metrics arriving. Uses a
two-pool cluster of its own."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from raycluster.catalog import DEFAULT_CATALOG
from raycluster.local import DEFAULT_PORTS, LocalCluster, free_port, prometheus_config
from tests.integration.conftest import drop_postgres_data

pytestmark = pytest.mark.skipif(not shutil.which("prometheus"),
                                reason="needs prometheus on PATH (make test installs it)")


@pytest.fixture(scope="module")
def metrics_cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("rayplane-metrics")
    doc = yaml.safe_load(DEFAULT_CATALOG.read_text())
    doc["pools"] = [p for p in doc["pools"] if p["name"] in ("cpu", "a100-mig")]
    catalog = root / "pools.yaml"
    catalog.write_text(yaml.safe_dump(doc))
    cluster = LocalCluster(state_dir=root / "state", catalog_path=catalog,
                           ports={name: free_port() for name in DEFAULT_PORTS}, metrics=True)
    try:
        cluster.up(timeout=240)
        yield cluster
    finally:
        cluster.down()
        drop_postgres_data(cluster.state_dir)


def prometheus_query(cluster: LocalCluster, query: str) -> list[dict]:
    url = f"{cluster.prometheus_url}/api/v1/query?query={urllib.parse.quote(query)}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())["data"]["result"]


def test_generated_config_passes_promtool(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not on PATH")
    config = tmp_path / "prometheus.yml"
    config.write_text(prometheus_config(tmp_path))
    res = subprocess.run([promtool, "check", "config", str(config)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_prometheus_scrapes_every_ray_node(metrics_cluster: LocalCluster):
    nodes = len(metrics_cluster.node_plan())
    deadline = time.monotonic() + 150
    targets: list[dict] = []
    while time.monotonic() < deadline:
        targets = [t for t in prometheus_query(metrics_cluster, 'up{job="ray"}')
                   if t["value"][1] == "1"]
        if len(targets) >= nodes:
            break
        time.sleep(3)
    assert len(targets) >= nodes, targets
    # Ray's own series arrive through that scrape
    deadline = time.monotonic() + 60
    series: list[dict] = []
    while time.monotonic() < deadline and not series:
        series = prometheus_query(metrics_cluster, '{__name__=~"ray_.+"}')
        time.sleep(3)
    assert series, "no ray_* series scraped"


def test_status_reports_prometheus(metrics_cluster: LocalCluster):
    assert metrics_cluster.status()["prometheus"] == metrics_cluster.prometheus_url
