"""The rendered folder: it equals the committed infra/k8s (drift), every object of every kind
validates against its CRD in ../shared/schemas or the Kubernetes OpenAPI schema of the targeted
EKS version (none left unvalidated), every pod template meets the `restricted` Pod Security
Standard, and the CLI writes and refuses bad input. (checkov's scan of this folder is in
tests/integration/test_checkov.py, the server-side apply in tests/e2e/test_apply.py.)"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from raycluster.render import (
    KIND_ORDER,
    file_name,
    load_inputs,
    read_objects,
    render_files,
    render_objects,
    write_objects,
)
from tests.support.crds import strict as _strict
from tests.support.infra import pod_templates

REPO = Path(__file__).resolve().parents[3]
COMMITTED = REPO / "infra" / "k8s"
#: Kinds validated by their CRDs in the KubeRay and prometheus-operator test below (their
#: misspelled-field check); every kind is validated in test_every_rendered_object_validates_...
CRD_KINDS = {"RayCluster", "RayJob", "RayService", "RayCronJob", "PrometheusRule"}


@pytest.fixture(scope="module")
def objects(catalog, env):
    return render_objects(catalog, env, load_inputs(env, REPO))


# -- drift and order -----------------------------------------------------------------------


def test_committed_folder_equals_a_fresh_render(objects, env):
    fresh = render_files(objects, env.name)
    committed = {p.name: p.read_text() for p in COMMITTED.glob("[0-9][0-9]-*.yaml")}
    assert sorted(committed) == sorted(fresh), \
        "infra/k8s has other files than a render: run `rayplane render --env production " \
        "--out infra/k8s`"
    for name, text in fresh.items():
        assert committed[name] == text, f"infra/k8s/{name} drifted from the catalog: re-render"


def test_rendering_twice_gives_the_same_bytes(catalog, env):
    inputs = load_inputs(env, REPO)
    first = render_files(render_objects(catalog, env, inputs), env.name)
    second = render_files(render_objects(catalog, env, inputs), env.name)
    assert first == second


def test_one_file_per_kind_in_apply_order(objects):
    kinds = [o["kind"] for o in objects]
    assert kinds == sorted(kinds, key=KIND_ORDER.index)
    assert kinds.index("Namespace") < kinds.index("NetworkPolicy") < kinds.index("RayCluster")
    names = sorted(render_files(objects, "production"))
    assert names == sorted({file_name(k) for k in kinds})
    assert names[0] == "00-namespace.yaml"


def test_write_removes_files_of_kinds_no_longer_rendered_and_nothing_else(tmp_path, objects):
    (tmp_path / "99-oldkind.yaml").write_text("stale")
    (tmp_path / "README.md").write_text("keep me")
    write_objects(objects, tmp_path, "production")
    assert not (tmp_path / "99-oldkind.yaml").exists()
    assert (tmp_path / "README.md").read_text() == "keep me"
    assert [o["metadata"]["name"] for o in read_objects(tmp_path)] == \
        [o["metadata"]["name"] for o in objects]


# -- schemas -------------------------------------------------------------------------------


def test_the_core_schema_check_catches_a_misspelled_field(objects, env):
    quota = copy.deepcopy(next(o for o in objects if o["kind"] == "ResourceQuota"))
    quota["spec"]["hardd"] = quota["spec"].pop("hard")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(quota, env.kubernetes_version, strict=True)




@pytest.fixture(scope="module")
def crd_validators(schema_validators):
    """kind -> validator of the KubeRay and prometheus-operator kinds (their v1)."""
    return {kind: v for (api_version, kind), v in schema_validators.items()
            if kind in CRD_KINDS and api_version.endswith("/v1")}


def test_kuberay_and_gpu_operator_objects_validate_against_their_crds(objects, crd_validators):
    seen = set()
    for obj in objects:
        if obj["kind"] not in CRD_KINDS:
            continue
        seen.add(obj["kind"])
        errors = sorted(crd_validators[obj["kind"]].iter_errors(obj), key=lambda e: e.path)
        assert not errors, f"{obj['kind']}/{obj['metadata']['name']}: " + "; ".join(
            f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5])
    assert {"RayCluster", "RayService", "PrometheusRule"} <= seen


def test_the_crd_check_catches_a_misspelled_field(objects, crd_validators):
    cluster = copy.deepcopy(next(o for o in objects if o["kind"] == "RayCluster"))
    cluster["spec"]["authOption"] = cluster["spec"].pop("authOptions")
    assert list(crd_validators["RayCluster"].iter_errors(cluster))
    cluster = copy.deepcopy(next(o for o in objects if o["kind"] == "RayCluster"))
    cluster["spec"]["authOptions"]["mode"] = "password"
    assert list(crd_validators["RayCluster"].iter_errors(cluster))


def test_external_secrets_read_the_store_and_the_environments_prefix(objects, env):
    for es in (o for o in objects if o["kind"] == "ExternalSecret"):
        assert es["apiVersion"] == "external-secrets.io/v1"
        if es["metadata"]["name"] == "linkerd-identity-trust-roots":
            continue  # from cert-manager's Secret in the cluster (test_gitops)
        assert es["spec"]["secretStoreRef"] == {"kind": "ClusterSecretStore",
                                                "name": "aws-secrets-manager"}
        assert es["spec"]["target"]["name"] == es["metadata"]["name"]
        keys = {d["remoteRef"]["key"] for d in es["spec"]["data"]}
        if es["metadata"]["name"] in ("rayplane-agents-db", "mlflow-db"):
            # The password RDS manages lives outside the prefix, named by the environment
            # (Terraform output mlflow_db_secret_arn).
            assert keys <= {env.agents[0].database.secret, env.addons.mlflow_db_secret}
        else:
            assert all(k.startswith("rayplane/production/") for k in keys)


def _schema_validators(schemas_dir: Path, kinds: set[tuple[str, str]]
                       ) -> dict[tuple[str, str], jsonschema.Draft7Validator]:
    """(apiVersion, kind) -> a strict validator, for the CRDs in shared/schemas (any release
    folder) of the (group, kind) pairs asked; a CRD of several versions gives one per served
    version. The files are megabytes of YAML: only those asked for are parsed."""
    out = {}
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for path in sorted(schemas_dir.glob("*/*.yaml")):
        text = path.read_text()
        group = re.search(r"^  group: (\S+)", text, re.MULTILINE)
        kind = re.search(r"^    kind: (\w+)", text, re.MULTILINE)
        if not (group and kind) or (group[1], kind[1]) not in kinds:
            continue
        doc = yaml.load(text, Loader=loader)
        if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
            continue
        for version in doc["spec"]["versions"]:
            schema = version.get("schema", {}).get("openAPIV3Schema")
            if version.get("served", True) and schema:
                out[(f"{group[1]}/{version['name']}", kind[1])] = \
                    jsonschema.Draft7Validator(_strict(schema))
    return out


@pytest.fixture(scope="module")
def schema_validators(objects, schemas_dir):
    """Validators of every custom kind the render holds."""
    return _schema_validators(schemas_dir, {(o["apiVersion"].split("/")[0], o["kind"])
                                            for o in objects if "/" in o["apiVersion"]})


def schema_errors(obj: dict, validators: dict, kubernetes_version: str) -> list[str]:
    """Why ``obj`` is not valid: against its CRD in shared/schemas, or else the Kubernetes
    OpenAPI schema of the EKS version (kubernetes-validate, strict). A kind neither knows is an
    error too: nothing may be left unvalidated."""
    where = f"{obj['kind']}/{obj['metadata'].get('namespace', '-')}/{obj['metadata']['name']}"
    validator = validators.get((obj["apiVersion"], obj["kind"]))
    if validator is not None:
        return [f"{where}: {'.'.join(map(str, e.path))}: {e.message}"
                for e in sorted(validator.iter_errors(obj), key=lambda e: list(e.path))[:5]]
    try:
        kubernetes_validate.validate(obj, kubernetes_version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{where}: no schema for {obj['apiVersion']} {obj['kind']} in shared/schemas "
                f"or Kubernetes {kubernetes_version}: it cannot be checked"]
    except kubernetes_validate.ValidationError as err:
        return [f"{where}: {'.'.join(map(str, err.path))}: {err.message}"]
    return []


def test_every_rendered_object_validates_against_its_schema(objects, env, schema_validators):
    """Issue 15: every object of every kind, against its CRD (../shared/schemas) or the
    Kubernetes schema; a kind with no schema fails."""
    errors = [e for obj in objects for e in schema_errors(obj, schema_validators,
                                                           env.kubernetes_version)]
    assert not errors, "\n".join(errors)
    kinds = {o["kind"] for o in objects}
    assert {"Application", "AppProject", "Certificate", "ExternalSecret", "RayCluster",
            "Namespace", "NetworkPolicy", "ResourceQuota", "LimitRange", "PriorityClass",
            "PodDisruptionBudget", "ConfigMap", "ServiceAccount",
            "PersistentVolumeClaim"} <= kinds


def test_the_schema_check_leaves_nothing_unvalidated(objects, env, schema_validators):
    validators = schema_validators
    unknown = {"apiVersion": "example.io/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert "no schema" in schema_errors(unknown, validators, env.kubernetes_version)[0]
    app = copy.deepcopy(next(o for o in objects if o["kind"] == "Application"))
    app["spec"]["syncPolicy"]["syncOption"] = app["spec"]["syncPolicy"].pop("syncOptions")
    assert schema_errors(app, validators, env.kubernetes_version)


# -- restricted Pod Security Standard ------------------------------------------------------

_RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                       "persistentVolumeClaim", "projected", "secret"}


def restricted_violations(pod_spec: dict) -> list[str]:
    """The checks of the `restricted` profile (kubernetes.io/docs/concepts/security/
    pod-security-standards), field by field; an empty list means the pod is admitted."""
    out = []
    psc = pod_spec.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(key):
            out.append(f"spec.{key}")
    for vol in pod_spec.get("volumes", []):
        kinds = set(vol) - {"name"}
        if not kinds <= _RESTRICTED_VOLUMES:
            out.append(f"volume {vol['name']}: {kinds - _RESTRICTED_VOLUMES}")
    if psc.get("runAsUser") == 0:
        out.append("spec.securityContext.runAsUser=0")
    pod_seccomp = psc.get("seccompProfile", {}).get("type")
    containers = pod_spec.get("containers", []) + pod_spec.get("initContainers", [])
    for c in containers:
        sc = c.get("securityContext", {})
        name = c["name"]
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            out.append(f"{name}: capabilities must drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: adds capabilities {caps['add']}")
        if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
            out.append(f"{name}: runAsNonRoot not set")
        if sc.get("runAsUser") == 0:
            out.append(f"{name}: runAsUser=0")
        seccomp = sc.get("seccompProfile", {}).get("type") or pod_seccomp
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost")
        for port in c.get("ports", []):
            if port.get("hostPort"):
                out.append(f"{name}: hostPort {port['hostPort']}")
    return out


def test_every_pod_template_meets_the_restricted_profile(objects):
    templates = [t for o in objects for t in pod_templates(o)]
    assert len(templates) >= 6
    for where, template in templates:
        assert restricted_violations(template["spec"]) == [], where
        for c in template["spec"]["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, where
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{where}: Ray needs a writable /tmp"
    # The autoscaler sidecar KubeRay injects into heads gets the same context.
    for obj in objects:
        spec = obj.get("spec", {})
        cluster = spec.get("rayClusterConfig") or spec.get("rayClusterSpec") \
            or (spec if obj["kind"] == "RayCluster" else None)
        if cluster:
            sc = cluster["autoscalerOptions"]["securityContext"]
            assert restricted_violations({"containers": [
                {"name": "autoscaler", "securityContext": sc}]}) == []


def test_the_restricted_check_catches_a_privileged_pod():
    bad = {"hostNetwork": True, "volumes": [{"name": "h", "hostPath": {"path": "/"}}],
           "containers": [{"name": "c", "securityContext": {"privileged": True},
                           "ports": [{"containerPort": 80, "hostPort": 80}]}]}
    problems = " ".join(restricted_violations(bad))
    for word in ("hostNetwork", "hostPath", "privileged", "allowPrivilegeEscalation", "ALL",
                 "runAsNonRoot", "seccomp", "hostPort"):
        assert word in problems


def test_namespaces_enforce_restricted(objects, env):
    """Every namespace but node-exporter's, which reads the host (hostNetwork, hostPID,
    hostPath), and the GPU Operator's (privileged driver and device plugin), each saying why
    it is privileged."""
    from raycluster.monitoring import NODE_EXPORTER_NAMESPACE

    host_access = {NODE_EXPORTER_NAMESPACE, env.gpu_operator_namespace}
    for ns in (o for o in objects if o["kind"] == "Namespace"):
        level = ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
        if ns["metadata"]["name"] in host_access:
            assert level == "privileged"
            assert ns["metadata"]["annotations"]["rayplane.io/pod-security-reason"]
        else:
            assert level == "restricted", ns["metadata"]["name"]


# -- the CLI -------------------------------------------------------------------------------


def _rayplane(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raycluster", *args], check=False, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_render_cli_writes_the_folder_and_the_terraform_pools(tmp_path, catalog):
    out, tfvars = tmp_path / "k8s", tmp_path / "pools.auto.tfvars.json"
    proc = _rayplane("render", "--env", "production", "--out", str(out), "--tfvars", str(tfvars))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.glob("*.yaml")) == \
        sorted(p.name for p in COMMITTED.glob("[0-9][0-9]-*.yaml"))
    for path in out.glob("*.yaml"):
        assert path.read_text() == (COMMITTED / path.name).read_text()
    from raycluster.terraform import tfvars_text

    assert tfvars.read_text() == tfvars_text(catalog)


def test_render_cli_refuses_an_unknown_environment_in_one_line(tmp_path):
    proc = _rayplane("render", "--env", "prodution", "--out", str(tmp_path), "--no-tfvars")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--env" in lines[0] and "did you mean 'production'" in lines[0]
    assert not list(tmp_path.iterdir())


def test_render_cli_refuses_bad_input_naming_the_field(tmp_path):
    env_file = tmp_path / "bad.yaml"
    data = yaml.safe_load((REPO / "raycluster/environments/production.yaml").read_text())
    data["clusters"][0]["worker_groups"][0]["pool"] = "a100-timeslise"
    env_file.write_text(yaml.safe_dump(data))
    proc = _rayplane("render", "--env", str(env_file), "--out", str(tmp_path / "o"),
                     "--no-tfvars")
    assert proc.returncode == 2
    assert "clusters[0].worker_groups[0].pool: 'a100-timeslise' is not a pool" in proc.stderr
    assert "did you mean 'a100-timeslice'" in proc.stderr


def test_apply_cli_refuses_a_missing_kubeconfig_in_one_line(tmp_path):
    proc = _rayplane("apply", str(COMMITTED), "--kubeconfig", str(tmp_path / "nope"))
    assert proc.returncode == 2
    assert "--kubeconfig" in proc.stderr and "no such file" in proc.stderr
    assert "Traceback" not in proc.stderr



def test_apply_cli_refuses_a_folder_without_manifests(tmp_path):
    proc = _rayplane("apply", str(tmp_path), "--kubeconfig", str(tmp_path / "k"))
    assert proc.returncode == 2
    assert "no Kubernetes objects" in proc.stderr


# -- the environment spec ------------------------------------------------------------------


def test_the_environment_targets_the_eks_version_terraform_creates(env):
    variables = REPO / "infra" / "terraform" / "environments" / env.name / "variables.tf"
    if not variables.is_file():
        pytest.skip(f"{variables} is absent (the Terraform layer)")
    block = re.search(r'variable "kubernetes_version" \{(.*?)\n\}', variables.read_text(), re.DOTALL)
    default = re.search(r'default\s*=\s*"([^"]+)"', block[1])
    assert default[1] == env.kubernetes_version


@pytest.mark.parametrize("change, expected", [
    ({"account_id": "1234"}, "account_id: '1234': must be a 12-digit AWS account id"),
    ({"kubernetes_version": "1.33.2"}, ("kubernetes_version: '1.33.2': must be a Kubernetes "
                                       "minor version")),
    ({"irsa_role_arns": {"training": "role/x"}}, ("irsa_role_arns.training: 'role/x' is not "
                                                 "an IAM role ARN")),
    ({"images": {"repository": "r", "cpu_tag": "latest", "gpu_tag": "g"}},
     "images.cpu_tag: 'latest': must be a pinned tag"),
    ({"clusters": [{"name": "x", "namespace": "training", "worker_groups": [{"pool": "cpu", "max_replica": 3}]}]},
     "clusters[0].worker_groups[0].max_replica: unknown field (did you mean 'max_replicas'?)"),
])
def test_bad_environment_fields_are_named(change, expected):
    from raycluster.environments import Environment
    from raycluster.spec import SpecError

    data = yaml.safe_load((REPO / "raycluster/environments/production.yaml").read_text())
    data.update(change)
    with pytest.raises(SpecError) as err:
        Environment.parse(data)
    assert str(err.value).startswith(expected), str(err.value)


def test_a_missing_irsa_role_is_named(catalog, env):
    from raycluster.spec import SpecError

    partial = env.model_copy(update={"irsa_role_arns": {"training": env.irsa_role_arns[
        "training"]}})
    with pytest.raises(SpecError, match=r"^irsa_role_arns\.inference: missing"):
        render_objects(catalog, partial, load_inputs(env, REPO))
