"""The served model is the one the MLflow registry's alias names: promoting a new version and
redeploying serves the new version; a missing alias is refused before anything deploys."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from openai import OpenAI

from tests.integration.conftest import rayplane
from tests.support import tiny_model as tm

REGISTERED = "serve-registry-tiny"
APP, PREFIX = "registry-tests", "/registry-tests"
pytestmark = pytest.mark.timeout(900)


def ask_version(client: OpenAI) -> tuple[str, str]:
    r = client.chat.completions.create(model="tiny-chat", messages=tm.VERSION_QUESTION,
                                       temperature=0, max_tokens=20)
    return r.choices[0].message.content, client.models.list().data[0].model_extra["root"]


@pytest.mark.slow
def test_promoting_a_version_and_redeploying_serves_it(local_cluster, cluster_env, tmp_path):
    v1 = tm.register_model(tm.cached_tiny_model("1"), REGISTERED,
                           tracking_uri=local_cluster.mlflow_uri)
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(tm.serve_config_yaml(name=APP, source=f"models:/{REGISTERED}@champion",
                                        pool="a100-timeslice", route_prefix=PREFIX,
                                        api_key_file=local_cluster.api_key_path))
    client = OpenAI(base_url=f"{local_cluster.serve_url}{PREFIX}/v1", timeout=60,
                    api_key=local_cluster.api_key_path.read_text().strip())
    try:
        out = rayplane(cluster_env, "serve", "up", str(cfg))
        assert out.returncode == 0, out.stderr + out.stdout
        assert ask_version(client) == (tm.version_reply("1"), f"models:/{REGISTERED}/{v1}")

        # A new version registered as a candidate changes nothing until it is promoted.
        v2 = tm.register_model(tm.cached_tiny_model("2"), REGISTERED, alias="candidate",
                               tracking_uri=local_cluster.mlflow_uri)
        MlflowClient(local_cluster.mlflow_uri).set_registered_model_alias(
            REGISTERED, "champion", v2)
        assert ask_version(client)[0] == tm.version_reply("1")  # still the deployed one
        out = rayplane(cluster_env, "serve", "up", str(cfg))
        assert out.returncode == 0, out.stderr + out.stdout
        assert f"models:/{REGISTERED}/{v2}" in out.stdout
        assert ask_version(client) == (tm.version_reply("2"), f"models:/{REGISTERED}/{v2}")

        # An alias that does not exist: one line naming the field and the aliases there are.
        out = rayplane(cluster_env, "serve", "up", str(cfg), "--source",
                       f"models:/{REGISTERED}@champoin")
        assert out.returncode == 2
        assert f"models[0].source: 'models:/{REGISTERED}@champoin': model '{REGISTERED}' " \
               "has no alias 'champoin'; aliases: candidate, champion" in out.stderr
        assert ask_version(client)[0] == tm.version_reply("2")  # nothing was deployed
    finally:
        rayplane(cluster_env, "serve", "down", APP, timeout=120)
