"""The feature store's AWS side (issue 17), checked on the session's one apply of
environments/production against moto (tests/support/terraform.py ``deployment``; this file
sorts before test_terraform.py, whose last tests apply again and destroy): the Feast bucket
(registry and offline store), the feature-store IRSA role, the online store's login in Secrets
Manager, and the outputs that fill the environment's ``feature_store`` section. The online
store itself is a database on the MLflow instance, checked in test_terraform.py."""

from __future__ import annotations

import fnmatch
import json

import pytest
import yaml

from raycluster.environments import Environment
from raycluster.kuberay.features import feature_store_yaml
from tests.conftest import requires_terraform
from tests.support.infra import ROOT, aws_external_secrets, irsa_subject, rendered
from tests.support.terraform import (
    ACCOUNT,
    CLUSTER,
    PREFIX,
    REGION,
    Deployment,
    role_statements,
    trust_subjects,
)

pytestmark = [requires_terraform, pytest.mark.slow]


def test_the_feast_bucket_is_versioned_kms_encrypted_private_tls_only_and_logged(
        deployment: Deployment):
    s3 = deployment.client("s3")
    bucket = deployment.out["feature_store_bucket_name"]
    assert bucket == f"{CLUSTER}-feast-{ACCOUNT}"
    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
    (rule,) = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    assert rule["ApplyServerSideEncryptionByDefault"] == {
        "SSEAlgorithm": "aws:kms", "KMSMasterKeyID": deployment.out["data_kms_key_arn"]}
    assert rule["BucketKeyEnabled"] is True
    block = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
    assert all(block.values()) and len(block) == 4
    policy = json.loads(s3.get_bucket_policy(Bucket=bucket)["Policy"])
    conditions = [s["Condition"] for s in policy["Statement"] if s["Effect"] == "Deny"]
    assert {"Bool": {"aws:SecureTransport": "false"}} in conditions
    assert {"NumericLessThan": {"s3:TlsVersion": "1.2"}} in conditions
    assert not [s for s in policy["Statement"] if s["Effect"] == "Allow"]
    (lifecycle,) = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert lifecycle["NoncurrentVersionExpiration"]["NoncurrentDays"] == 30
    logging = s3.get_bucket_logging(Bucket=bucket)["LoggingEnabled"]
    assert logging == {"TargetBucket": f"{deployment.out['bucket_name']}-access-logs",
                       "TargetPrefix": "feast/"}
    log_policy = json.loads(s3.get_bucket_policy(Bucket=logging["TargetBucket"])["Policy"])
    (delivery,) = [s for s in log_policy["Statement"] if s["Effect"] == "Allow"]
    assert f"arn:aws:s3:::{bucket}" in delivery["Condition"]["ArnLike"]["aws:SourceArn"]


def test_the_feature_store_role_reaches_only_the_feast_bucket(deployment: Deployment):
    iam = deployment.client("iam")
    arn = deployment.out["feature_store_role_arn"]
    assert arn == f"arn:aws:iam::{ACCOUNT}:role/{CLUSTER}-feature-store"
    role = arn.rsplit("/", 1)[-1]
    # Trusted by the accounts the rendered feature-store pods run as (the feature store's jobs
    # in training, the agents' workers in agentic), nothing else.
    accounts = [o for o in rendered("03-serviceaccount.yaml")
                if o["metadata"]["name"] == "feature-store"]
    assert {sa["metadata"]["namespace"] for sa in accounts} == {"training", "agentic"}
    for sa in accounts:
        assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].rsplit(
            "/", 1)[-1] == role
    assert trust_subjects(iam, role, deployment.out["oidc_provider_arn"]) == {
        irsa_subject(f"{sa['metadata']['namespace']}/feature-store") for sa in accounts}
    bucket_arn = f"arn:aws:s3:::{deployment.out['feature_store_bucket_name']}"
    statements = role_statements(iam, role)
    for st in statements:
        (service,) = {a.split(":")[0] for a in st["Action"]}
        if service == "s3":
            assert set(st["Resource"]) <= {bucket_arn, f"{bucket_arn}/*"}, st
        else:
            assert service == "kms", st
            assert st["Resource"] == [deployment.out["data_kms_key_arn"]], st
            assert st["Condition"]["StringEquals"] == {
                "kms:ViaService": f"s3.{REGION}.amazonaws.com"}, st
    covered = {a for s in statements for a in s["Action"]}
    assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket", "kms:Decrypt",
            "kms:GenerateDataKey"} <= covered
    assert deployment.out["bucket_name"] not in json.dumps(statements)  # not the artifacts


def test_the_online_store_login_is_generated_encrypted_and_readable_by_external_secrets(
        deployment: Deployment):
    sm, iam = deployment.client("secretsmanager"), deployment.client("iam")
    name = deployment.out["feature_store_db_secret_name"]
    assert name == f"{PREFIX}/feast-db"
    described = sm.describe_secret(SecretId=name)
    assert described["KmsKeyId"] == deployment.out["data_kms_key_arn"]
    login = json.loads(sm.get_secret_value(SecretId=name)["SecretString"])
    assert login["username"] == deployment.out["feature_store_db_name"] == "feast"
    assert len(login["password"]) == 48 and login["password"].isalnum()
    # External Secrets' role reads it (the environment's prefix), as the rendered
    # ExternalSecrets ask: the feature store's pods' (training), the agents' workers' (agentic)
    # and the bootstrap Job's (mlops).
    copies = [e for e in aws_external_secrets() if e["metadata"]["name"] == "feast-online-store"]
    assert {e["metadata"]["namespace"] for e in copies} == {"training", "agentic", "mlops"}
    assert {d["remoteRef"]["key"] for e in copies for d in e["spec"]["data"]} == {name}
    role = deployment.out["external_secrets_role_arn"].rsplit("/", 1)[-1]
    resources = [r for s in role_statements(iam, role) if s["Action"][0].startswith("secrets")
                 for r in s["Resource"]]
    assert any(fnmatch.fnmatchcase(described["ARN"], r) for r in resources)


def test_the_outputs_fill_the_feature_store_section(deployment: Deployment):
    """What docs/deployment.md tells the operator to copy into the environment file."""
    out = deployment.out
    data = yaml.safe_load((ROOT / "raycluster" / "environments" / "production.yaml").read_text())
    data["feature_store"].update(bucket=out["feature_store_bucket_name"],
                                 role_arn=out["feature_store_role_arn"])
    data["feature_store"]["database"].update(
        host=out["mlflow_db_address"], port=out["mlflow_db_port"],
        secret=out["feature_store_db_secret_name"])
    config = yaml.safe_load(feature_store_yaml(Environment.parse(data).feature_store))
    assert config["registry"]["path"] == f"s3://{CLUSTER}-feast-{ACCOUNT}/features/registry.db"
    online = config["online_store"]
    assert (online["host"], online["port"]) == (out["mlflow_db_address"], out["mlflow_db_port"])
    # A database and role of their own, the ones the login Terraform generated is for.
    assert online["database"] == online["user"] == out["feature_store_db_name"]
    assert online["database"] != out["mlflow_db_name"]
