"""Argo CD installs every add-on and syncs the rendered folder (issue 15): an Application per
release of infra/helm/charts.yaml with its pinned chart and its values file, waves in dependency
order, every object synced by one Application only; the autoscaler's worker counts are not undone
(finding 5); and what the add-ons need to start exists (finding 3): Linkerd's trust anchor,
issuer and trust roots, the Secrets their charts read, a namespace node-exporter is admitted to,
one owner for the ClusterPolicy. (The add-ons' values against Terraform and the catalog, Velero's
bucket included: test_addon_values.py.)"""

from __future__ import annotations

import copy
import fnmatch
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from raycluster import gitops
from raycluster.render import file_name, load_inputs, render_files, render_objects
from tests.support.crds import strict

REPO = Path(__file__).resolve().parents[3]
HELM = REPO / "infra" / "helm"
#: The add-ons issue 15 names (Linkerd as its three charts, the EFA device plugin for EFA pools).
ADDONS = {"gpu-operator", "kuberay-operator", "gateway-api-crds", "istiod", "karpenter",
          "cert-manager", "linkerd-crds", "linkerd2-cni", "linkerd-control-plane", "external-secrets",
          "kube-prometheus-stack", "mlflow", "velero", "aws-load-balancer-controller",
          "aws-efa-k8s-device-plugin"}


@pytest.fixture(scope="module")
def objects(catalog, env):
    return render_objects(catalog, env, load_inputs(env, REPO))


@pytest.fixture(scope="module")
def apps(objects):
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == "Application"}


@pytest.fixture(scope="module")
def releases():
    return {r.name: r for r in gitops.load_releases()}


def values(release) -> dict:
    return yaml.safe_load((HELM / release.values).read_text()) if release.values else {}


def of_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def wave(obj) -> int:
    return int(obj["metadata"]["annotations"][gitops.SYNC_WAVE])


# -- the add-ons -----------------------------------------------------------------------------


def test_every_addon_is_an_application_of_its_pinned_chart_with_its_values_file(apps, releases,
                                                                                env):
    assert set(releases) >= ADDONS
    for name, release in releases.items():
        app = apps[name]
        assert not re.search(r"[\^~*x><]|latest|HEAD|main", release.version), name
        if release.path:  # manifests from Git at a tag (the Gateway API's CRDs)
            assert app["spec"]["source"] == {"repoURL": release.repo, "path": release.path,
                                             "targetRevision": release.version}
            continue
        chart, ref = app["spec"]["sources"]
        assert (chart["repoURL"], chart["chart"], chart["targetRevision"]) == \
            (release.repo, release.chart, release.version)
        # The values file comes from this repository, at the revision Argo CD syncs.
        assert chart["helm"]["valueFiles"] == [f"$values/infra/helm/{release.values}"]
        assert (HELM / release.values).is_file()
        assert ref == {"repoURL": env.gitops.repo_url, "targetRevision": env.gitops.revision,
                       "ref": "values"}
        assert app["spec"]["destination"]["namespace"] == release.namespace
        assert app["spec"]["syncPolicy"]["automated"]["selfHeal"] is True


def test_operators_whose_objects_rayplane_renders_match_their_schemas(releases, env):
    """The chart versions of the operators whose CRDs the rendered objects are checked against
    are those CRDs' versions (shared/schemas folder names)."""
    pinned = {"cert-manager": "v1.21.1", "external-secrets": "2.9.0", "karpenter": "1.14.1",
              "gpu-operator": "v26.7.0", "kuberay-operator": env.kuberay_version}
    for name, version in pinned.items():
        assert releases[name].version == version, name


@pytest.fixture(scope="module")
def argocd_validators(schemas_dir):
    out = {}
    for path in sorted((schemas_dir / "argo-cd-v3.5.1").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
        out[crd["spec"]["names"]["kind"]] = jsonschema.Draft7Validator(
            strict(version["schema"]["openAPIV3Schema"]))
    return out


def test_argo_cd_objects_validate_against_argo_cd_3_5(objects, argocd_validators):
    argo = of_kind(objects, "Application") + of_kind(objects, "AppProject")
    assert len(of_kind(objects, "AppProject")) == 1
    for obj in argo:
        errors = list(argocd_validators[obj["kind"]].iter_errors(obj))
        assert not errors, f"{obj['metadata']['name']}: {errors[0].message}"
    broken = copy.deepcopy(of_kind(objects, "Application")[0])
    broken["spec"]["syncPolicy"]["automated"]["selfheal"] = True  # a typo must fail
    assert list(argocd_validators["Application"].iter_errors(broken))


def test_sync_waves_put_each_addon_after_what_it_needs(apps, env):
    """As a sync sees them (the rendered objects' annotations): CRD providers first, then the
    platform objects (ExternalSecrets, Certificates, pools), then what reads them, Ray last."""
    w = {name: wave(app) for name, app in apps.items()}
    platform, workloads = f"rayplane-{env.name}-platform", f"rayplane-{env.name}"
    before = [
        ("cert-manager", platform), ("external-secrets", platform), ("karpenter", platform), ("linkerd-crds", platform),
        (platform, "linkerd-control-plane"), ("linkerd2-cni", "linkerd-control-plane"),
        ("linkerd-control-plane", "kube-prometheus-stack"), ("linkerd-control-plane", "mlflow"),
        (platform, "gpu-operator"), ("kube-prometheus-stack", "kuberay-operator"),
        ("kuberay-operator", workloads), ("aws-load-balancer-controller", workloads),
        ("istio-base", "istiod"), ("gateway-api-crds", "istiod"), ("istiod", workloads),
    ]
    for first, then in before:
        assert w[first] < w[then], f"{first} (wave {w[first]}) must sync before {then} " \
                                   f"(wave {w[then]})"
    assert all(v < w[workloads] for k, v in w.items() if k != workloads)


def test_the_argocd_health_check_gates_the_waves():
    patch = yaml.safe_load((HELM / "argo-cd" / "argocd-cm-patch.yaml").read_text())
    lua = patch["data"]["resource.customizations.health.argoproj.io_Application"]
    assert "obj.status.health.status" in lua and '"Synced"' in lua


# -- one owner per object --------------------------------------------------------------------


def _glob(pattern: str, name: str) -> bool:
    """Argo CD's directory include/exclude: a glob, `{a,b}` alternatives."""
    alternatives = pattern[1:-1].split(",") if pattern.startswith("{") else [pattern]
    return any(fnmatch.fnmatchcase(name, alt) for alt in alternatives)


def folder_apps(apps, env):
    return [a for a in apps.values() if a["spec"].get("source", {}).get("path") == env.gitops.path]


def syncing(app, file: str) -> bool:
    directory = app["spec"]["source"]["directory"]
    if "include" in directory and not _glob(directory["include"], file):
        return False
    return not ("exclude" in directory and _glob(directory["exclude"], file))


def test_every_rendered_file_is_synced_by_exactly_one_application(objects, apps, env):
    files = sorted(render_files(objects, env.name))
    folder = folder_apps(apps, env)
    assert len(folder) == 3
    for file in files:
        owners = [a["metadata"]["name"] for a in folder if syncing(a, file)]
        assert len(owners) == 1, f"{file}: synced by {owners}"
    # The root syncs the Argo CD objects, itself included (applied once, then self-managed).
    root, = (a for a in folder if a["metadata"]["labels"].get(gitops.ROOT_LABEL) == "root")
    assert syncing(root, file_name("Application")) and syncing(root, file_name("AppProject"))


def test_every_object_a_folder_application_syncs_has_its_namespace_by_then(objects, apps, env):
    # The platform Application (an early wave) syncs ConfigMaps into the GPU Operator's
    # namespace: had only the operator's own Application (a later wave) created it, that sync
    # would wait forever on a namespace that comes after it.
    files = render_files(objects, env.name)
    rendered_ns = {o["metadata"]["name"] for o in of_kind(objects, "Namespace")}
    for folder_app in folder_apps(apps, env):
        created_before = {a["spec"]["destination"]["namespace"] for a in apps.values()
                          if wave(a) < wave(folder_app)
                          and "CreateNamespace=true" in a["spec"]["syncPolicy"]["syncOptions"]}
        for file in (f for f in files if syncing(folder_app, f)):
            for obj in yaml.safe_load_all(files[file]):
                ns = obj["metadata"].get("namespace")
                # Argo CD's own namespace is there before anything is synced (the bootstrap).
                there = rendered_ns | created_before | {"kube-system", env.gitops.argocd_namespace}
                assert ns is None or ns in there, (
                    f"{folder_app['metadata']['name']} syncs {obj['kind']} {ns}/"
                    f"{obj['metadata']['name']} before anything creates namespace {ns}")


def test_no_chart_creates_what_rayplane_renders(objects, apps, releases):
    rendered_ns = {o["metadata"]["name"] for o in of_kind(objects, "Namespace")}
    for name in releases:
        options = apps[name]["spec"]["syncPolicy"]["syncOptions"]
        creates = "CreateNamespace=true" in options
        assert creates == (releases[name].namespace not in rendered_ns), name
    # The GPU Operator chart always renders `cluster-policy`: it is the chart's alone.
    assert not of_kind(objects, "ClusterPolicy")


def test_the_project_admits_every_namespace_and_repository_used(objects, apps):
    """Argo CD refuses to sync an object into a namespace, or from a repository, that the
    Application's project does not list."""
    project, = of_kind(objects, "AppProject")
    allowed = {d["namespace"] for d in project["spec"]["destinations"]}
    used = {o["metadata"]["namespace"] for o in objects if "namespace" in o["metadata"]}
    used |= {a["spec"]["destination"]["namespace"] for a in apps.values()
             if "namespace" in a["spec"]["destination"]}
    assert used <= allowed, used - allowed
    repos = {s["repoURL"] for a in apps.values()
             for s in a["spec"].get("sources", [a["spec"].get("source")])}
    assert repos <= set(project["spec"]["sourceRepos"])
    assert {a["spec"]["project"] for a in apps.values()} == {project["metadata"]["name"]}


# -- finding 5: the autoscaler's replicas ----------------------------------------------------


def jq_select(obj, expression: str) -> list[tuple]:
    """The paths a jqPathExpression of the form `.a.b[].c` selects in ``obj``."""
    paths = [()]
    for step in re.findall(r"\.(\w+)(\[\])?", expression):
        key, each = step
        nxt = []
        for path in paths:
            node = _get(obj, path)
            if isinstance(node, dict) and key in node:
                if each:
                    nxt += [(*path, key, i) for i in range(len(node[key]))]
                else:
                    nxt.append((*path, key))
        paths = nxt
    return paths


def _get(obj, path):
    for part in path:
        obj = obj[part]
    return obj


def _drop(obj, path):
    parent = _get(obj, path[:-1])
    parent.pop(path[-1], None) if isinstance(parent, dict) else None


def diff_after_ignoring(app: dict, desired: dict, live: dict) -> bool:
    """Whether Argo CD sees a difference once the Application's ignoreDifferences apply."""
    desired, live = copy.deepcopy(desired), copy.deepcopy(live)
    for rule in app["spec"].get("ignoreDifferences", []):
        if rule["kind"] != desired["kind"]:
            continue
        for expression in rule.get("jqPathExpressions", []):
            for obj in (desired, live):
                for path in sorted(jq_select(obj, expression), reverse=True):
                    _drop(obj, path)
    return desired != live


def autoscaled(obj: dict) -> dict:
    """The object after the Ray autoscaler scaled every worker group up and picked a pod to
    remove: what selfHeal would otherwise put back."""
    live = copy.deepcopy(obj)
    spec = live["spec"].get("rayClusterConfig", live["spec"])
    for group in spec["workerGroupSpecs"]:
        group["replicas"] = group["replicas"] + 3
        group["scaleStrategy"] = {"workersToDelete": [f"{group['groupName']}-worker-abcde"]}
    return live


@pytest.mark.parametrize("kind", ["RayCluster", "RayService"])
def test_a_scale_up_by_the_autoscaler_is_not_undone(objects, apps, env, kind):
    rendered = of_kind(objects, kind)
    assert rendered
    owner, = (a for a in folder_apps(apps, env) if syncing(a, file_name(kind)))
    policy = owner["spec"]["syncPolicy"]
    assert policy["automated"]["selfHeal"] is True
    # Without RespectIgnoreDifferences a sync would still apply the rendered replicas.
    assert "RespectIgnoreDifferences=true" in policy["syncOptions"]
    for obj in rendered:
        assert diff_after_ignoring(owner, obj, autoscaled(obj)) is False, obj["metadata"]["name"]
        # ...and the rest of the spec is still enforced.
        edited = copy.deepcopy(obj)
        edited["spec"].setdefault("suspend", True)
        edited["metadata"]["labels"]["x"] = "y"
        assert diff_after_ignoring(owner, obj, edited) is True


def test_the_ignored_paths_exist_in_the_rendered_objects(objects):
    for kind, expressions in gitops.AUTOSCALED_FIELDS.items():
        for obj in of_kind(objects, kind):
            assert jq_select(obj, expressions[0]), f"{kind}: {expressions[0]} selects nothing"


# -- finding 3: what the add-ons need to start -----------------------------------------------


@pytest.fixture(scope="module")
def cert_manager_validators(schemas_dir):
    out = {}
    for path in sorted((schemas_dir / "cert-manager-v1.21.1").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        out[crd["spec"]["names"]["kind"]] = jsonschema.Draft7Validator(
            strict(version["schema"]["openAPIV3Schema"]))
    return out


def test_linkerd_gets_its_issuer_from_a_cert_manager_chain(objects, releases,
                                                           cert_manager_validators):
    control_plane = values(releases["linkerd-control-plane"])
    assert control_plane["identity"]["externalCA"] is True
    assert control_plane["identity"]["issuer"]["scheme"] == "kubernetes.io/tls"
    by_name = {(o["kind"], o["metadata"]["name"]): o for o in objects
               if o["apiVersion"] == "cert-manager.io/v1"}
    for obj in by_name.values():
        errors = list(cert_manager_validators[obj["kind"]].iter_errors(obj))
        assert not errors, f"{obj['kind']}/{obj['metadata']['name']}: {errors[0].message}"
    # The identity controller mounts Secret linkerd-identity-issuer in the release namespace.
    issuer_cert = by_name[("Certificate", gitops.IDENTITY_ISSUER)]
    ns = releases["linkerd-control-plane"].namespace
    assert issuer_cert["metadata"]["namespace"] == ns
    assert issuer_cert["spec"]["secretName"] == gitops.IDENTITY_ISSUER
    assert issuer_cert["spec"]["isCA"] is True and "cert sign" in issuer_cert["spec"]["usages"]
    assert issuer_cert["spec"]["privateKey"]["algorithm"] == "ECDSA"
    # ... signed by a CA Issuer of the same namespace, whose key is the trust anchor's ...
    ref = issuer_cert["spec"]["issuerRef"]
    ca = by_name[(ref["kind"], ref["name"])]
    assert ca["metadata"]["namespace"] == ns
    anchor = next(o for o in by_name.values() if o["kind"] == "Certificate"
                  and o["spec"]["secretName"] == ca["spec"]["ca"]["secretName"])
    assert anchor["metadata"]["namespace"] == ns and anchor["spec"]["isCA"] is True
    # ... a self-signed root.
    root_ref = anchor["spec"]["issuerRef"]
    assert by_name[(root_ref["kind"], root_ref["name"])]["spec"] == {"selfSigned": {}}


def test_linkerd_trust_roots_are_made_from_the_anchor(objects, releases):
    """identity.externalCA: the chart renders no linkerd-identity-trust-roots ConfigMap. An
    ExternalSecret of that name makes it (a ConfigMap target, which the chart must allow) from
    the anchor's certificate, through a store only namespace linkerd may use, after the
    Certificates exist (its sync wave)."""
    ns = releases["linkerd-control-plane"].namespace
    made = [o for o in of_kind(objects, "ExternalSecret")
            if o["spec"]["target"]["name"] == gitops.TRUST_ROOTS
            and o["metadata"]["namespace"] == ns]
    assert made, f"nothing creates ConfigMap {gitops.TRUST_ROOTS} in {ns}, which Linkerd reads"
    roots, = made
    assert roots["spec"]["target"]["manifest"] == {"apiVersion": "v1", "kind": "ConfigMap"}
    assert values(releases["external-secrets"])["genericTargets"]["enabled"] is True
    assert roots["spec"]["data"] == [{"secretKey": "ca-bundle.crt", "remoteRef": {  # pragma: allowlist secret
        "key": gitops.TRUST_ANCHOR, "property": "tls.crt"}}]
    # The anchor is the Certificate whose Secret that is, in the same namespace.
    anchor, = (o for o in of_kind(objects, "Certificate")
               if o["spec"]["secretName"] == gitops.TRUST_ANCHOR)
    assert anchor["metadata"]["namespace"] == ns and anchor["spec"]["isCA"] is True
    assert wave(roots) > wave(anchor)
    ref = roots["spec"]["secretStoreRef"]
    store, = (o for o in of_kind(objects, ref["kind"]) if o["metadata"]["name"] == ref["name"])
    provider = store["spec"]["provider"]["kubernetes"]
    assert provider["remoteNamespace"] == ns
    # Only ExternalSecrets in linkerd may use the store: it reads the anchor's key too.
    assert store["spec"]["conditions"] == [{"namespaces": [ns]}]


def expected_secrets(node, found=None) -> list[str]:
    """Names of Secrets a chart's values say must already exist (`existingSecret`,
    `existingDatabaseSecret.name`, ...)."""
    found = [] if found is None else found
    if isinstance(node, dict):
        for key, value in node.items():
            if re.fullmatch(r"existing\w*Secret", key):
                name = value.get("name") if isinstance(value, dict) else value
                if name:
                    found.append(name)
            else:
                expected_secrets(value, found)
    elif isinstance(node, list):
        for item in node:
            expected_secrets(item, found)
    return found


def test_every_secret_a_chart_expects_comes_from_an_external_secret(objects, releases):
    made = {(o["metadata"]["namespace"], o["spec"]["target"]["name"]): o
            for o in of_kind(objects, "ExternalSecret")}
    expected = {(r.namespace, name) for r in releases.values()
                for name in expected_secrets(values(r))}
    assert {("monitoring", "grafana-admin"), ("mlops", "mlflow-db")} <= expected
    for key in sorted(expected):
        assert key in made, f"{key[1]} in {key[0]}: a chart reads it, no ExternalSecret makes it"
    # ...with the keys the charts read.
    grafana = values(releases["kube-prometheus-stack"])["grafana"]["admin"]
    keys = set(made[("monitoring", "grafana-admin")]["spec"]["target"]["template"]["data"])
    assert keys == {grafana["userKey"], grafana["passwordKey"]}
    db = values(releases["mlflow"])["backendStore"]["existingDatabaseSecret"]
    keys = {d["secretKey"] for d in made[("mlops", "mlflow-db")]["spec"]["data"]}
    assert keys == {db["usernameKey"], db["passwordKey"]}


def test_node_exporter_runs_in_a_namespace_that_admits_host_access(objects, releases):
    stack = values(releases["kube-prometheus-stack"])
    target = stack["prometheus-node-exporter"]["namespaceOverride"]
    assert target != releases["kube-prometheus-stack"].namespace
    namespaces = {o["metadata"]["name"]: o["metadata"] for o in of_kind(objects, "Namespace")}
    labels = namespaces[target]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"
    assert "hostPath" in namespaces[target]["annotations"]["rayplane.io/pod-security-reason"]
    # The stack's own namespace stays restricted.
    stack_ns = namespaces[releases["kube-prometheus-stack"].namespace]["labels"]
    assert stack_ns["pod-security.kubernetes.io/enforce"] == "restricted"
