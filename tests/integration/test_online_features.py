"""Online features where they are used, on the session's platform: the agents' job_estimate
tool answers from the job-duration model trained and registered this session (H2's
``duration_model`` fixture) with the pool's load as the platform's online store holds it
(``feature_store_ready``: `rayplane features apply` + `materialize` into PostgreSQL), called
through the MCP server as an agent calls it. (A served model attaching online features to a
request is tested on test_serve_openai.py's app, which carries ``online_features``.)"""

from __future__ import annotations

import asyncio

import pytest

from agents.platform import PlatformContext, job_estimate

pytestmark = pytest.mark.timeout(900)

POOL = "h100-timeslice"
LOAD = ("running_units", "pending_units", "free_units", "gpu_utilization", "mean_wait_1h_s")
FEATURES = [f"pool_load:{name}" for name in LOAD]


@pytest.fixture(scope="module")
def platform_env(cluster_env, feature_store_ready):
    """This process's environment as `rayplane env` sets it (the feature store is found from
    the state folder and the platform's DSN file, as the tools and replicas find it)."""
    mp = pytest.MonkeyPatch()
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI", "RAYPLANE_CATALOG",
                "RAYPLANE_STATE_DIR", "RAYPLANE_POSTGRES_DSN_FILE"):
        if key in cluster_env:
            mp.setenv(key, cluster_env[key])
    yield cluster_env
    mp.undo()


@pytest.fixture(scope="module")
def online_now(platform_env):
    """The pool's pool_load values the online store holds now, read with Feast directly."""
    from features.store import feature_store

    store = feature_store()

    def read(pool: str = POOL) -> dict:
        row = store.get_online_features(features=FEATURES, entity_rows=[{"pool": pool}]
                                        ).to_dict()
        return {name: row[name][0] for name in LOAD}

    return read


def test_job_estimate_answers_from_the_registered_model_and_the_online_store(
        platform_env, duration_model, online_now, local_cluster):
    from mcp import Client
    from mlflow import MlflowClient

    from agents.mcp_server import build_server
    from train.duration_model import load_registered

    async def ask():
        async with Client(build_server(PlatformContext.from_env(platform_env))) as client:
            return await client.call_tool("job_estimate",
                                          {"pool": POOL, "requested_units": 2,
                                           "model_size_b": 13})

    called = asyncio.run(ask())
    assert not called.is_error
    estimate = called.structured_content
    assert "error" not in estimate, estimate
    # Its inputs are the online store's current values for the pool.
    assert estimate["pool_load"] == online_now(POOL)
    # Its model is the version the registry's alias names, and its numbers are that model's.
    model = estimate["model"]
    registry = MlflowClient(tracking_uri=local_cluster.mlflow_uri)
    assert model["version"] == str(registry.get_model_version_by_alias(
        "job-duration", model["alias"]).version)
    reference = load_registered(local_cluster.mlflow_uri, alias=model["alias"])
    (expected,) = reference.predict([{"requested_units": 2, "model_size_b": 13.0,
                                      **estimate["pool_load"], "pool": POOL}])
    assert estimate["expected_wait_s"] == round(expected["queue_wait_s"], 1)
    assert estimate["expected_duration_s"] == round(expected["duration_s"], 1)
    assert estimate["expected_wait"] and estimate["expected_duration"]
    # A busier request waits at least as long: the model reads the request, not a constant.
    bigger = job_estimate(POOL, 16, 70.0, context=PlatformContext.from_env(platform_env))
    assert bigger["pool_load"] == estimate["pool_load"]
    assert (bigger["expected_wait_s"], bigger["expected_duration_s"]) != \
        (estimate["expected_wait_s"], estimate["expected_duration_s"])
