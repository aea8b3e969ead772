"""What the committed infrastructure files say, read the way the infra tests (tests/unit/infra,
tests/integration/test_terraform.py) need it: the Helm releases and the service accounts they
run as, the rendered objects, a Terraform variable's default, and a pool the seed catalog lacks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from raycluster.terraform import TERRAFORM_DIR

ROOT = TERRAFORM_DIR.parents[1]
HELM_DIR = ROOT / "infra" / "helm"
K8S_DIR = ROOT / "infra" / "k8s"

#: A GPU pool that is not in the seed catalog: adding it must need no Terraform edit (Karpenter
#: provisions it; Terraform gets one more karpenter_pools entry).
A10G_POOL = {
    "name": "a10g-inference", "instance_types": ["g5.12xlarge"], "capacity_type": "SPOT",
    "min_nodes": 0, "max_nodes": 3, "sharing": {"mode": "time-slicing", "replicas": 2},
    "taints": [{"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}],
    "worker": {"gpu_units": 1, "cpus": 8, "memory_gib": 32},
    "priority_class": "development", "namespace": "inference",
}

#: A pool without GPUs that is not in the seed catalog: a new EKS managed node group.
CPU_POOL = {
    "name": "cpu-batch", "instance_types": ["m7i.4xlarge"], "capacity_type": "ON_DEMAND",
    "min_nodes": 1, "max_nodes": 3, "disk_size_gib": 100,
    "worker": {"cpus": 4, "memory_gib": 16},
    "priority_class": "development", "namespace": "agentic",
}


def tf_default(variables_tf: Path, name: str):
    """The default of a variable, for one-line JSON-compatible defaults (strings, lists, bools,
    numbers)."""
    block = re.search(rf'^variable "{name}" \{{(.*?)^\}}', variables_tf.read_text(),
                      re.DOTALL | re.MULTILINE)
    assert block, f"{variables_tf}: no variable {name}"
    value = re.search(r"^  default\s*=\s*(.+)$", block.group(1), re.MULTILINE)
    assert value, f"{variables_tf}: {name} has no default"
    return json.loads(value.group(1))


def helm_release(name: str) -> dict:
    (release,) = [r for r in yaml.safe_load((HELM_DIR / "charts.yaml").read_text())["releases"]
                  if r["name"] == name]
    return release


def helm_values(name: str) -> dict:
    return yaml.safe_load((HELM_DIR / helm_release(name)["values"]).read_text())


def external_secrets_service_account() -> str:
    """namespace/name of the External Secrets controller: the release namespace and the
    values' serviceAccount.name."""
    release = helm_release("external-secrets")
    return f"{release['namespace']}/{helm_values('external-secrets')['serviceAccount']['name']}"


def velero_service_account() -> str:
    """namespace/name of the Velero server. The chart names it serviceAccount.server.name, or
    else <fullname>-server, where fullname is the release name when it contains the chart name
    (velero chart, templates/_helpers.tpl)."""
    release = helm_release("velero")
    name = helm_values("velero")["serviceAccount"]["server"].get("name")
    if not name:
        fullname = (release["name"] if release["chart"] in release["name"]
                    else f"{release['name']}-{release['chart']}")
        name = f"{fullname}-server"
    return f"{release['namespace']}/{name}"


def irsa_subject(service_account: str) -> str:
    """The OIDC subject an IRSA trust names for ``namespace/name``."""
    namespace, name = service_account.split("/")
    return f"system:serviceaccount:{namespace}:{name}"


def rendered(file_name: str) -> list[dict]:
    """The objects of one file of the committed infra/k8s folder."""
    return [d for d in yaml.safe_load_all((K8S_DIR / file_name).read_text()) if d]


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """Every pod template inside a rendered object (head and worker groups, RayJob submitters,
    at any depth: RayCronJob -> jobTemplate -> rayClusterSpec), with where it is."""
    found = []

    def walk(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("template", "submitterPodTemplate") and isinstance(value, dict) \
                        and "containers" in value.get("spec", {}):
                    found.append((f"{path}.{key}", value))
                else:
                    walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    walk(obj.get("spec", {}), f"{obj['kind']}/{obj['metadata']['name']}.spec")
    return found


def aws_secret_store() -> dict:
    """The rendered ClusterSecretStore that reads Secrets Manager (through the External Secrets
    IRSA role); others read in-cluster Secrets (the kubernetes provider)."""
    (store,) = [s for s in rendered("02-clustersecretstore.yaml") if "aws" in s["spec"]["provider"]]
    return store


def aws_external_secrets() -> list[dict]:
    """The rendered ExternalSecrets that read Secrets Manager (through ``aws_secret_store``)."""
    name = aws_secret_store()["metadata"]["name"]
    return [es for es in rendered("08-externalsecret.yaml")
            if es["spec"]["secretStoreRef"] == {"kind": "ClusterSecretStore", "name": name}]
