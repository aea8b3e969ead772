"""The contract between Terraform's platform services (infra/terraform/modules/platform-services)
and what the Kubernetes side expects of them: the service accounts the Helm releases run as and
the rendered ClusterSecretStore names (the IRSA trust), the secret names the rendered
ExternalSecrets read, the image repository of the environment file, and production-safe
defaults for the switches that only tests turn off. No terraform needed: the files are read."""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

from raycluster.catalog import load_catalog
from raycluster.environments import load_environment
from raycluster.karpenter import render_karpenter
from raycluster.terraform import TERRAFORM_DIR, render_tfvars
from tests.support.infra import (
    aws_external_secrets,
    aws_secret_store,
    external_secrets_service_account,
    helm_release,
    helm_values,
    tf_default,
    velero_service_account,
)

ENV_VARIABLES = TERRAFORM_DIR / "environments" / "production" / "variables.tf"
MODULE_VARIABLES = TERRAFORM_DIR / "modules" / "platform-services" / "variables.tf"
MODULE_MAIN = TERRAFORM_DIR / "modules" / "platform-services" / "main.tf"


CLUSTER = tf_default(ENV_VARIABLES, "cluster_name")


@pytest.mark.parametrize("variables_tf", [ENV_VARIABLES, MODULE_VARIABLES],
                         ids=["environment", "module"])
def test_irsa_trust_defaults_are_the_service_accounts_helm_runs(variables_tf: Path):
    assert tf_default(variables_tf, "external_secrets_service_accounts") == [
        external_secrets_service_account()]
    assert tf_default(variables_tf, "velero_service_accounts") == [velero_service_account()]


def test_the_cluster_secret_store_authenticates_as_the_trusted_account():
    store = aws_secret_store()
    ref = store["spec"]["provider"]["aws"]["auth"]["jwt"]["serviceAccountRef"]
    assert [f"{ref['namespace']}/{ref['name']}"] == tf_default(
        ENV_VARIABLES, "external_secrets_service_accounts")


@pytest.mark.parametrize("release, annotation_path, role", [
    ("external-secrets", ("serviceAccount", "annotations"), "external-secrets"),
    ("velero", ("serviceAccount", "server", "annotations"), "velero"),
])
def test_helm_values_annotate_the_role_terraform_names(release, annotation_path, role):
    node = helm_values(release)
    for key in annotation_path:
        node = node[key]
    arn = node["eks.amazonaws.com/role-arn"]
    # Terraform names the roles <cluster>-<role> (modules/platform-services/main.tf).
    assert arn.rsplit("/", 1)[-1] == f"{CLUSTER}-{role}"
    assert f'name               = "${{var.name}}-{role}"' in MODULE_MAIN.read_text()


def test_every_rendered_external_secret_is_below_the_prefix_external_secrets_may_read():
    prefix = tf_default(ENV_VARIABLES, "secrets_manager_prefix")
    assert prefix == load_environment("production").secrets_manager_prefix
    keys = {d["remoteRef"]["key"] for es in aws_external_secrets()
            for d in es["spec"]["data"]}
    assert keys, "no ExternalSecret rendered"
    # Secrets Manager appends -XXXXXX to a secret's name in its ARN; the policy's pattern is
    # <prefix>/* (modules/platform-services/main.tf, secrets_arn_pattern).
    outside = [k for k in keys if not fnmatchcase(f"{k}-AbCdEf", f"{prefix}/*")]
    # Except the password RDS manages for its database (the agents' DSN is composed from it),
    # which the role may read by its exact ARN (ReadMLflowsDatabasePassword).
    db_secrets = [a.database.secret for a in load_environment("production").agents]
    assert outside == db_secrets
    assert all(fnmatchcase(k, "arn:aws:secretsmanager:*:secret:rds!db-*") for k in outside)
    assert "aws_db_instance.mlflow.master_user_secret[0].secret_arn" in MODULE_MAIN.read_text()
    # The Redis AUTH token Terraform writes is the one the rayplane-redis ExternalSecret reads.
    (redis_key,) = {d["remoteRef"]["key"] for es in aws_external_secrets()
                    if es["metadata"]["name"] == "rayplane-redis" for d in es["spec"]["data"]}
    assert redis_key == f"{prefix}/redis-auth-token"
    assert 'name                    = "${var.secrets_manager_prefix}/redis-auth-token"' in \
        MODULE_MAIN.read_text()


def test_the_image_repository_is_the_one_the_environment_pulls_from():
    repository = load_environment("production").images.repository
    host, path = repository.split("/", 1)
    assert re.fullmatch(r"\d{12}\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com", host), repository
    assert path == tf_default(ENV_VARIABLES, "ecr_repository_name")
    assert path == tf_default(MODULE_VARIABLES, "ecr_repository_name")


@pytest.mark.parametrize("variable, production_value", [
    ("mlflow_db_deletion_protection", True),
    ("mlflow_db_skip_final_snapshot", False),
    ("secret_recovery_window_days", 30),
    ("force_destroy_buckets", False),
    ("enable_gcs_redis", True),
])
def test_switches_only_tests_turn_default_to_production_values(variable, production_value):
    assert tf_default(ENV_VARIABLES, variable) == production_value


# -- Karpenter (issue 15): the names Terraform gives, as the chart and the EC2NodeClasses use them

KARPENTER_DIR = TERRAFORM_DIR / "modules" / "karpenter"


def test_the_karpenter_chart_runs_as_the_trusted_account_and_reads_terraforms_queue():
    release, values = helm_release("karpenter"), helm_values("karpenter")
    service_account = f"{release['namespace']}/{values['serviceAccount']['name']}"
    assert service_account == tf_default(ENV_VARIABLES, "karpenter_service_account") == \
        tf_default(KARPENTER_DIR / "variables.tf", "service_account")
    # Terraform names the role <cluster>-karpenter-controller and the queue <cluster>-karpenter.
    role_arn = values["serviceAccount"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert role_arn.rsplit("/", 1)[-1] == f"{CLUSTER}-karpenter-controller"
    assert 'name               = "${var.cluster_name}-karpenter-controller"' in \
        (KARPENTER_DIR / "controller.tf").read_text()
    assert values["settings"]["interruptionQueue"] == f"{CLUSTER}-karpenter"
    assert 'interruption_queue_name = "${var.cluster_name}-karpenter"' in \
        (KARPENTER_DIR / "interruption.tf").read_text()
    assert values["settings"]["clusterName"] == CLUSTER


def test_the_ec2nodeclasses_name_the_role_placement_groups_and_tags_terraform_makes():
    env = load_environment("production")
    assert env.cluster_name == CLUSTER
    main = (KARPENTER_DIR / "main.tf").read_text()
    assert 'name               = "${var.cluster_name}-karpenter-node"' in main
    assert 'name     = "${var.cluster_name}-${each.key}"' in main  # the placement groups
    classes = {o["metadata"]["name"]: o["spec"] for o in render_karpenter(load_catalog(), env)
               if o["kind"] == "EC2NodeClass"}
    karpenter_pools = render_tfvars(load_catalog())["karpenter_pools"]
    assert set(classes) == set(karpenter_pools)
    for pool, spec in classes.items():
        assert spec["role"] == f"{CLUSTER}-karpenter-node", pool
        discovery = [{"tags": {"karpenter.sh/discovery": CLUSTER}}]
        assert spec["subnetSelectorTerms"] == spec["securityGroupSelectorTerms"] == discovery
        selector = spec.get("placementGroupSelector")
        assert selector == ({"name": f"{CLUSTER}-{pool}"} if karpenter_pools[pool]["efa"]
                            else None), pool


@pytest.mark.parametrize("variables_tf, variable", [
    (ENV_VARIABLES, "enable_network_policy"),
    (TERRAFORM_DIR / "modules" / "eks-cluster" / "variables.tf", "enable_network_policy"),
    (ENV_VARIABLES, "enable_placement_groups"),
])
def test_network_policy_enforcement_and_placement_groups_default_on(variables_tf, variable):
    # Finding 4: the VPC CNI enforces NetworkPolicies (tests/integration/test_terraform.py
    # reads the add-on's planned configuration).
    assert tf_default(variables_tf, variable) is True


def test_the_load_balancer_controller_runs_as_the_trusted_account_and_annotates_its_role():
    release, values = helm_release("aws-load-balancer-controller"), \
        helm_values("aws-load-balancer-controller")
    service_account = f"{release['namespace']}/{values['serviceAccount']['name']}"
    assert [service_account] == \
        tf_default(ENV_VARIABLES, "load_balancer_controller_service_accounts") == \
        tf_default(MODULE_VARIABLES, "load_balancer_controller_service_accounts")
    role_arn = values["serviceAccount"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert role_arn.rsplit("/", 1)[-1] == f"{CLUSTER}-aws-load-balancer-controller"
    module = TERRAFORM_DIR / "modules" / "platform-services"
    assert 'name               = "${var.name}-aws-load-balancer-controller"' in \
        (module / "load-balancer-controller.tf").read_text()
    assert values["clusterName"] == CLUSTER
