"""`rayplane apply` against a real Kubernetes cluster that runs the operators of infra/helm:
the committed infra/k8s folder passes the API server's own validation (server-side dry run),
CRDs included. Without a cluster it is skipped, saying how to enable it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, requires_kubernetes
from tests.support.infra import K8S_DIR

pytestmark = [pytest.mark.kubernetes, requires_kubernetes]


def test_apply_server_side_dry_run_against_a_cluster():
    proc = subprocess.run(
        [sys.executable, "-m", "raycluster", "apply", str(K8S_DIR), "--kubeconfig",
         os.environ["RAYPLANE_E2E_KUBECONFIG"], "--dry-run"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"\d+ objects validated \(dry run\)", proc.stdout)
