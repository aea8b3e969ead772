"""Alerts and dashboards (``infra/monitoring``) as the Kubernetes objects kube-prometheus-stack
reads: each rule file a ``PrometheusRule`` (``monitoring.coreos.com/v1``) with the label the
stack's Prometheus selects rules by, each Grafana dashboard a ConfigMap with the label its
Grafana sidecar loads dashboards from. The dashboards are rayplane's (``dashboards/*.json``)
and Ray's own, generated from the installed Ray exactly as a Ray head writes them into
``<temp_dir>/session_latest/metrics/grafana/dashboards`` -- so the rendered ones are those of
the Ray version the images run (the environment's ``ray_version`` must be the installed one).

The same rule files are what the local platform's Prometheus loads (:func:`write_rule_files`,
``raycluster.local.services``), and what ``promtool test rules`` checks against the tests in
``infra/monitoring/tests`` (docs/monitoring.md).
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from raycluster.policy import meta
from raycluster.spec import SpecError

MONITORING_DIR = Path(__file__).resolve().parents[1] / "infra" / "monitoring"
#: kube-prometheus-stack's release (infra/helm/charts.yaml): its namespace holds the rules
#: and dashboards; its Prometheus selects PrometheusRules labelled ``release: <name>``
#: (the chart's ruleSelectorNilUsesHelmValues default).
STACK_RELEASE = "kube-prometheus-stack"
STACK_NAMESPACE = "monitoring"
#: The label and value the Grafana sidecar watches (infra/helm/kube-prometheus-stack).
DASHBOARD_LABEL = "grafana_dashboard"
#: Where kube-prometheus-stack's node-exporter runs (its values' prometheus-node-exporter
#: namespaceOverride): not in STACK_NAMESPACE, whose `restricted` Pod Security level refuses it.
NODE_EXPORTER_NAMESPACE = "node-exporter"
NODE_EXPORTER_REASON = (
    "node-exporter reads the node itself: host network, host PID and the host's root, /proc "
    "and /sys mounted (hostPath), which only the privileged Pod Security level admits; its "
    "own namespace keeps the monitoring namespace restricted")
#: Ray's dashboards that rayplane's workloads fill: the cluster, Serve (apps and deployments),
#: Serve LLM (the vLLM apps) and Train. Ray Data's and SGLang's are left out (no workload).
RAY_DASHBOARDS = ("default", "serve", "serve_deployment", "serve_llm", "train")
#: Grafana dashboard variables Ray reads from the environment when it writes its dashboards
#: (uid, global filters, log links): unset while rendering, so a render is reproducible.
_RAY_DASHBOARD_ENV = ("RAY_GRAFANA_",)


# -- rules -----------------------------------------------------------------------------


def rule_files(root: Path = MONITORING_DIR) -> list[Path]:
    """The rule files (``rules/*.yaml``), in name order."""
    return sorted((root / "rules").glob("*.yaml"))


def load_rule_file(path: Path) -> dict:
    """A Prometheus rule file (``groups:``), refused in one line when it is not one."""
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("groups"), list) or not doc["groups"]:
        raise SpecError(f"{path}: a Prometheus rule file needs a non-empty `groups:` list")
    for i, group in enumerate(doc["groups"]):
        if not isinstance(group, dict) or not group.get("name") or not group.get("rules"):
            raise SpecError(f"{path}: groups[{i}] needs a name and rules")
    return doc


def render_prometheus_rules(root: Path = MONITORING_DIR,
                            namespace: str = STACK_NAMESPACE) -> list[dict]:
    """One PrometheusRule per rule file (``rayplane-<file>``), its groups unchanged."""
    out = []
    for path in rule_files(root):
        doc = load_rule_file(path)
        out.append({"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
                    "metadata": meta(f"rayplane-{path.stem}", namespace,
                                     labels={"release": STACK_RELEASE}),
                    "spec": {"groups": doc["groups"]}})
    return out


def write_rule_files(dest: Path, root: Path = MONITORING_DIR) -> list[Path]:
    """Copy the rule files into ``dest`` (the local Prometheus's folder), replacing what an
    earlier start left there; returns the copies."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.yaml"):
        old.unlink()
    out = []
    for path in rule_files(root):
        load_rule_file(path)  # a broken file fails here, not as a Prometheus that won't start
        out.append(Path(shutil.copyfile(path, dest / path.name)))
    return out


def alerts(root: Path = MONITORING_DIR) -> list[dict]:
    """Every alerting rule of every file (``alert``, ``expr``, ``for``, ``labels``, ...)."""
    return [rule for path in rule_files(root) for group in load_rule_file(path)["groups"]
            for rule in group["rules"] if "alert" in rule]


# -- dashboards ------------------------------------------------------------------------


def rayplane_dashboards(root: Path = MONITORING_DIR) -> dict[str, dict]:
    """rayplane's dashboards: file stem (``rayplane-serving``) -> the dashboard."""
    out = {}
    for path in sorted((root / "dashboards").glob("*.json")):
        try:
            out[path.stem] = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise SpecError(f"{path}: not valid JSON ({err})") from None
    return out


@contextmanager
def _without_ray_dashboard_env():
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith(_RAY_DASHBOARD_ENV)}
    try:
        yield
    finally:
        os.environ.update(saved)


def ray_dashboards(ray_version: str | None = None) -> dict[str, dict]:
    """Ray's own dashboards from the installed Ray (``ray-<name>`` -> the dashboard), as its
    head writes them into the session folder. ``ray_version``: the version the cluster runs;
    a different installed Ray is refused (its dashboards may name other metrics)."""
    import ray
    from ray.dashboard.modules.metrics import grafana_dashboard_factory as factory

    if ray_version is not None and ray_version != ray.__version__:
        raise SpecError(f"ray_version: {ray_version!r}, but the installed Ray is "
                        f"{ray.__version__}: Ray's dashboards are rendered from the installed "
                        f"Ray; install ray=={ray_version} (the lock's) or change ray_version",
                        field="ray_version")
    out = {}
    with _without_ray_dashboard_env():
        for name in RAY_DASHBOARDS:
            content, _uid = getattr(factory, f"generate_{name}_grafana_dashboard")()
            out[f"ray-{name.replace('_', '-')}"] = json.loads(content)
    return out


def render_dashboard_configmaps(dashboards: dict[str, dict],
                                namespace: str = STACK_NAMESPACE) -> list[dict]:
    """A ConfigMap per dashboard (``grafana-dashboard-<name>``, key ``<name>.json``) labelled
    for the Grafana sidecar."""
    return [{"apiVersion": "v1", "kind": "ConfigMap",
             "metadata": meta(f"grafana-dashboard-{name}", namespace,
                              labels={DASHBOARD_LABEL: "1"}),
             # One key per line: a Ray upgrade's dashboard changes read as a diff.
             "data": {f"{name}.json": json.dumps(board, indent=1, ensure_ascii=False) + "\n"}}
            for name, board in sorted(dashboards.items())]


def render_monitoring(ray_version: str | None = None, root: Path = MONITORING_DIR) -> list[dict]:
    """Every monitoring object: the PrometheusRules, then the dashboards' ConfigMaps."""
    if not (root / "rules").is_dir():
        raise SpecError(f"{root}: no rules/ folder; rayplane's alerts and dashboards live in "
                        "infra/monitoring of its repository")
    return [*render_prometheus_rules(root),
            *render_dashboard_configmaps({**ray_dashboards(ray_version),
                                          **rayplane_dashboards(root)})]


def render_node_exporter_namespace(kubernetes_version: str) -> dict:
    """node-exporter's namespace at the `privileged` Pod Security level, with the reason
    (issue 15, finding 3: in the monitoring namespace, which enforces `restricted`, its pods
    were refused). No Linkerd proxy: host-network pods are not meshed."""
    labels = {f"pod-security.kubernetes.io/{mode}": "privileged"
              for mode in ("enforce", "audit", "warn")}
    labels.update({f"pod-security.kubernetes.io/{mode}-version": f"v{kubernetes_version}"
                   for mode in ("enforce", "audit", "warn")})
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": meta(NODE_EXPORTER_NAMESPACE, labels=labels,
                             annotations={"linkerd.io/inject": "disabled",
                                          "rayplane.io/pod-security-reason":
                                              NODE_EXPORTER_REASON})}


def panel_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of a dashboard, rows' panels included."""
    out = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out.append((panel.get("title", ""), target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    return out


def expand_variables(expr: str, dashboard: dict, *, rate_interval: str = "1m",
                     range_: str = "15m") -> str:
    """A panel's query as Grafana sends it with every variable at "All" (its ``allValue``,
    else ``.*``) and the given ``$__rate_interval`` / ``$__range``."""
    out = expr.replace("$__rate_interval", rate_interval).replace("$__range", range_)
    out = out.replace("$__interval", rate_interval)
    variables: list[dict[str, Any]] = dashboard.get("templating", {}).get("list", [])
    for var in sorted(variables, key=lambda v: -len(v["name"])):
        value = var.get("allValue") or ".*"
        out = out.replace(f"${{{var['name']}}}", value).replace(f"${var['name']}", value)
    return out


__all__ = [
    "DASHBOARD_LABEL",
    "MONITORING_DIR",
    "NODE_EXPORTER_NAMESPACE",
    "RAY_DASHBOARDS",
    "STACK_NAMESPACE",
    "STACK_RELEASE",
    "alerts",
    "expand_variables",
    "load_rule_file",
    "panel_queries",
    "ray_dashboards",
    "rayplane_dashboards",
    "render_dashboard_configmaps",
    "render_monitoring",
    "render_node_exporter_namespace",
    "render_prometheus_rules",
    "rule_files",
    "write_rule_files",
]
