"""infra/monitoring: the rule files pass ``promtool check rules`` and their unit tests
(``promtool test rules``) fire every alert once and keep it silent once; the rendered
PrometheusRules validate against prometheus-operator's CRD and carry the label the stack's
Prometheus selects; the dashboards' ConfigMaps carry the label Grafana's sidecar watches and
hold Ray's own dashboards (from the installed Ray) and rayplane's; every panel query of
rayplane's dashboards parses (promtool, the DCGM ones included: there is no GPU here to run
them on; tests/integration/test_dashboards.py runs the others against a live Prometheus); the
local Prometheus's configuration loads the rules; and the KubeRay head embeds Grafana."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from raycluster import monitoring
from raycluster.kuberay.pods import MONITORING_ENV
from raycluster.local.services import prometheus_config
from raycluster.render import load_inputs, render_objects
from raycluster.spec import SpecError
from tests.support.crds import strict as _strict
from tests.support.infra import helm_release, helm_values

ROOT = monitoring.MONITORING_DIR
TESTS = sorted((ROOT / "tests").glob("*_test.yaml"))
PROMTOOL = shutil.which("promtool")
requires_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="needs promtool on PATH (`make test` installs prometheus)")
#: Metric names of NVIDIA's DCGM exporter: the panels and alerts that need a GPU node.
DCGM = re.compile(r"\bDCGM_FI_\w+|rayplane:gpu_\w+")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120,
                          check=False, cwd=ROOT)


# -- rules -----------------------------------------------------------------------------


@requires_promtool
def test_every_rule_file_passes_promtool_check():
    files = monitoring.rule_files()
    assert {p.stem for p in files} == {"agents", "gpu", "platform", "serve", "training"}
    out = promtool("check", "rules", *map(str, files))
    assert out.returncode == 0, out.stdout + out.stderr


@requires_promtool
def test_the_rule_unit_tests_pass():
    out = promtool("test", "rules", *map(str, TESTS))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("SUCCESS") == len(TESTS)


def test_every_alert_has_a_case_that_fires_and_one_that_stays_silent():
    fires: set[str] = set()
    silent: set[str] = set()
    for path in TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in monitoring.alerts()}
    assert names == {
        "GPULowUtilization", "GPUSaturated", "GPUMemoryPressure", "GPUXidError",
        "ServeHighErrorRate", "ServeHighLatencyP99", "ModelHighTimeToFirstToken",
        "ModelVersionHighErrorRate", "AgentRunFailures", "TrainingRunFailed",
        "TrainingRunRestarted", "RayHeadRestarted", "RedisDown"}
    assert names - fires == set(), "alerts no test fires"
    assert names - silent == set(), "alerts no test keeps silent"


def test_every_alert_says_how_bad_what_and_where_to_look_and_is_documented():
    doc = (ROOT.parents[1] / "docs" / "monitoring.md").read_text()
    for rule in monitoring.alerts():
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert f"`{rule['alert']}`" in doc, f"{rule['alert']} is not in docs/monitoring.md"


def test_a_broken_rule_file_is_refused_naming_the_file(tmp_path):
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "bad.yaml").write_text("groups: []\n")
    with pytest.raises(SpecError, match=r"bad\.yaml.*groups"):
        monitoring.render_prometheus_rules(tmp_path)


# -- rendered objects ------------------------------------------------------------------


@pytest.fixture(scope="module")
def objects(catalog, env):
    return render_objects(catalog, env, load_inputs(env))




@pytest.fixture(scope="module")
def rule_validator(schemas_dir):
    crd = yaml.safe_load((schemas_dir / "prometheus-operator-v0.93.0" /
                          "monitoring.coreos.com_prometheusrules.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def test_prometheus_rules_validate_against_the_operator_crd(objects, rule_validator):
    rules = [o for o in objects if o["kind"] == "PrometheusRule"]
    assert [r["metadata"]["name"] for r in rules] == [
        f"rayplane-{p.stem}" for p in monitoring.rule_files()]
    for rule in rules:
        errors = list(rule_validator.iter_errors(rule))
        assert not errors, f"{rule['metadata']['name']}: {errors[0].message}"
    broken = copy.deepcopy(rules[0])
    broken["spec"]["groups"][0]["rules"][0]["exprr"] = "up"
    assert list(rule_validator.iter_errors(broken))


def test_rules_go_where_the_stacks_prometheus_selects_them(objects):
    release = helm_release("kube-prometheus-stack")
    stack = (release["name"], release["namespace"])
    assert stack == (monitoring.STACK_RELEASE, monitoring.STACK_NAMESPACE)
    spec = helm_values("kube-prometheus-stack")["prometheus"]["prometheusSpec"]
    for rule in (o for o in objects if o["kind"] == "PrometheusRule"):
        assert rule["metadata"]["namespace"] == release["namespace"]
        if spec.get("ruleSelectorNilUsesHelmValues", True):
            assert rule["metadata"]["labels"]["release"] == release["name"]
        # the same groups as the file promtool checked
        path = ROOT / "rules" / f"{rule['metadata']['name'].removeprefix('rayplane-')}.yaml"
        assert rule["spec"] == {"groups": yaml.safe_load(path.read_text())["groups"]}


def test_dashboards_are_configmaps_for_grafanas_sidecar(objects, env):
    sidecar = helm_values("kube-prometheus-stack")["grafana"]["sidecar"]["dashboards"]
    maps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"
            and sidecar["label"] in o["metadata"]["labels"]}
    expected = {f"ray-{n.replace('_', '-')}" for n in monitoring.RAY_DASHBOARDS} | set(
        monitoring.rayplane_dashboards())
    assert set(maps) == {f"grafana-dashboard-{n}" for n in expected}
    uids = set()
    for name, cm in maps.items():
        assert cm["metadata"]["labels"][sidecar["label"]] == "1"
        kubernetes_validate.validate(cm, env.kubernetes_version, strict=True)
        (key, text), = cm["data"].items()
        assert key.endswith(".json") and len(text.encode()) < 1024 * 1024 - 4096, name
        uids.add(json.loads(text)["uid"])
    # the uids the Ray dashboard embeds by (Ray's own generator, this Ray version)
    assert {"rayDefaultDashboard", "rayServeDashboard", "rayTrainDashboard"} <= uids
    assert {"rayplane-serving", "rayplane-models", "rayplane-agents", "rayplane-training",
            "rayplane-gpu"} <= uids


def test_ray_dashboards_come_from_the_ray_the_environment_runs():
    import ray

    assert monitoring.ray_dashboards(ray.__version__)["ray-default"]["uid"] == \
        "rayDefaultDashboard"
    with pytest.raises(SpecError, match="ray_version"):
        monitoring.ray_dashboards("1.0.0")


def test_the_kuberay_head_embeds_grafana_and_prometheus(objects):
    release = helm_release("kube-prometheus-stack")
    heads = [o["spec"]["headGroupSpec"] for o in objects if o["kind"] == "RayCluster"]
    heads += [o["spec"]["rayClusterConfig"]["headGroupSpec"] for o in objects
              if o["kind"] == "RayService"]
    assert heads
    for head in heads:
        env = {e["name"]: e.get("value") for e in head["template"]["spec"]["containers"][0]["env"]}
        assert {k: env[k] for k in MONITORING_ENV} == MONITORING_ENV
    # the in-cluster Services of the stack's release
    svc = f"{release['name']}-{{}}.{release['namespace']}.svc"
    assert MONITORING_ENV["RAY_GRAFANA_HOST"].startswith(f"http://{svc.format('grafana')}")
    assert MONITORING_ENV["RAY_PROMETHEUS_HOST"].startswith(
        f"http://{svc.format('prometheus')}:9090")


# -- dashboards ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(monitoring.rayplane_dashboards()))
def test_rayplane_dashboards_are_well_formed(name):
    board = monitoring.rayplane_dashboards()[name]
    assert board["uid"] == name and "rayplane" in board["tags"]
    variables = {v["name"] for v in board["templating"]["list"]}
    assert "datasource" in variables
    ids, panels = set(), [p for p in board["panels"] if p["type"] != "row"]
    assert panels
    for panel in board["panels"]:
        assert panel["id"] not in ids
        ids.add(panel["id"])
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"] and panel["description"]
        for target in panel["targets"]:
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval", "1"}
            assert used <= variables, f"{panel['title']}: undefined {used - variables}"


@requires_promtool
def test_every_panel_query_parses(tmp_path):
    """promtool parses every query (as a recording rule): the DCGM panels are checked this
    way only; the others also run against a live Prometheus in
    tests/integration/test_dashboards.py."""
    rules, dcgm = [], 0
    for name, board in sorted(monitoring.rayplane_dashboards().items()):
        for i, (_title, expr) in enumerate(monitoring.panel_queries(board)):
            dcgm += bool(DCGM.search(expr))
            rules.append({"record": f"dashboard:{name.replace('-', '_')}:{i}",
                          "expr": monitoring.expand_variables(expr, board)})
    assert dcgm >= 8
    path = tmp_path / "panels.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    out = promtool("check", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    # and the check can fail
    path.write_text(yaml.safe_dump({"groups": [{"name": "p", "rules": [
        {"record": "x", "expr": "sum by (gpu (DCGM_FI_DEV_GPU_UTIL)"}]}]}))
    assert promtool("check", "rules", str(path)).returncode != 0


def test_variables_expand_as_grafanas_all():
    board = {"templating": {"list": [{"name": "model", "allValue": ".*"},
                                     {"name": "model_version"}]}}
    assert monitoring.expand_variables(
        'rate(x{model=~"$model", v=~"${model_version}"}[$__rate_interval])', board,
        rate_interval="2m") == 'rate(x{model=~".*", v=~".*"}[2m])'


# -- the local platform's Prometheus ---------------------------------------------------


@requires_promtool
def test_the_local_prometheus_loads_the_rules(tmp_path):
    rules = tmp_path / "prometheus" / "rules"
    copies = monitoring.write_rule_files(rules)
    assert [p.name for p in copies] == [p.name for p in monitoring.rule_files()]
    config = tmp_path / "prometheus" / "prometheus.yml"
    config.write_text(prometheus_config(tmp_path, rules))
    assert yaml.safe_load(config.read_text())["rule_files"] == [str(rules / "*.yaml")]
    # `check config` also parses every rule file the configuration names
    out = subprocess.run([PROMTOOL, "check", "config", str(config)], capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(copies)} rule files found" in out.stdout
    # a second start replaces the copies, leaving nothing stale
    (rules / "old.yaml").write_text("groups: []\n")
    monitoring.write_rule_files(rules)
    assert not (rules / "old.yaml").exists()


def test_no_gpu_series_is_needed_by_the_live_dashboards():
    """What tests/integration/test_dashboards.py runs: every panel but the DCGM ones."""
    live = [(n, t) for n, b in monitoring.rayplane_dashboards().items()
            for t, q in monitoring.panel_queries(b) if not DCGM.search(q)]
    assert len(live) >= 30
    assert Path(monitoring.MONITORING_DIR / "dashboards").is_dir()
