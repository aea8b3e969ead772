"""`rayplane demo` (what `make demo` runs) on the local platform, with a CI-size training
config so it fits the suite (train/configs/ci-demo.yaml: the CI model, half its steps, no
gate; test_train_fit.py asserts the CI size passes its gate): a smoke job on every pool, the
model trained through `ray job submit`, evaluated, registered (candidate) and promoted
(champion), served from the registry and asked one question, with the endpoint's URL printed;
then the agents app deployed and its `tools` graph asked the demo's two questions through the
LangGraph server API, each run's MLflow trace linked. (The CI-size model is too weak to answer
them right; the demo model's answers are in docs/benchmarks.md.)"""

from __future__ import annotations

import re

import pytest
from openai import OpenAI

from raycluster.catalog import load_catalog
from tests.integration.conftest import REPO, rayplane
from train.config import TrainConfig

# About 5 minutes on 2 cores: a training run, a registry round trip and a Serve deploy.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
TRAIN = "train/configs/ci-demo.yaml"
CI = TrainConfig.from_file(REPO / TRAIN)
MODEL = CI.mlflow.registered_model  # the model serve/configs/local.yaml serves


def test_demo_trains_registers_promotes_serves_and_chats(local_cluster, cluster_env):
    env = {**cluster_env, "COLUMNS": "200"}  # rich wraps at 80 columns without a terminal
    try:
        proc = rayplane(env, "demo", "--state-dir", str(local_cluster.state_dir),
                        "--train", TRAIN, timeout=1200)
        out = proc.stdout
        assert proc.returncode == 0, out[-4000:] + proc.stderr[-2000:]
        for pool in load_catalog().pools:
            assert f"ok: ran on the {pool.name} node" in out
        assert f"[rank 0] step {CI.steps}/{CI.steps}" in out  # training progress is shown
        assert re.search(rf"held-out exact match [\d.]+% of {CI.eval.max_examples} "
                         "conversations", out)
        version = re.search(rf"registered {MODEL} version (\d+) \(alias candidate\)", out)[1]
        assert f"promoted version {version} to champion" in out

        base_url = f"{local_cluster.serve_url}/v1"
        assert f"{MODEL} (version {version}) at {base_url}" in out
        assert re.search(r"assistant \((stop|length|tool_calls)\): \S", out)

        from mlflow import MlflowClient

        registry = MlflowClient(local_cluster.mlflow_uri, registry_uri=local_cluster.mlflow_uri)
        assert registry.get_model_version_by_alias(MODEL, "champion").version == version
        client = OpenAI(base_url=base_url, api_key=local_cluster.api_key_path.read_text().strip())
        (served,) = client.models.list().data
        assert served.id == MODEL and served.model_extra["root"] == f"models:/{MODEL}/{version}"

        # The agent step: both questions asked, each run's trace in the platform's MLflow.
        assert "user: What is 12 times 7?" in out
        assert "user: How many free GPU units does the a100-mig pool have?" in out
        traces = re.findall(rf"trace: ({re.escape(local_cluster.mlflow_uri)}/#/experiments/"
                            r"\d+/traces\?selectedEvaluationId=tr-[0-9a-f]+)", out)
        assert len(traces) == 2, out[-3000:]
        assert f"agents API {local_cluster.agents_url} (langgraph-sdk)" in out
    finally:
        for what, app in (("agents", None), ("serve", "openai")):
            args = [what, "down"] + ([app] if app else [])
            rayplane(env, *args, "--state-dir", str(local_cluster.state_dir), timeout=120)
