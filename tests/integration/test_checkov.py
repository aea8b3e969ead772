"""checkov's static scan of what rayplane ships: the Terraform configuration and the rendered
Kubernetes folder. Each scan passes, really scanned something, and every skipped check carries
its reason in place. checkov runs through uvx in its own pinned environment (its pins conflict
with the project's), so these tests need .tools/bin/uvx and checkov's wheels (uv's cache)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from raycluster.terraform import TERRAFORM_DIR
from tests.conftest import UVX, requires_uvx
from tests.support.infra import K8S_DIR, pod_templates

CHECKOV = "checkov==3.3.30"

pytestmark = [requires_uvx, pytest.mark.timeout(600)]


def checkov(folder: Path, framework: str, report: Path) -> tuple[dict, subprocess.CompletedProcess]:
    """checkov's JSON report of ``folder`` (no download of external checks or mappings)."""
    proc = subprocess.run(
        [str(UVX), "--from", CHECKOV, "checkov", "-d", str(folder), "--framework", framework,
         "--compact", "--skip-download", "-o", "json", "--output-file-path", str(report)],
        capture_output=True, text=True, timeout=540, check=False,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})
    out = report / "results_json.json"
    assert out.is_file(), proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(out.read_text()), proc


def test_terraform_passes_with_every_skip_justified(tmp_path: Path):
    results, proc = checkov(TERRAFORM_DIR, "terraform", tmp_path / "report")
    summary, checks = results["summary"], results["results"]
    failed = [f"{c['check_id']} {c['resource']} ({c['file_path']})"
              for c in checks["failed_checks"]]
    assert failed == [] and proc.returncode == 0, failed or proc.stderr[-2000:]
    assert summary["passed"] > 250  # the modules were really scanned
    assert summary["skipped"] == len(checks["skipped_checks"]) > 0
    for skipped in checks["skipped_checks"]:
        reason = skipped["check_result"].get("suppress_comment", "")
        assert len(reason.split()) >= 6, f"{skipped['check_id']} in {skipped['file_path']} is " \
            f"skipped without a reason: {reason!r}"


def test_the_rendered_folder_and_its_pod_templates_pass(tmp_path: Path):
    """The committed infra/k8s (which tests/unit/raycluster/test_render.py keeps equal to a fresh
    render). checkov knows Pods but not KubeRay's CRDs, so every pod template is also written
    out as a Pod beside the folder; skips are checkov.io/skipN annotations on the templates,
    each with its reason."""
    scan = tmp_path / "scan"
    shutil.copytree(K8S_DIR, scan, ignore=shutil.ignore_patterns("*.md"))
    objects = [d for path in sorted(scan.glob("*.yaml"))
               for d in yaml.safe_load_all(path.read_text()) if d]
    pods = []
    for obj in objects:
        for i, (_, template) in enumerate(pod_templates(obj)):
            meta = template.get("metadata", {})
            pods.append({"apiVersion": "v1", "kind": "Pod",
                         "metadata": {"name": f"{obj['metadata']['name']}-{i}",
                                      "namespace": obj["metadata"]["namespace"], **meta},
                         "spec": template["spec"]})
    assert len(pods) >= 6, "no pod templates found in the rendered folder"
    (scan / "zz-pod-templates.yaml").write_text(yaml.safe_dump_all(pods))
    results, proc = checkov(scan, "kubernetes", tmp_path / "report")
    checks = results["results"]
    failed = [f"{r['check_id']} {r['resource']}" for r in checks.get("failed_checks", [])]
    assert failed == [] and proc.returncode == 0, "\n".join(failed) or proc.stderr[-2000:]
    assert results["summary"]["passed"] > 100
    skipped = checks.get("skipped_checks", [])
    assert skipped, "expected the justified skips to be reported"
    for r in skipped:
        reason = r["check_result"].get("suppress_comment", "")
        assert len(reason) > 20, f"{r['check_id']}: skipped without a reason"
    assert {r["check_id"] for r in skipped} >= {"CKV_K8S_38", "CKV_K8S_43"}
