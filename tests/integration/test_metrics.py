"""`rayplane up --metrics`: a real Prometheus scraping every Ray node of the session platform
(which the tests start with metrics on) through the service-discovery file Ray's head keeps,
and Ray's own metrics arriving. The configuration it is started with, rules included, is
checked by promtool in tests/unit/infra/test_monitoring.py; what the dashboards read from it,
in tests/integration/test_dashboards.py."""

from __future__ import annotations

import json
import shutil
import time
import urllib.parse
import urllib.request

import pytest

from raycluster.local import LocalCluster

pytestmark = pytest.mark.skipif(not shutil.which("prometheus"),
                                reason="needs prometheus on PATH (make test installs it)")


def prometheus_query(cluster: LocalCluster, query: str) -> list[dict]:
    url = f"{cluster.prometheus_url}/api/v1/query?query={urllib.parse.quote(query)}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())["data"]["result"]


def test_prometheus_scrapes_every_ray_node(local_cluster: LocalCluster):
    nodes = len(local_cluster.node_plan())
    deadline = time.monotonic() + 150
    targets: list[dict] = []
    while time.monotonic() < deadline:
        # one metrics endpoint per node carries its node's ray_node_* series
        targets = [t for t in prometheus_query(local_cluster, 'up{job="ray"} == 1')
                   if prometheus_query(local_cluster, f'ray_node_cpu_count{{instance="'
                                                      f'{t["metric"]["instance"]}"}}')]
        if len(targets) >= nodes:
            break
        time.sleep(3)
    assert len(targets) >= nodes, targets
    heads = prometheus_query(local_cluster, 'ray_node_cpu_count{RayNodeType="head"}')
    assert len(heads) == 1, heads
    # Ray's own series arrive through that scrape
    deadline = time.monotonic() + 60
    series: list[dict] = []
    while time.monotonic() < deadline and not series:
        series = prometheus_query(local_cluster, '{__name__=~"ray_gcs_.+"}')
        time.sleep(3)
    assert series, "no ray_gcs_* series scraped"


def test_status_reports_prometheus(local_cluster: LocalCluster):
    assert local_cluster.status()["prometheus"] == local_cluster.prometheus_url
