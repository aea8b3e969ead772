"""Test markers, the switches that enable the tests needing more than this machine, and the
fixtures every folder shares.

Markers (the only place they are registered; pytest runs with ``--strict-markers``):

- unit, integration, reliability, e2e: set from the folder (tests/unit: nothing but Python;
  tests/integration: a real local Ray cluster, MLflow server, HTTP, terraform against moto,
  checkov; tests/reliability: faults and hostile input against the session's platform, each
  bounded in requests and time; tests/e2e: a Kubernetes cluster or a GPU).
- slow: the test takes more than about a minute; ``make test-fast`` deselects it.
- gpu, kubernetes: what an e2e test needs; ``requires_gpu`` / ``requires_kubernetes`` skip it
  elsewhere, saying how to enable it.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

#: The session platform's fixtures (local_cluster, cluster_env, agent_model), one for every folder.
pytest_plugins = ["tests.support.platform", "tests.support.features", "tests.support.duration",
                  "tests.support.terraform", "tests.support.upstream"]

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RAYPLANE_SHARED", REPO.parent / "shared"))
SCHEMAS = SHARED / "schemas"
#: The AWS provider the machines carry (infra/terraform/mirror.tfrc points terraform at it).
TF_PROVIDER_MIRROR = Path("/opt/tf-plugins/registry.terraform.io/hashicorp/aws")
#: uvx runs tools whose pins conflict with the project's (checkov) in their own environment.
UVX = REPO / ".tools" / "bin" / "uvx"

MARKERS = {
    "unit": "needs nothing but Python (tests/unit)",
    "integration": "needs a local Ray cluster, services or tools started by fixtures "
                   "(tests/integration)",
    "reliability": "kills, stops or floods parts of the session's platform, or sends it "
                   "hostile input (tests/reliability)",
    "e2e": "needs a Kubernetes cluster or a GPU (tests/e2e); skipped with the reason elsewhere",
    "gpu": "needs an NVIDIA GPU (and vLLM for the vLLM engine)",
    "kubernetes": "needs a cluster (RAYPLANE_E2E_KUBECONFIG)",
    "slow": "takes more than about a minute; `make test-fast` deselects it",
}
FOLDER_MARKERS = ("unit", "integration", "reliability", "e2e")


def pytest_configure(config: pytest.Config) -> None:
    for name, meaning in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {meaning}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = item.path.relative_to(REPO).parts
        if len(parts) > 1 and parts[1] in FOLDER_MARKERS:
            item.add_marker(getattr(pytest.mark, parts[1]))


def has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - any import problem means no usable GPU
        return False


requires_schemas = pytest.mark.skipif(
    not SCHEMAS.is_dir(), reason=f"{SCHEMAS} is absent: set RAYPLANE_SHARED to the shared/ folder")
requires_gpu = pytest.mark.skipif(
    not has_gpu(), reason="needs an NVIDIA GPU (run on a GPU pool node or a machine with CUDA)")
requires_kubernetes = pytest.mark.skipif(
    not os.environ.get("RAYPLANE_E2E_KUBECONFIG"),
    reason="needs a Kubernetes cluster: set RAYPLANE_E2E_KUBECONFIG to its kubeconfig")
requires_terraform = pytest.mark.skipif(
    shutil.which("terraform") is None or not TF_PROVIDER_MIRROR.is_dir(),
    reason=f"needs terraform 1.10+ on PATH and the AWS provider mirror {TF_PROVIDER_MIRROR} (or "
           "adapt infra/terraform/mirror.tfrc to where the provider is)")
requires_uvx = pytest.mark.skipif(
    not UVX.is_file(), reason=f"needs uvx at {UVX} (`make env` installs it) to run checkov")


@pytest.fixture(scope="session")
def schemas_dir() -> Path:
    if not SCHEMAS.is_dir():
        pytest.skip(f"{SCHEMAS} is absent: set RAYPLANE_SHARED to the shared/ folder")
    return SCHEMAS


@pytest.fixture
def dead_mlflow() -> str:
    """The URL of a loopback port nothing listens on (bound, then closed): an MLflow server
    that is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def pytest_terminal_summary(terminalreporter):
    """The figures the tests measured (``record_property``: requests lost to a fault, seconds
    to recover), printed after the run so that the CI log keeps them."""
    rows = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) == "call" and getattr(report, "user_properties",
                                                                    None):
                rows[report.nodeid] = report.user_properties
    if rows:
        terminalreporter.section("measured")
        for nodeid, props in sorted(rows.items()):
            terminalreporter.write_line(f"{nodeid}: " + ", ".join(f"{k}={v}" for k, v in props))
