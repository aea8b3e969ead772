"""The local cluster's plan and its refusals, without starting anything."""

from __future__ import annotations

import os
import socket

import pytest

from raycluster.errors import PlatformError
from raycluster.local import DEFAULT_PORTS, LocalCluster, free_port
from raycluster.spec import SpecError


def test_node_plan_derives_from_the_catalog(tmp_path):
    cluster = LocalCluster(state_dir=tmp_path, workers_per_pool=2)
    plan = {n.pool: n for n in cluster.node_plan()}
    assert plan["cpu"].role == "head" and plan["cpu"].num_cpus == os.cpu_count()
    assert plan["a100-mig"].resources == {"pool:a100-mig": 2.0}
    # the cores are the head's alone: the sum of logical CPUs is the machine's
    assert sum(n.num_cpus for n in plan.values()) == os.cpu_count()


def test_up_refuses_a_port_taken_by_something_else(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = {name: free_port() for name in DEFAULT_PORTS} | {"dashboard": taken}
        cluster = LocalCluster(state_dir=tmp_path, ports=ports)
        with pytest.raises(PlatformError, match=rf"port {taken} \(dashboard\) is in use by another "
                                            r"process.*RAYPLANE_DASHBOARD_PORT"):
            cluster.up()
    assert cluster.state() is None, "nothing was started"


def test_down_without_a_platform_does_nothing(tmp_path):
    assert LocalCluster(state_dir=tmp_path).down() == []


def test_serve_proxy_must_be_one_rayplane_knows(tmp_path):
    with pytest.raises(SpecError, match=r"serve_proxy: 'nginx' is not one of haproxy, ray") as err:
        LocalCluster(state_dir=tmp_path, serve_proxy="nginx")
    assert err.value.field == "serve_proxy"


def test_rayplane_up_refuses_an_unknown_serve_proxy_with_exit_2(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([str(Path(sys.executable).parent / "rayplane"), "up", "--state-dir",
                          str(tmp_path), "--serve-proxy", "nginx"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "--serve-proxy" in out.stderr and "haproxy, ray" in out.stderr
    assert not (tmp_path / "state.json").exists()


def test_haproxy_nodes_get_their_own_files_ports_and_the_loopback_wrapper(tmp_path):
    cluster = LocalCluster(state_dir=tmp_path)
    env = cluster._serve_proxy_env(cluster.temp_dir)
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    # HAProxy's socket paths are <folder>/<56-char node id>/<name>; HAProxy allows 97 bytes
    assert len(f"{cluster.haproxy_dir}/{'0' * 56}/metrics.sock") <= 97
    for key in ("CONFIG_FILE_LOC", "SOCKET_PATH", "SERVER_STATE_FILE", "METRICS_SOCKET_PATH"):
        assert env[f"RAY_SERVE_HAPROXY_{key}"].startswith(f"{cluster.haproxy_dir}/")
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] != "8404"
    assert env["RAY_SERVE_HAPROXY_METRICS_PORT"] != "9101"
    assert cluster._serve_proxy_env(cluster.temp_dir) == env, "one set for every node"
    assert os.access(env["RAY_SERVE_HAPROXY_BINARY_PATH"], os.X_OK)
    assert LocalCluster(state_dir=tmp_path, serve_proxy="ray")._serve_proxy_env(
        cluster.temp_dir) == {}
    import shutil

    shutil.rmtree(cluster.haproxy_dir)


def test_haproxy_wrapper_moves_all_interface_listeners_to_loopback(tmp_path):
    """Ray Serve renders the stats page and the Prometheus exporter on every interface; the
    wrapper HAProxy is started through rewrites them before HAProxy reads the file."""
    import subprocess

    from raycluster.local import HAPROXY_LOOPBACK_WRAPPER

    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text("frontend prometheus\n    bind :9101\nfrontend http_frontend\n"
                   "    bind 127.0.0.1:8000\nlisten stats\n  bind *:8404\n"
                   "backend b\n    server r1 10.0.0.7:30000 check\n")
    wrapper = tmp_path / "haproxy-loopback"
    # The "binary" prints the arguments it was given, so the pass-through is checked too.
    wrapper.write_text(HAPROXY_LOOPBACK_WRAPPER.format(binary="echo"))
    wrapper.chmod(0o755)
    out = subprocess.run([str(wrapper), "-db", "-f", str(cfg), "-sf", "123"],
                         capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.split() == ["-db", "-f", str(cfg), "-sf", "123"]
    text = cfg.read_text()
    assert "    bind 127.0.0.1:9101\n" in text and "  bind 127.0.0.1:8404\n" in text
    assert "    bind 127.0.0.1:8000\n" in text and "server r1 10.0.0.7:30000" in text
    subprocess.run([str(wrapper), "-f", str(cfg)], check=True, capture_output=True)
    assert cfg.read_text() == text, "running it again changes nothing"
