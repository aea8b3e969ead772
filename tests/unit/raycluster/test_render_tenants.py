"""A serve config's tenants on EKS: each tenant's keys come from its own key of the API keys
Secret (``tenant-<name>``), which External Secrets fills from Secrets Manager, as the env
variable or the file the tenant names; the RayService still validates against KubeRay's CRD.
Nothing secret is rendered."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from raycluster.kuberay import API_KEYS_SECRET
from raycluster.render import load_inputs, render_objects
from raycluster.spec import SpecError
from serve.config import ServeAppConfig
from tests.support.crds import strict as _strict

REPO = Path(__file__).resolve().parents[3]


def serve_doc() -> dict:
    doc = yaml.safe_load((REPO / "serve" / "configs" / "eks-vllm.yaml").read_text())
    doc["tenants"] = [
        {"name": "research", "api_keys": {"file": "/etc/rayplane/tenants/research"},
         "requests_per_minute": 60},
        {"name": "prod", "api_keys": {"env": "RAYPLANE_PROD_KEYS"}, "tokens_per_minute": 9000},
        {"name": "ops", "api_keys": {"file": "/etc/rayplane/tenants/ops"}}]
    return doc


def render_with(catalog, env, doc: dict) -> tuple[list[dict], str]:
    inputs = load_inputs(env, REPO)
    svc = env.services[0]
    inputs.serve[svc.config] = ServeAppConfig.parse(doc)
    return render_objects(catalog, env, inputs), svc.namespace




def test_tenant_keys_reach_every_serve_pod_from_the_api_keys_secret(catalog, env, schemas_dir):
    objects, ns = render_with(catalog, env, serve_doc())
    service = next(o for o in objects if o["kind"] == "RayService"
                   and o["metadata"]["namespace"] == ns)
    crd = yaml.load((schemas_dir / "kuberay-v1.7.0" / "ray.io_rayservices.yaml").read_text(),
                    Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]
    errors = list(jsonschema.Draft7Validator(
        _strict(schema["openAPIV3Schema"])).iter_errors(service))
    assert not errors, [e.message for e in errors[:3]]
    cluster = service["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"],
                 *(g["template"] for g in cluster["workerGroupSpecs"])]
    for template in templates:
        spec = template["spec"]
        container = spec["containers"][0]
        assert {"name": "RAYPLANE_PROD_KEYS", "valueFrom": {"secretKeyRef": {
            "name": API_KEYS_SECRET, "key": "tenant-prod"}}} in container["env"]
        # Two key files in one folder: one volume of the Secret carries both.
        (mount,) = [m for m in container["volumeMounts"]
                    if m["mountPath"] == "/etc/rayplane/tenants"]
        assert mount["readOnly"] is True
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"]["secretName"] == API_KEYS_SECRET
        assert volume["secret"]["items"] == [{"key": "tenant-research", "path": "research"},
                                             {"key": "tenant-ops", "path": "ops"}]
        names = [v["name"] for v in spec["volumes"]]
        assert len(names) == len(set(names))
        paths = [m["mountPath"] for m in container["volumeMounts"]]
        assert len(paths) == len(set(paths))
    # The Secret's tenant keys come from Secrets Manager, next to the namespace's own keys.
    (secret,) = [o for o in objects if o["kind"] == "ExternalSecret"
                 and o["metadata"]["name"] == API_KEYS_SECRET
                 and o["metadata"]["namespace"] == ns]
    prefix = f"{env.secrets_manager_prefix}/{ns}/serve-api-keys"
    assert {d["secretKey"]: d["remoteRef"]["key"] for d in secret["spec"]["data"]} == {
        "keys": prefix, "tenant-ops": f"{prefix}/ops", "tenant-prod": f"{prefix}/prod",
        "tenant-research": f"{prefix}/research"}
    # The serve config inside the RayService names the keys, never holds one.
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    limits = serve_config["applications"][0]["args"]["limits"]
    assert [t["name"] for t in limits["tenants"]] == ["research", "prod", "ops"]
    assert "rp-" not in json.dumps(serve_config)


def test_a_tenant_key_file_in_a_folder_mounted_for_something_else_is_refused(catalog, env):
    doc = serve_doc()
    doc["tenants"][2]["api_keys"]["file"] = "/mnt/shared/ops"  # the shared EFS volume
    with pytest.raises(SpecError) as err:
        render_with(catalog, env, doc)
    assert "tenants[2].api_keys.file: '/mnt/shared/ops' lies in /mnt/shared, where the pods " \
        "mount 'shared' already" in str(err.value)
    assert "\n" not in str(err.value)
