"""The platform's PostgreSQL and the agents' checkpointer on it, for real: the DSN the platform
hands out connects, nothing else does, the server is on loopback only, a LangGraph thread
outlives its checkpointer (another process continues it), and one pool outlives a PostgreSQL
restart."""

from __future__ import annotations

import asyncio
import json
import operator
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated, TypedDict

import psycopg
import pytest
from langgraph.graph import END, START, StateGraph

from agents.checkpoint import (
    DSN_FILE_ENV,
    aclose_checkpointer,
    async_postgres_checkpointer,
    close_checkpointer,
    dsn_from_env,
    postgres_checkpointer,
)
from raycluster.local import LocalCluster
from tests.integration.conftest import REPO, rayplane


class Steps(TypedDict):
    steps: Annotated[list[str], operator.add]


def build_graph(checkpointer):
    """Two nodes, each adding its name: every run of a thread adds ["a", "b"]."""
    builder = StateGraph(Steps)
    builder.add_node("a", lambda state: {"steps": ["a"]})
    builder.add_node("b", lambda state: {"steps": ["b"]})
    builder.add_edge(START, "a")
    builder.add_edge("a", "b")
    builder.add_edge("b", END)
    return builder.compile(checkpointer=checkpointer)


def thread(name: str) -> dict:
    return {"configurable": {"thread_id": f"{name}-{os.getpid()}"}}


@pytest.fixture(scope="module")
def dsn(cluster_env: dict[str, str]) -> str:
    return dsn_from_env(cluster_env)


def postmaster(cluster: LocalCluster):
    return next(p for p in cluster.state().processes if p.name == "postgres")


def test_the_dsn_file_is_private_and_connects_to_the_agents_database(local_cluster, cluster_env,
                                                                      dsn):
    path = Path(cluster_env[DSN_FILE_ENV])
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        assert conn.execute("SELECT current_database()").fetchone()[0] == "agents"
        assert conn.execute("SHOW listen_addresses").fetchone()[0] == "127.0.0.1"
        assert conn.execute("SHOW password_encryption").fetchone()[0] == "scram-sha-256"
    # PostgreSQL never runs as root (it refuses to): as root, rayplane runs it as an account
    uid = int(next(line for line in Path(f"/proc/{postmaster(local_cluster).pid}/status")
                   .read_text().splitlines() if line.startswith("Uid:")).split()[1])
    assert uid != 0
    if os.geteuid() != 0:
        assert uid == os.geteuid()


def test_a_wrong_password_is_refused(local_cluster, dsn):
    wrong = dsn.replace(local_cluster.postgres.password(), "not-the-password")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong, connect_timeout=10)
    # over the Unix socket too: no trust anywhere
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(host=str(local_cluster.postgres.socket_dir),
                        port=local_cluster.ports["postgres"], user="rayplane",
                        password="not-the-password", dbname="agents", connect_timeout=10)


def listeners(port: int) -> list[str]:
    """Local addresses of the listening TCP sockets on ``port`` (from /proc/net)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hexport = local.split(":")
            if state == "0A" and int(hexport, 16) == port:
                found.append(address)
    return found


def test_it_listens_on_loopback_only(local_cluster):
    assert listeners(local_cluster.ports["postgres"]) == ["0100007F"]  # 127.0.0.1, no IPv6


def test_the_password_is_in_no_state_env_or_status(local_cluster, cluster_env):
    password = local_cluster.postgres.password()
    assert len(password) >= 32
    assert password not in (local_cluster.state_dir / "state.json").read_text()
    out = rayplane(cluster_env, "env", "--state-dir", str(local_cluster.state_dir))
    assert f"export {DSN_FILE_ENV}=" in out.stdout and password not in out.stdout
    status = rayplane(cluster_env, "status", "--json", "--state-dir", str(local_cluster.state_dir))
    info = json.loads(status.stdout)
    assert info["postgres"] == (f"postgresql://rayplane:***@127.0.0.1:"
                                f"{local_cluster.ports['postgres']}/agents")
    assert password not in status.stdout
    assert password not in " ".join(postmaster(local_cluster).argv)


CONTINUE = """
import json, sys
from agents.checkpoint import postgres_checkpointer
from tests.integration.test_postgres import build_graph
saver = postgres_checkpointer()
graph = build_graph(saver)
config = {"configurable": {"thread_id": sys.argv[1]}}
before = graph.get_state(config).values["steps"]
after = graph.invoke({"steps": ["c"]}, config)["steps"]
print(json.dumps({"before": before, "after": after}))
"""


def test_a_thread_outlives_its_checkpointer_and_another_process_continues_it(cluster_env, dsn):
    config = thread("continue")
    saver = postgres_checkpointer(dsn)
    try:
        assert build_graph(saver).invoke({"steps": ["start"]}, config)["steps"] == \
            ["start", "a", "b"]
    finally:
        close_checkpointer(saver)
    # a new checkpointer, a new pool: the thread is there
    saver = postgres_checkpointer(dsn)
    try:
        assert build_graph(saver).get_state(config).values["steps"] == ["start", "a", "b"]
    finally:
        close_checkpointer(saver)
    # a new process (the DSN from `rayplane env`'s file) continues it
    res = subprocess.run([sys.executable, "-c", CONTINUE, config["configurable"]["thread_id"]],
                         env=cluster_env, cwd=REPO, capture_output=True, text=True,
                         timeout=180, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    seen = json.loads(res.stdout.strip().splitlines()[-1])
    assert seen == {"before": ["start", "a", "b"], "after": ["start", "a", "b", "c", "a", "b"]}


@pytest.mark.parametrize("how", ["restart", "kill"])
def test_the_pool_survives_a_postgres_restart(local_cluster, dsn, how):
    config = thread(f"restart-{how}")
    saver = postgres_checkpointer(dsn)
    graph = build_graph(saver)
    try:
        graph.invoke({"steps": ["one"]}, config)
        old = postmaster(local_cluster)
        if how == "kill":  # a crash: no shutdown at all, crash recovery on the next start
            os.kill(old.pid, signal.SIGKILL)
        new = local_cluster.restart_service("postgres")
        assert new.pid != old.pid and not old.alive()
        assert postmaster(local_cluster).pid == new.pid, "state.json follows the restart"
        # the same saver, the same pool: its broken connections are replaced on checkout
        assert graph.invoke({"steps": ["two"]}, config)["steps"] == \
            ["one", "a", "b", "two", "a", "b"]
        assert graph.get_state(config).values["steps"][-3:] == ["two", "a", "b"]
    finally:
        close_checkpointer(saver)
    assert local_cluster.is_up()


def test_the_async_checkpointer_keeps_a_thread(dsn):
    config = thread("async")

    async def run() -> tuple[list[str], list[str]]:
        saver = await async_postgres_checkpointer(dsn)
        try:
            first = (await build_graph(saver).ainvoke({"steps": ["x"]}, config))["steps"]
        finally:
            await aclose_checkpointer(saver)
        saver = await async_postgres_checkpointer(dsn)
        try:
            state = await build_graph(saver).aget_state(config)
        finally:
            await aclose_checkpointer(saver)
        return first, state.values["steps"]

    assert asyncio.run(run()) == (["x", "a", "b"], ["x", "a", "b"])
