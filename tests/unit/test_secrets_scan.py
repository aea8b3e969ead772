"""No secret in the repository: ``detect-secrets`` (Yelp's scanner, every default plugin and
filter) over every file git tracks or would track, and nothing found but the allowlist below,
each entry with why it is not a secret.

A test fixture's fake key is marked where it is written, with ``# pragma: allowlist secret``
(detect-secrets' own inline allowlist); what cannot carry a comment (rendered manifests,
names that merely look like secrets to the keyword detector) is listed here by value and
file. Anything new fails the test with the file, line and detector: remove the secret, or,
when it is none, mark it or add it here with the reason.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCANNER = Path(sys.executable).parent / "detect-secrets"

_SECRET_NAMES = "a Kubernetes Secret's name (External Secrets fills it), not its value"  # pragma: allowlist secret
_DATA_KEYS = "a data key inside a Kubernetes Secret (the field name, not its value)"
_WRONG = "a wrong credential a test sends to be refused"
_FAKE_DSN = "a fake PostgreSQL password in a test of DSN parsing and redaction"

#: value -> (why it is no secret, the files it may appear in)
ALLOWED: dict[str, tuple[str, tuple[str, ...]]] = {
    "rayplane-ray-auth": (_SECRET_NAMES, (
        "raycluster/kuberay/pods.py", "tests/unit/raycluster/test_render_agents.py",
        "infra/k8s/16-raycluster.yaml", "infra/k8s/17-rayservice.yaml",
        "infra/k8s/18-rayjob.yaml", "infra/k8s/19-raycronjob.yaml")),
    "linkerd-trust-anchor": (_SECRET_NAMES, ("infra/k8s/11-issuer.yaml",
                                             "infra/k8s/12-certificate.yaml")),
    "linkerd-identity-issuer": (_SECRET_NAMES, ("infra/k8s/12-certificate.yaml",)),
    "ca-bundle.crt": (_DATA_KEYS, ("infra/k8s/08-externalsecret.yaml",)),
    "rayplane-agents-db": (_SECRET_NAMES, ("raycluster/kuberay/agents.py",
                                           "tests/unit/raycluster/test_render_agents.py")),
    "rayplane-agents-model-key": (_SECRET_NAMES, ("raycluster/kuberay/agents.py",)),
    "rayplane-redis": (_SECRET_NAMES, ("raycluster/kuberay/pods.py",)),
    "rayplane-serve-api-keys": (_SECRET_NAMES, ("raycluster/kuberay/pods.py",)),
    "grafana-admin": (_SECRET_NAMES, ("infra/helm/kube-prometheus-stack/values.yaml",)),
    # The feature store's database bootstrap Job mounts both logins as files (issue 17).
    "mlflow-db": (_SECRET_NAMES, ("infra/k8s/25-job.yaml",)),
    "feast-online-store": (_SECRET_NAMES, ("infra/k8s/25-job.yaml",)),
    "password": (_DATA_KEYS, ("infra/helm/mlflow/values.yaml",
                              "infra/k8s/08-externalsecret.yaml")),
    "username": (_DATA_KEYS, ("infra/k8s/08-externalsecret.yaml",)),
    "api_key": (_DATA_KEYS, ("infra/k8s/08-externalsecret.yaml",
                             "raycluster/kuberay/agents.py")),
    "auth_token": (_DATA_KEYS, ("infra/k8s/08-externalsecret.yaml",
                                "raycluster/kuberay/pods.py")),
    "keys": (_DATA_KEYS, ("infra/k8s/08-externalsecret.yaml", "raycluster/kuberay/pods.py")),
    "dsn": (_DATA_KEYS, ("raycluster/kuberay/agents.py",)),
    "aws-secrets-manager": ("the name of the External Secrets ClusterSecretStore",
                            ("raycluster/secrets.py",)),
    "rayplane/production": ("the Secrets Manager name prefix of the production environment",
                            ("raycluster/environments/production.yaml",)),
    "arn:${local.partition}:secretsmanager:${local.region}:${local.account_id}:secret:"
    "${var.secrets_manager_prefix}/*": (
        "the IAM policy's resource pattern for the platform's Secrets Manager entries",
        ("infra/terraform/modules/platform-services/main.tf",)),
    "RAYPLANE_MODEL_API_KEY": ("the env variable the model's key is read from, not the key",
                               ("agents/configs/eks.yaml", "infra/k8s/17-rayservice.yaml")),
    "null": ("an unset api_key_file in a rendered agents config",
             ("infra/k8s/17-rayservice.yaml",)),
    "MY_KEY": ("an env variable name in a test", ("tests/unit/agents/test_frameworks.py",)),
    "AGENTS_TEST_KEYS": ("an env variable name in a test", ("tests/unit/agents/test_server.py",)),
    "rp-env": ("a fake key a test puts in a test env variable",
               ("tests/unit/agents/test_frameworks.py",)),
    "wrong": (_WRONG, ("tests/e2e/test_serve_vllm.py",)),
    "not-a-key": (_WRONG, ("tests/integration/test_agents_deploy.py",
                           "tests/integration/test_agents_mcp.py")),
    "not-the-password": (_WRONG, ("tests/integration/test_postgres.py",)),
    "testing": ("moto's documented fake AWS credentials (the Terraform test's local S3)",
                ("tests/integration/test_terraform.py",)),
    "s3cret": (_FAKE_DSN, ("tests/unit/agents/test_checkpoint.py",)),
    "s3 cret": (_FAKE_DSN, ("tests/unit/agents/test_checkpoint.py",)),
    "p%40ss": (_FAKE_DSN, ("tests/unit/agents/test_checkpoint.py",)),
    "pw": (_FAKE_DSN, ("tests/unit/agents/test_checkpoint.py",)),
    "s3cret-pw": (_FAKE_DSN, ("tests/unit/agents/test_checkpoint.py",
                              "tests/unit/raycluster/test_local_plan.py")),
    "secret": (_FAKE_DSN, ("tests/unit/agents/test_server.py",)),
    "0123456789abcdef0123456789abcdef01000000": (  # pragma: allowlist secret
        "a made-up placement group id in a test of Ray's usage summary",
        ("tests/unit/agents/test_platform_tools.py",)),
}


def _sha1(value: str) -> str:
    return hashlib.sha1(value.encode()).hexdigest()  # detect-secrets' hashed_secret


def scan(paths: list[str], cwd: Path) -> dict[str, list[dict]]:
    """detect-secrets' findings (file -> results) over ``paths``, its default settings."""
    if not SCANNER.exists():
        pytest.fail(f"{SCANNER} is missing: install the dev extra (detect-secrets)")
    out = subprocess.run([str(SCANNER), "scan", *paths], cwd=cwd, capture_output=True,
                         text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["results"]


def repository_files() -> list[str]:
    """Tracked files, and new ones git would track (not ignored), that exist."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    if out.returncode != 0:
        pytest.skip(f"not a git checkout ({out.stderr.strip()}): the scan covers the files "
                    "git tracks; run it from a clone")
    return sorted(p for p in set(out.stdout.splitlines()) if (REPO / p).is_file())


def test_the_scanner_finds_a_planted_secret(tmp_path):
    """The scan is live: a key-shaped value (built here, so this file holds none) is found,
    and the inline pragma silences it."""
    fake = "AKIA" + "Z7Q3" * 4
    (tmp_path / "leak.py").write_text(f'aws_access_key_id = "{fake}"\n')
    (tmp_path / "marked.py").write_text(
        f'aws_access_key_id = "{fake}"  # pragma: allowlist secret\n')
    found = scan(["leak.py", "marked.py"], tmp_path)
    assert {r["type"] for r in found["leak.py"]} >= {"AWS Access Key"}
    assert _sha1(fake) in {r["hashed_secret"] for r in found["leak.py"]}
    assert "marked.py" not in found


def test_no_secret_in_the_repository_but_the_allowlisted():
    files = repository_files()
    assert len(files) > 100, files
    allowed = {_sha1(value): (value, paths) for value, (_why, paths) in ALLOWED.items()}
    unexpected, seen = [], set()
    for path, results in scan(files, REPO).items():
        for r in results:
            value, paths = allowed.get(r["hashed_secret"], (None, ()))
            if path in paths:
                seen.add(value)
                continue
            unexpected.append(f"{path}:{r['line_number']}: {r['type']}")
    assert not unexpected, (
        "detect-secrets found what looks like secrets; remove them, or when one is a test's "
        "fake, mark its line '# pragma: allowlist secret' (or list it in ALLOWED with the "
        "reason):\n  " + "\n  ".join(unexpected))
