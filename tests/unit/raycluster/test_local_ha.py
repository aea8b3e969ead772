"""Head fault tolerance and the Serve ingress of the local platform, without starting Ray:
what a head, a worker and the ingress are started with, the Redis configuration, and the
order in which the supervisor brings dead nodes back."""

from __future__ import annotations

import stat
import subprocess

import pytest

from raycluster.errors import PlatformError
from raycluster.local import LocalCluster, LocalState, ManagedProcess
from raycluster.local.ingress import ingress_command, ingress_config
from raycluster.local.nodes import GCS_RECONNECT_TIMEOUT_S, node_env, node_of
from raycluster.local.redis_store import redis_config
from raycluster.local.services import haproxy_binary
from raycluster.local.supervisor import dead_pools


def state(cluster: LocalCluster, ha: bool) -> LocalState:
    return LocalState(state_dir=str(cluster.state_dir), ports=cluster.ports,
                      temp_dir=str(cluster.temp_dir), ha=ha, storage_namespace="ns-1",
                      nodes=[n.__dict__ for n in cluster.node_plan()])


def test_an_ha_head_keeps_its_gcs_in_redis_and_every_raylet_waits_for_it(tmp_path):
    cluster = LocalCluster(state_dir=tmp_path, ha=True, metrics=True, serve_proxy="ray")
    st = state(cluster, ha=True)
    head, *workers = cluster.node_plan()
    env = node_env(cluster, head, st)
    assert env["RAY_REDIS_ADDRESS"] == f"127.0.0.1:{cluster.ports['redis']}"
    assert env["RAY_external_storage_namespace"] == "ns-1"
    assert env["RAY_PROMETHEUS_HOST"] == cluster.prometheus_url
    for node in (head, *workers):
        assert node_env(cluster, node, st)["RAY_gcs_rpc_server_reconnect_timeout_s"] == str(
            GCS_RECONNECT_TIMEOUT_S)
    # No secret in what is recorded: the Redis password is added at spawn time only.
    assert not any("password" in k.lower() or "password" in v for k, v in env.items())
    plain = node_env(LocalCluster(state_dir=tmp_path, serve_proxy="ray"), head,
                     state(cluster, ha=False))
    assert "RAY_REDIS_ADDRESS" not in plain


def test_redis_listens_on_loopback_with_a_password_kept_in_its_0600_config(tmp_path):
    from raycluster.local.redis_store import redis_command

    text = redis_config(tmp_path, 6390, "s3cret")
    assert "bind 127.0.0.1\n" in text and "protected-mode yes" in text
    assert "requirepass s3cret" in text and "appendonly yes" in text
    pw = tmp_path / "pw"
    pw.write_text("s3cret")
    try:
        argv = redis_command(tmp_path / "redis", 6390, pw)
    except PlatformError as err:
        pytest.skip(str(err))
    assert not any("s3cret" in a for a in argv), "the password is never on a command line"
    assert stat.S_IMODE((tmp_path / "redis" / "redis.conf").stat().st_mode) == 0o600


def test_the_ingress_sends_to_the_workers_proxies_and_keeps_the_head_as_backup(tmp_path):
    text = ingress_config(8000, 8001, {"h100": 31002, "a100": 31001}, tmp_path / "s.sock")
    assert "bind 127.0.0.1:8000" in text
    assert text.index("server a100 127.0.0.1:31001 check") < text.index("server h100")
    assert "server head 127.0.0.1:8001 check backup" in text
    assert "option httpchk GET /-/healthz" in text
    # Only failures that prove no application saw the request are retried elsewhere.
    assert "retry-on conn-failure empty-response\n" in text


def test_the_ingress_configuration_is_valid_for_the_haproxy_that_runs_it(tmp_path):
    try:
        binary = haproxy_binary()
    except PlatformError as err:
        pytest.skip(str(err))
    argv = ingress_command(binary, tmp_path, 18000, 18001, {"a100-mig": 31001})
    check = subprocess.run([binary, "-c", "-f", argv[-1]], capture_output=True, text=True,
                           timeout=30, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_supervisor_restarts_the_head_first_and_only_dead_nodes(tmp_path):
    cluster = LocalCluster(state_dir=tmp_path)
    st = state(cluster, ha=True)
    dead = {"ray-head-cpu", "ray-worker-h100-timeslice"}
    # pid 1 is alive but is not `ray` (alive() checks the command): a recorded pid that now
    # belongs to something else counts as dead; this process itself stands for a live node.
    import os
    import sys

    for i, n in enumerate(cluster.node_plan()):
        name = f"ray-{n.role}-{n.pool}"
        st.processes.append(ManagedProcess(name, 1 if name in dead else os.getpid(),
                                           [sys.executable], f"log{i}"))
    assert dead_pools(st) == ["cpu", "h100-timeslice"]
    node, proc = node_of(st, "h100-timeslice")
    assert node.role == "worker" and proc.name == "ray-worker-h100-timeslice"
    with pytest.raises(PlatformError, match="pool: 'nosuch' has no Ray node"):
        node_of(st, "nosuch")
