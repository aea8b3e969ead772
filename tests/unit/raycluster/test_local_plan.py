"""The local cluster's plan and its refusals, without starting anything."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from raycluster.errors import PlatformError
from raycluster.local import DEFAULT_PORTS, PORT_ENV, LocalCluster, free_port
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


def test_every_node_gets_its_own_haproxy_files_ports_and_the_loopback_wrapper(tmp_path):
    from raycluster.local import LocalState
    from raycluster.local.nodes import node_env

    cluster = LocalCluster(state_dir=tmp_path)
    st = LocalState(state_dir=str(tmp_path), ports=cluster.ports, temp_dir=str(cluster.temp_dir))
    envs = {n.pool: node_env(cluster, n, st) for n in cluster.node_plan()}
    folders = set()
    for env in envs.values():
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
        folders.add(env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"])
        for key in ("CONFIG_FILE_LOC", "SOCKET_PATH", "SERVER_STATE_FILE", "METRICS_SOCKET_PATH"):
            assert env[f"RAY_SERVE_HAPROXY_{key}"].startswith(
                f"{env['RAY_SERVE_HAPROXY_SERVER_STATE_BASE']}/")
        # HAProxy's socket paths are <folder>/<56-char node id>/<name>; it allows 97 bytes
        folder = env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]
        assert len(f"{folder}/{'0' * 56}/metrics.sock") <= 97
        assert os.access(env["RAY_SERVE_HAPROXY_BINARY_PATH"], os.X_OK)
    assert len(folders) == len(envs) and all(f.startswith(f"{cluster.haproxy_dir}/")
                                             for f in folders)
    # They share one host: no two nodes share a stats, exporter or worker proxy port.
    ports = [env[k] for env in envs.values() for k in env if k.endswith("_PORT")]
    assert len(ports) == len(set(ports)) and "8404" not in ports and "9101" not in ports
    assert "RAY_SERVE_WORKER_PROXY_HTTP_PORT" not in envs["cpu"], "the head keeps serve_head"
    assert all("RAY_SERVE_WORKER_PROXY_HTTP_PORT" in envs[p] for p in envs if p != "cpu")
    ray_proxy = LocalCluster(state_dir=tmp_path, serve_proxy="ray")
    assert not any(k.startswith("RAY_SERVE_HAPROXY")
                   for k in node_env(ray_proxy, ray_proxy.node_plan()[0], st))
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


# -- PostgreSQL ------------------------------------------------------------------------------


def test_postgres_listens_on_loopback_only_with_password_auth(tmp_path):
    from raycluster.local.postgres import initdb_argv, postgres_argv

    argv = postgres_argv(Path("/pg/bin"), tmp_path / "data", 6543, Path("/tmp/rppg-x"))
    assert argv[:3] == ["/pg/bin/postgres", "-D", str(tmp_path / "data")]
    settings = dict(a.split("=", 1) for a in argv if "=" in a)
    assert settings["listen_addresses"] == "127.0.0.1"
    assert settings["unix_socket_directories"] == "/tmp/rppg-x"
    assert argv[argv.index("-p") + 1] == "6543"
    init = initdb_argv(Path("/pg/bin"), tmp_path / "data", tmp_path / "pw")
    assert init[0] == "/pg/bin/initdb" and "--auth=scram-sha-256" in init
    assert f"--pwfile={tmp_path / 'pw'}" in init and init[3:5] == ["-U", "rayplane"]


def test_postgres_has_a_port_and_its_secrets_stay_out_of_env_and_status(tmp_path):
    cluster = LocalCluster(state_dir=tmp_path, ports={"postgres": 6543})
    assert DEFAULT_PORTS["postgres"] == 5432 and PORT_ENV["postgres"] == "RAYPLANE_POSTGRES_PORT"
    env = cluster.env()
    assert env["RAYPLANE_POSTGRES_DSN_FILE"] == str(tmp_path / "postgres_dsn")
    (tmp_path / "postgres_password").write_text("s3cret-pw")
    assert cluster.postgres.dsn() == "postgresql://rayplane:s3cret-pw@127.0.0.1:6543/agents"
    info = cluster.status()
    assert info["postgres"] == "postgresql://rayplane:***@127.0.0.1:6543/agents"
    assert "s3cret-pw" not in json.dumps(info) + json.dumps(cluster.env())
    # its socket goes in a short folder of the platform's own, not the system's /var/run
    assert str(cluster.postgres.socket_dir).startswith("/tmp/rppg-")
    assert len(f"{cluster.postgres.socket_dir}/.s.PGSQL.65535.lock") < 107


def test_postgres_port_follows_its_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYPLANE_POSTGRES_PORT", "15432")
    assert LocalCluster(state_dir=tmp_path).postgres.url == "127.0.0.1:15432"


def _fake_bindir(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in ("initdb", "postgres"):
        (folder / name).write_text("#!/bin/sh\n")
        (folder / name).chmod(0o755)
    return folder


def test_postgres_binaries_are_found_off_path_newest_version_first(tmp_path, monkeypatch):
    from raycluster.local.postgres import find_bindir

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no pg_config, no initdb on PATH
    _fake_bindir(tmp_path / "lib" / "15" / "bin")
    newest = _fake_bindir(tmp_path / "lib" / "16" / "bin")
    (tmp_path / "lib" / "17" / "bin").mkdir(parents=True)  # a client-only install
    assert find_bindir([tmp_path / "lib"]) == newest


def test_up_without_postgresql_says_how_to_install_it_and_starts_nothing(tmp_path, monkeypatch):
    from raycluster.local import postgres

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(postgres, "DEBIAN_ROOTS", (tmp_path / "none",))
    cluster = LocalCluster(state_dir=tmp_path / "state",
                           ports={name: free_port() for name in DEFAULT_PORTS})
    with pytest.raises(PlatformError, match=r"initdb, postgres.*not found.*make system-deps.*"
                                            r"apt-get install postgresql-15") as err:
        cluster.up()
    assert "\n" not in str(err.value)
    assert cluster.state() is None, "nothing was started"


def test_as_root_postgres_runs_as_an_unprivileged_account():
    from raycluster.local.postgres import service_user

    assert service_user(euid=1000) is None, "not root: PostgreSQL runs as the user"
    user = service_user(euid=0)
    assert user is not None and user.uid != 0 and user.name in ("postgres", "nobody")
    assert user.popen_kwargs() == {"user": user.uid, "group": user.gid, "extra_groups": []}


def test_reachable_follows_the_search_bits_of_every_folder(tmp_path):
    from raycluster.local.postgres import reachable

    private = tmp_path / "private"
    (private / "state").mkdir(parents=True)
    private.chmod(0o700)
    other = 65534 if os.geteuid() != 65534 else 65533
    owner = private.stat().st_uid
    assert reachable(private / "state", owner, -1)
    assert not reachable(private / "state", other, other)
    # a folder that does not exist yet: its deepest existing ancestor counts
    assert not reachable(private / "state" / "not-yet", other, other)
    assert reachable(Path("/usr/lib/not-yet"), other, other)


def test_system_data_of_a_deleted_state_folder_is_swept(tmp_path):
    from raycluster.local.postgres import sweep_system_data

    kept, gone = tmp_path / "a", tmp_path / "b"
    kept.mkdir()
    (kept / "postgres_password").write_text("pw")
    for state, digest in ((kept, "1"), (gone, "2")):
        (tmp_path / "sys" / f"postgres-{digest}" / "data").mkdir(parents=True)
        (tmp_path / "sys" / f"postgres-{digest}" / "state_dir").write_text(str(state))
    assert sweep_system_data(tmp_path / "sys") == [tmp_path / "sys" / "postgres-2"]
    assert (tmp_path / "sys" / "postgres-1" / "data").is_dir()


def test_a_stop_signal_is_recorded_and_old_state_files_still_load(tmp_path):
    from raycluster.local import LocalState, ManagedProcess

    st = LocalState(state_dir=str(tmp_path), ports={}, temp_dir="/tmp/x",
                    processes=[ManagedProcess("postgres", 1, ["postgres"], "log", "SIGINT")])
    st.save()
    assert LocalState.load(tmp_path).processes[0].stop_signal == "SIGINT"
    data = json.loads((tmp_path / "state.json").read_text())
    del data["processes"][0]["stop_signal"]
    (tmp_path / "state.json").write_text(json.dumps(data))
    assert LocalState.load(tmp_path).processes[0].stop_signal == ""


def test_restart_service_refuses_ray_nodes_and_unknown_names(tmp_path):
    with pytest.raises(PlatformError, match="nosuch is not a running service"):
        LocalCluster(state_dir=tmp_path).restart_service("nosuch")
