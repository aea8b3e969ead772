"""Test markers and the switches that enable the tests needing more than this machine.

- unit: nothing but Python (tests/unit).
- integration: a real local Ray cluster, MLflow server, HTTP (tests/integration).
- e2e: a Kubernetes cluster (RAYPLANE_E2E_KUBECONFIG) or a GPU (tests/e2e).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RAYPLANE_SHARED", REPO.parent / "shared"))
SCHEMAS = SHARED / "schemas"


def pytest_configure(config: pytest.Config) -> None:
    for line in (
        "unit: needs nothing but Python",
        "integration: needs a local Ray cluster and services started by fixtures",
        "e2e: needs a Kubernetes cluster or a GPU; skipped with the reason elsewhere",
        "gpu: needs an NVIDIA GPU (and vLLM for the vLLM engine)",
        "kubernetes: needs a cluster (RAYPLANE_E2E_KUBECONFIG)",
        "slow: takes more than a minute",
    ):
        config.addinivalue_line("markers", line)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).relative_to(REPO).parts
        if len(parts) > 1 and parts[1] in ("unit", "integration", "e2e"):
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
    shutil.which("terraform") is None, reason="terraform is not on PATH")


@pytest.fixture(scope="session")
def schemas_dir() -> Path:
    if not SCHEMAS.is_dir():
        pytest.skip(f"{SCHEMAS} is absent: set RAYPLANE_SHARED to the shared/ folder")
    return SCHEMAS
