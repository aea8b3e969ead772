"""GitOps: Argo CD installs every add-on and syncs the rendered folder, in dependency order.

An app-of-apps (issue 15, "GitOps for every add-on"): the root Application
``rayplane-<env>-apps`` syncs only the Argo CD files of the rendered folder (the AppProject and
the Applications, itself included: applied once by hand, it then manages itself). Its children,
each carrying a sync wave:

- one Application per Helm release of ``infra/helm/charts.yaml``: the chart from its repository
  at the pinned version, its values file from this Git repository (a multi-source Application
  whose second source is the repository as ``ref: values``, so the file is read as
  ``$values/infra/helm/...``; Argo CD supports this since 2.6, and the CRD of 3.5.1 has
  ``spec.sources[].ref``). Inlining the values (``helm.valuesObject``) would copy infra/helm into
  the rendered folder and make two places to edit;
- ``rayplane-<env>-platform``: the rendered objects the add-ons need before they can start
  (namespaces, the secret store and ExternalSecrets, Linkerd's trust chain, Karpenter's pools,
  the GPU Operator's ConfigMaps), between the CRD providers and the meshed add-ons;
- ``rayplane-<env>``: the Ray workloads, last, with ``ignoreDifferences`` on the worker groups'
  ``replicas`` the autoscaler moves (issue 15, finding 5: selfHeal undid every scale-up).

A wave waits for the previous one only when Argo CD assesses Applications' health, which it
stopped doing by default in 1.8: docs/deployment.md installs Argo CD with that health check.

Beside the Argo CD objects this renders what rayplane owns for the add-ons (finding 3): Linkerd's
trust anchor and identity issuer (cert-manager), the ExternalSecret that copies the anchor's
certificate into the ConfigMap Linkerd reads, and node-exporter's privileged namespace.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from raycluster.catalog import Catalog
from raycluster.environments import Environment
from raycluster.monitoring import NODE_EXPORTER_NAMESPACE, render_node_exporter_namespace
from raycluster.policy import meta
from raycluster.spec import SpecError

HELM_PATH = "infra/helm"  # in the repository Argo CD reads the values from
HELM_DIR = Path(__file__).resolve().parents[1] / HELM_PATH
IN_CLUSTER = "https://kubernetes.default.svc"
SYNC_WAVE = "argocd.argoproj.io/sync-wave"
#: Label of the root Application: `kubectl apply -l` picks it out of the Application file.
ROOT_LABEL = "rayplane.io/app-of-apps"
LINKERD_NAMESPACE = "linkerd"
#: The Linkerd control plane's names (linkerd-control-plane chart, identity.externalCA): the
#: issuer Secret its identity controller mounts and the ConfigMap of trust roots every proxy reads.
TRUST_ANCHOR = "linkerd-trust-anchor"
IDENTITY_ISSUER = "linkerd-identity-issuer"
TRUST_ROOTS = "linkerd-identity-trust-roots"
#: Waves of the rendered folder's two Applications, between the add-ons' (charts.yaml header).
PLATFORM_WAVE = 3
WORKLOADS_WAVE = 7
#: Kinds the workloads Application syncs; every other rendered kind but Argo CD's own is the
#: platform's (a new kind lands there: before the add-ons that may need it).
WORKLOAD_KINDS = ("PodDisruptionBudget", "RayCluster", "RayService", "RayJob", "RayCronJob",
                  "Service", "Gateway", "PrometheusRule", "Deployment", "ServiceMonitor")
ARGOCD_KINDS = ("AppProject", "Application")
#: What the autoscaler writes on a RayCluster: each worker group's replicas, and the pods it
#: picked when scaling down. RayService's worker groups are the starting size of the clusters
#: KubeRay makes from it; they get the same treatment so an edit there is not fought either.
AUTOSCALED_FIELDS = {
    "RayCluster": (".spec.workerGroupSpecs[].replicas",
                   ".spec.workerGroupSpecs[].scaleStrategy"),
    "RayService": (".spec.rayClusterConfig.workerGroupSpecs[].replicas",
                   ".spec.rayClusterConfig.workerGroupSpecs[].scaleStrategy"),
}


@dataclass(frozen=True)
class Release:
    """One add-on of ``infra/helm/charts.yaml``: a Helm chart (``chart``, ``values``) or, for
    what is published only as manifests (the Gateway API's CRDs), a Git folder (``path``)."""

    name: str
    namespace: str
    repo: str
    version: str
    wave: int
    chart: str | None = None
    values: str | None = None
    path: str | None = None


def load_releases(helm_dir: Path = HELM_DIR) -> list[Release]:
    """The add-ons, in file order; a release missing a field or its values file is refused."""
    path = helm_dir / "charts.yaml"
    out = []
    for i, item in enumerate(yaml.safe_load(path.read_text())["releases"]):
        try:
            release = Release(**{k: str(v) if k != "wave" else int(v) for k, v in item.items()})
        except TypeError as err:
            raise SpecError(f"{path}: releases[{i}]: {err}", field=f"releases[{i}]") from None
        if (release.chart is None) == (release.path is None) or \
                (release.chart is not None) != (release.values is not None):
            raise SpecError(f"{path}: releases[{i}]: a chart with its values, or a path",
                            field=f"releases[{i}]")
        if release.values and not (helm_dir / release.values).is_file():
            raise SpecError(f"{path}: releases[{i}].values: {release.values!r}: no such file",
                            field=f"releases[{i}].values")
        out.append(release)
    return out


def _application(env: Environment, name: str, wave: int, spec: dict,
                 labels: dict | None = None) -> dict:
    return {"apiVersion": "argoproj.io/v1alpha1", "kind": "Application",
            "metadata": meta(name, env.gitops.argocd_namespace, labels=labels,
                             annotations={SYNC_WAVE: str(wave)}),
            "spec": {"project": project_name(env), **spec}}


def project_name(env: Environment) -> str:
    return f"rayplane-{env.name}"


def _automated(*options: str) -> dict:
    return {"automated": {"prune": True, "selfHeal": True},
            "syncOptions": ["ServerSideApply=true", *options],
            # An add-on whose dependency is still starting fails its first sync: try again.
            "retry": {"limit": 10, "backoff": {"duration": "30s", "factor": 2,
                                               "maxDuration": "10m"}}}


def render_addon_application(env: Environment, release: Release,
                             rendered_namespaces: set[str]) -> dict:
    """One add-on: its chart at the pinned version, its values file from this repository."""
    # Namespaces rayplane renders have one owner: Argo CD must not create them for the chart.
    create = "CreateNamespace=false" if release.namespace in rendered_namespaces \
        else "CreateNamespace=true"
    if release.path is not None:
        source = {"source": {"repoURL": release.repo, "targetRevision": release.version,
                             "path": release.path}}
    else:
        source = {"sources": [
            {"repoURL": release.repo, "chart": release.chart, "targetRevision": release.version,
             "helm": {"releaseName": release.name,
                      "valueFiles": [f"$values/{HELM_PATH}/{release.values}"]}},
            {"repoURL": env.gitops.repo_url, "targetRevision": env.gitops.revision,
             "ref": "values"},
        ]}
    return _application(env, release.name, release.wave, {
        **source,
        "destination": {"server": IN_CLUSTER, "namespace": release.namespace},
        "syncPolicy": _automated(create),
    })


def _folder_app(env: Environment, name: str, wave: int, directory: dict, **extra) -> dict:
    return _application(env, name, wave, {
        "source": {"repoURL": env.gitops.repo_url, "targetRevision": env.gitops.revision,
                   "path": env.gitops.path, "directory": {"recurse": False, **directory}},
        "destination": {"server": IN_CLUSTER},
        **extra})


def _files(kinds: tuple[str, ...], file_name: Callable[[str], str]) -> str:
    """A directory include/exclude glob naming the files of ``kinds`` (``{a.yaml,b.yaml}``)."""
    return "{" + ",".join(file_name(k) for k in kinds) + "}"


def render_folder_applications(env: Environment,
                               file_name: Callable[[str], str]) -> list[dict]:
    """The root, the platform and the workloads Applications over the rendered folder, which
    split it by file (one file per kind); no object is synced by two of them."""
    argocd = _files(ARGOCD_KINDS, file_name)
    root = _folder_app(env, f"rayplane-{env.name}-apps", 0, {"include": argocd},
                       syncPolicy=_automated())
    root["metadata"]["labels"][ROOT_LABEL] = "root"
    platform = _folder_app(
        env, f"rayplane-{env.name}-platform", PLATFORM_WAVE,
        {"exclude": _files(ARGOCD_KINDS + WORKLOAD_KINDS, file_name)},
        syncPolicy=_automated("CreateNamespace=false"))
    ignore = [{"group": "ray.io", "kind": kind, "jqPathExpressions": list(paths)}
              for kind, paths in AUTOSCALED_FIELDS.items()]
    workloads = _folder_app(
        env, f"rayplane-{env.name}", WORKLOADS_WAVE,
        {"include": _files(WORKLOAD_KINDS, file_name)},
        ignoreDifferences=ignore,
        # RespectIgnoreDifferences: a sync (selfHeal's too) keeps the live value of an ignored
        # field instead of applying the rendered one.
        syncPolicy=_automated("CreateNamespace=false", "RespectIgnoreDifferences=true"))
    return [root, platform, workloads]


def render_project(env: Environment, releases: list[Release], namespaces: set[str]) -> dict:
    """The AppProject of every Application above: this repository and the charts' repositories
    as sources, the in-cluster server and the namespaces they use as destinations."""
    return {"apiVersion": "argoproj.io/v1alpha1", "kind": "AppProject",
            "metadata": meta(project_name(env), env.gitops.argocd_namespace,
                             annotations={SYNC_WAVE: "-1"}),
            "spec": {
                "description": f"rayplane {env.name}: the add-ons of infra/helm and the "
                               "rendered folder",
                "sourceRepos": sorted({env.gitops.repo_url, *(r.repo for r in releases)}),
                "destinations": [{"server": IN_CLUSTER, "namespace": ns}
                                 for ns in sorted(namespaces)],
                # The charts install CRDs, webhooks, ClusterRoles; rayplane renders
                # PriorityClasses, issuers, NodePools: cluster-scoped kinds of many groups.
                "clusterResourceWhitelist": [{"group": "*", "kind": "*"}]}}


# -- Linkerd's trust chain (issue 15, finding 3) ---------------------------------------------


def render_linkerd_identity() -> list[dict]:
    """cert-manager makes Linkerd's trust anchor (a self-signed root CA) and, from it, the
    identity issuer the control plane signs proxy certificates with, renewed every day."""
    issuer_ref = {"group": "cert-manager.io"}
    ecdsa = {"algorithm": "ECDSA", "size": 256}
    return [
        {"apiVersion": "cert-manager.io/v1", "kind": "ClusterIssuer",
         "metadata": meta("linkerd-self-signed"), "spec": {"selfSigned": {}}},
        {"apiVersion": "cert-manager.io/v1", "kind": "Certificate",
         "metadata": meta(TRUST_ANCHOR, LINKERD_NAMESPACE),
         "spec": {"isCA": True, "commonName": "root.linkerd.cluster.local",
                  "secretName": TRUST_ANCHOR,
                  # Every proxy trusts this root; replacing it is a planned rotation
                  # (docs/deployment.md), not a renewal cert-manager does on its own.
                  "duration": "87600h", "renewBefore": "720h",
                  "privateKey": {**ecdsa, "rotationPolicy": "Never"},
                  "issuerRef": {**issuer_ref, "kind": "ClusterIssuer",
                                "name": "linkerd-self-signed"}}},
        {"apiVersion": "cert-manager.io/v1", "kind": "Issuer",
         "metadata": meta(TRUST_ANCHOR, LINKERD_NAMESPACE),
         "spec": {"ca": {"secretName": TRUST_ANCHOR}}},
        {"apiVersion": "cert-manager.io/v1", "kind": "Certificate",
         "metadata": meta(IDENTITY_ISSUER, LINKERD_NAMESPACE),
         "spec": {"isCA": True, "commonName": "identity.linkerd.cluster.local",
                  "dnsNames": ["identity.linkerd.cluster.local"],
                  "secretName": IDENTITY_ISSUER, "duration": "48h", "renewBefore": "25h",
                  "privateKey": {**ecdsa, "rotationPolicy": "Always"},
                  "usages": ["cert sign", "crl sign", "server auth", "client auth"],
                  "issuerRef": {**issuer_ref, "kind": "Issuer", "name": TRUST_ANCHOR}}},
    ]


#: The store External Secrets reads Linkerd's trust anchor through (the `kubernetes` provider,
#: this cluster's API server, namespace linkerd only).
TRUST_ANCHOR_STORE = "linkerd-trust-anchor"


def render_trust_roots(certificate_wave: int) -> list[dict]:
    """The ConfigMap ``linkerd-identity-trust-roots`` the control plane and every proxy read,
    made by External Secrets from the anchor's certificate (never its key): an ExternalSecret
    whose target is a ConfigMap (``target.manifest``; the chart's ``genericTargets`` switch,
    infra/helm/external-secrets) fed by a ClusterSecretStore of the ``kubernetes`` provider that
    reads namespace linkerd. Chosen over trust-manager's Bundle, which has no schema here to
    validate against; both kinds are External Secrets' (v2.9.0 CRDs in shared/schemas).

    The store authenticates as External Secrets' own service account, which already reads
    Secrets cluster-wide (its chart's ClusterRole); its ``conditions`` let only ExternalSecrets
    in namespace linkerd use it, so no tenant namespace can read the anchor's key through it.
    ``certificate_wave``: the sync wave of Certificates; the ExternalSecret comes after them, so
    the platform sync does not wait on it before the anchor exists."""
    store = {"apiVersion": "external-secrets.io/v1", "kind": "ClusterSecretStore",
             "metadata": meta(TRUST_ANCHOR_STORE),
             "spec": {"conditions": [{"namespaces": [LINKERD_NAMESPACE]}],
                      "provider": {"kubernetes": {
                          "remoteNamespace": LINKERD_NAMESPACE,
                          "server": {"caProvider": {"type": "ConfigMap",
                                                    "name": "kube-root-ca.crt", "key": "ca.crt",
                                                    "namespace": "external-secrets"}},
                          "auth": {"serviceAccount": {"name": "external-secrets",
                                                      "namespace": "external-secrets"}}}}}}
    roots = {"apiVersion": "external-secrets.io/v1", "kind": "ExternalSecret",
             "metadata": meta(TRUST_ROOTS, LINKERD_NAMESPACE,
                              annotations={SYNC_WAVE: str(certificate_wave + 1)}),
             "spec": {"refreshInterval": "1h",
                      "secretStoreRef": {"kind": "ClusterSecretStore",
                                         "name": TRUST_ANCHOR_STORE},
                      "target": {"name": TRUST_ROOTS, "creationPolicy": "Owner",
                                 "manifest": {"apiVersion": "v1", "kind": "ConfigMap"}},
                      # A self-signed root: its tls.crt is the anchor itself.
                      "data": [{"secretKey": "ca-bundle.crt",  # pragma: allowlist secret
                                "remoteRef": {"key": TRUST_ANCHOR, "property": "tls.crt"}}]}}
    return [store, roots]


# -- the whole set ---------------------------------------------------------------------------


def render_gitops(catalog: Catalog, env: Environment, file_name: Callable[[str], str],
                  helm_dir: Path = HELM_DIR) -> list[dict]:
    """The AppProject, the add-ons' Applications, the folder's three Applications, and what
    rayplane renders for the add-ons. ``file_name``: the rendered file of a kind
    (``raycluster.render.file_name``)."""
    releases = load_releases(helm_dir)
    rendered_namespaces = ({ns.name for ns in catalog.namespaces}
                           | {NODE_EXPORTER_NAMESPACE, env.gpu_operator_namespace})
    # The rendered files are numbered by their apply order (``12-certificate.yaml``).
    certificate_wave = int(file_name("Certificate").split("-", 1)[0])
    objects = [render_node_exporter_namespace(env.kubernetes_version),
               *render_linkerd_identity(), *render_trust_roots(certificate_wave)]
    namespaces = (rendered_namespaces | {r.namespace for r in releases}
                  | {env.gitops.argocd_namespace, LINKERD_NAMESPACE,
                     env.gpu_operator_namespace, env.kuberay_namespace})
    return [*objects, render_project(env, releases, namespaces),
            *(render_addon_application(env, r, rendered_namespaces) for r in releases),
            *render_folder_applications(env, file_name)]


__all__ = ["ARGOCD_KINDS", "AUTOSCALED_FIELDS", "HELM_DIR", "IDENTITY_ISSUER", "ROOT_LABEL",
           "TRUST_ANCHOR", "TRUST_ANCHOR_STORE", "TRUST_ROOTS", "WORKLOAD_KINDS", "Release", "load_releases",
           "project_name", "render_addon_application", "render_folder_applications",
           "render_gitops", "render_linkerd_identity", "render_project", "render_trust_roots"]
