"""The local cluster's plan and its refusals, without starting anything."""

from __future__ import annotations

import os
import socket

import pytest

from raycluster.cli import UserError
from raycluster.local import DEFAULT_PORTS, LocalCluster, free_port


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
        with pytest.raises(UserError, match=rf"port {taken} \(dashboard\) is in use by another "
                                            r"process.*RAYPLANE_DASHBOARD_PORT"):
            cluster.up()
    assert cluster.state() is None, "nothing was started"


def test_down_without_a_platform_does_nothing(tmp_path):
    assert LocalCluster(state_dir=tmp_path).down() == []
