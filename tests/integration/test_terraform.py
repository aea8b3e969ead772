"""Terraform for real. (checkov's scan of the configuration is in test_checkov.py.)

- ``terraform fmt -check`` and ``terraform validate`` of every module and environment, with the
  AWS provider from the machine's mirror (infra/terraform/mirror.tfrc; nothing is downloaded).
- ``terraform apply`` of environments/production against ``moto_server`` on loopback, boto3
  checks of what it made, a new catalog pool applied without a Terraform edit, then
  ``terraform destroy``.

The configuration is copied to a temporary folder; the test adds override files there (never to
the committed files) that point the provider at moto and use a local backend.

What moto cannot emulate, and how the test handles it:

- gated off by the environment's variables: ``enable_eks_addons`` (moto has no EKS add-on
  API), ``enable_access_entries`` (no EKS access-entry API), ``enable_backup_policies`` (no Data
  Lifecycle Manager, no EFS PutBackupPolicy), ``enable_gcs_redis`` (see ``MOTO_GATES``). That
  each is off here and on by default passes as a test; that its resources apply is a test of
  its own, skipped (before any work) with the reason while the gate is off;
- ignored drift, so that a second apply shows only real changes: moto drops the cluster's
  ``accessConfig`` and the node groups' ``updateConfig``, returns a default ``remoteAccess`` on
  node groups, and reports the launch template's own tags as a tag specification;
- moto has no ``DeleteFileSystemPolicy``: the EFS policy leaves the state before destroy (deleting
  the file system removes it).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import yaml

from raycluster.catalog import Catalog, load_catalog
from raycluster.environments import Environment
from raycluster.terraform import (
    AMI_TYPE_CPU,
    AMI_TYPE_GPU,
    EKS_TAINT_EFFECT,
    TERRAFORM_DIR,
    TFVARS_NAME,
    write_tfvars,
)
from tests.conftest import requires_terraform
from tests.support.infra import (
    A10G_POOL,
    ROOT,
    external_secrets_service_account,
    helm_values,
    irsa_subject,
    rendered,
    tf_default,
    velero_service_account,
)

TERRAFORM = shutil.which("terraform")
CLI_CONFIG = TERRAFORM_DIR / "mirror.tfrc"
REGION = "us-east-1"
ADMIN_ARN = "arn:aws:iam::123456789012:role/platform-admin"
API_CIDRS = ["203.0.113.0/24"]
CLUSTER = "rayplane-production"


def applies(test):
    """The apply/destroy cycle against moto: about 4 minutes on 2 cores, so marked slow."""
    return requires_terraform(pytest.mark.slow(test))


TF_DIRS = sorted(str(p.relative_to(TERRAFORM_DIR)) for p in
                 [*TERRAFORM_DIR.glob("modules/*"), *TERRAFORM_DIR.glob("environments/*")]
                 if p.is_dir())

#: The environment's switches for what moto lacks, and why each is off here.
MOTO_GATES = {
    "enable_eks_addons": (
        "aws_eks_addon",
        ("moto has no EKS add-on API (CreateAddon/DescribeAddon): VPC CNI, kube-proxy, CoreDNS "
         "and the EBS/EFS CSI drivers are not applied")),
    "enable_access_entries": (
        "aws_eks_access_entry",
        ("moto has no EKS access-entry API (CreateAccessEntry/AssociateAccessPolicy): cluster "
         "admins are not applied")),
    "enable_backup_policies": (
        "aws_dlm_lifecycle_policy",
        ("moto has no Data Lifecycle Manager and no EFS PutBackupPolicy: EBS snapshots and EFS "
         "backups are not applied")),
    "enable_gcs_redis": (
        "aws_elasticache_replication_group",
        ("moto makes no member cache clusters for a replication group (DescribeCacheClusters "
         "answers CacheClusterNotFound), so the provider cannot read it back: the GCS Redis is "
         "not applied (nor its subnet group: moto has no DeleteCacheSubnetGroup); its AUTH "
         "secret and security group are")),
}

def tf_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TF_"))}
    env.update({
        "TF_CLI_CONFIG_FILE": str(CLI_CONFIG), "TF_IN_AUTOMATION": "1", "TF_INPUT": "0",
        "CHECKPOINT_DISABLE": "1",
        # Fake credentials: nothing here may ever reach a real account.
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": REGION, "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true",
    })
    env.update(extra or {})
    return env


def terraform(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    # Flags go before positional arguments; `state` subcommands print no colour anyway.
    cmd = [TERRAFORM, *args] if args[0] == "state" else [TERRAFORM, args[0], "-no-color", *args[1:]]
    proc = subprocess.run(cmd, cwd=cwd, env=tf_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, (f"terraform {' '.join(args)} in {cwd} failed "
                                  f"({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                                  f"{proc.stderr[-4000:]}")
    return proc


def copy_configuration(dest: Path) -> Path:
    """The committed configuration, without local state or provider folders."""
    shutil.copytree(TERRAFORM_DIR, dest, ignore=shutil.ignore_patterns(
        ".terraform", "*.tfstate*", "*.tfplan", "moto_*.tf", "moto.auto.tfvars.json"))
    return dest


# -- fmt and validate -------------------------------------------------------------------

@requires_terraform
def test_fmt_check_passes():
    terraform("fmt", "-check", "-recursive", "-diff", str(TERRAFORM_DIR), cwd=TERRAFORM_DIR,
              timeout=60)


@requires_terraform
@pytest.mark.parametrize("tf_dir", TF_DIRS)
def test_validate_passes(tf_dir: str, tmp_path: Path):
    work = copy_configuration(tmp_path / "terraform") / tf_dir
    terraform("init", "-backend=false", "-input=false", cwd=work, timeout=120)
    result = json.loads(terraform("validate", "-json", cwd=work, timeout=120).stdout)
    assert result["valid"], result["diagnostics"]
    assert result["warning_count"] == 0, result["diagnostics"]


# -- apply against moto ------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"moto_server did not listen on 127.0.0.1:{port} in {timeout}s")


@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory):
    port = _free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        # AWS managed policies (AmazonEKSClusterPolicy...) exist in moto only when loaded.
        env={**tf_env(), "MOTO_IAM_LOAD_MANAGED_POLICIES": "true"},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_listening(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


#: The environment's variables for the apply against moto.
MOTO_TFVARS = {
    "public_access_cidrs": API_CIDRS,
    "cluster_admin_arns": [ADMIN_ARN],
    "force_destroy_buckets": True,
    # Test-only values: the defaults keep the database and secrets on destroy.
    "mlflow_db_deletion_protection": False,
    "mlflow_db_skip_final_snapshot": True,
    "secret_recovery_window_days": 0,
    **{gate: False for gate in MOTO_GATES},
}

MOTO_SERVICES = ("ec2", "eks", "efs", "iam", "kms", "logs", "s3", "sts", "dlm", "autoscaling",
                 "ecr", "elasticache", "rds", "secretsmanager")


def write_moto_overrides(root: Path, endpoint: str) -> None:
    endpoints = "\n".join(f'    {s} = "{endpoint}"' for s in MOTO_SERVICES)
    (root / "environments" / "production" / "moto_override.tf").write_text(f"""\
# Written by tests/integration/test_terraform.py into a temporary copy: a local backend and
# the provider pointed at moto_server on loopback.
terraform {{
  backend "local" {{}}
}}

provider "aws" {{
  region                      = "{REGION}"
  access_key                  = "testing"
  secret_key                  = "testing"
  skip_credentials_validation = true
  skip_requesting_account_id  = true
  skip_metadata_api_check     = true
  skip_region_validation      = true
  s3_use_path_style           = true
  max_retries                 = 2 # an API moto lacks fails fast instead of backing off
  endpoints {{
{endpoints}
  }}
}}
""")
    # Attributes moto does not store or answers with defaults; without these a second apply
    # would replace the cluster and every node group.
    (root / "modules" / "eks-cluster" / "moto_override.tf").write_text("""\
resource "aws_eks_cluster" "this" {
  lifecycle {
    ignore_changes = [access_config] # moto drops accessConfig
  }
}

# moto's EKS creates no cluster security group (the one managed nodes get): a stand-in.
output "cluster_security_group_id" {
  value = aws_security_group.moto_cluster_sg.id
}
""")
    (root / "modules" / "eks-cluster" / "moto_cluster_sg.tf").write_text("""\
resource "aws_security_group" "moto_cluster_sg" {
  name_prefix = "eks-cluster-sg-${var.name}-"
  description = "Stand-in for the cluster security group EKS makes (moto makes none)"
  vpc_id      = var.vpc_id
}
""")
    (root / "modules" / "node-pool" / "moto_override.tf").write_text("""\
resource "aws_eks_node_group" "pool" {
  lifecycle {
    # moto drops updateConfig and answers a default remoteAccess
    ignore_changes = [scaling_config[0].desired_size, remote_access, update_config]
  }
}

resource "aws_launch_template" "pool" {
  lifecycle {
    ignore_changes = [tag_specifications] # moto lists the template's own tags as one
  }
}
""")
    (root / "modules" / "platform-services" / "moto_override.tf").write_text("""\
resource "aws_db_instance" "mlflow" {
  lifecycle {
    # moto does not store Performance Insights settings
    ignore_changes = [performance_insights_enabled, performance_insights_kms_key_id,
    performance_insights_retention_period]
  }
}

resource "aws_db_parameter_group" "mlflow" {
  lifecycle {
    ignore_changes = [parameter] # moto answers no user-set parameters
  }
}

resource "aws_vpc_security_group_ingress_rule" "redis_from_nodes" {
  lifecycle {
    # moto drops the description and prefixes the referenced group with the account id
    ignore_changes = [description, referenced_security_group_id]
  }
}

resource "aws_vpc_security_group_ingress_rule" "mlflow_db_from_nodes" {
  lifecycle {
    ignore_changes = [description, referenced_security_group_id]
  }
}
""")
    (root / "environments" / "production" / "moto.auto.tfvars.json").write_text(
        json.dumps(MOTO_TFVARS, indent=2))


class Deployment:
    """The production environment applied to moto, with boto3 clients on the same endpoint."""

    def __init__(self, root: Path, endpoint: str):
        self.root = root
        self.env_dir = root / "environments" / "production"
        self.endpoint = endpoint
        self.destroyed = False
        self.timings: dict[str, float] = {}
        self.out: dict = {}

    def client(self, service: str):
        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def run(self, *args: str, timeout: float = 420) -> subprocess.CompletedProcess:
        started = time.monotonic()
        proc = terraform(*args, cwd=self.env_dir, timeout=timeout)
        self.timings[args[0]] = self.timings.get(args[0], 0) + time.monotonic() - started
        return proc

    def apply(self) -> str:
        return self.run("apply", "-auto-approve", "-input=false", "-parallelism=20").stdout

    def outputs(self) -> dict:
        out = json.loads(self.run("output", "-json", timeout=60).stdout)
        return {k: v["value"] for k, v in out.items()}

    def state(self) -> list[str]:
        return self.run("state", "list", timeout=60).stdout.split()

    def destroy(self) -> str:
        # moto has no DeleteFileSystemPolicy; deleting the file system removes the policy.
        if "module.storage.aws_efs_file_system_policy.shared" in self.state():
            self.run("state", "rm", "module.storage.aws_efs_file_system_policy.shared", timeout=60)
        # No refresh: the state is what the last apply left (and refreshed), and refreshing
        # every resource again costs most of a minute on 2 cores.
        out = self.run("destroy", "-auto-approve", "-input=false", "-parallelism=20",
                       "-refresh=false").stdout
        self.destroyed = True
        return out


@pytest.fixture(scope="module")
def deployment(moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory):
    root = copy_configuration(tmp_path_factory.mktemp("tf") / "terraform")
    write_moto_overrides(root, moto_endpoint)
    dep = Deployment(root, moto_endpoint)
    dep.run("init", "-input=false", timeout=120)
    try:
        dep.apply()
        dep.out = dep.outputs()
        yield dep
    finally:
        if not dep.destroyed:
            dep.destroy()  # never leave resources behind, even after a failed check
        print(f"\nterraform timings against moto (s): "
              f"{ {k: round(v, 1) for k, v in dep.timings.items()} }")


def _tags(items: list[dict]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in items or []}


@applies
def test_every_catalog_pool_is_a_node_group_with_its_shape(deployment: Deployment):
    eks, ec2 = deployment.client("eks"), deployment.client("ec2")
    catalog = load_catalog()
    assert sorted(eks.list_nodegroups(clusterName=CLUSTER)["nodegroups"]) == sorted(
        p.name for p in catalog.pools)
    data_key = deployment.out["data_kms_key_arn"]
    for pool in catalog.pools:
        ng = eks.describe_nodegroup(clusterName=CLUSTER, nodegroupName=pool.name)["nodegroup"]
        assert ng["instanceTypes"] == pool.instance_types, pool.name
        assert ng["capacityType"] == pool.capacity_type.value, pool.name
        assert ng["amiType"] == (AMI_TYPE_GPU if pool.has_gpu else AMI_TYPE_CPU), pool.name
        assert ng["labels"] == pool.node_labels, pool.name
        assert ng["taints"] == [
            {"key": t.key, "value": t.value, "effect": EKS_TAINT_EFFECT[t.effect]}
            for t in pool.taints], pool.name
        desired = pool.desired_nodes if pool.desired_nodes is not None else pool.min_nodes
        assert ng["scalingConfig"] == {"minSize": pool.min_nodes, "maxSize": pool.max_nodes,
                                       "desiredSize": desired}, pool.name
        assert sorted(ng["subnets"]) == sorted(deployment.out["private_subnet_ids"])
        # The launch template: encrypted gp3 root volume of the pool's size, IMDSv2 only.
        lt = ec2.describe_launch_template_versions(
            LaunchTemplateId=ng["launchTemplate"]["id"], Versions=[ng["launchTemplate"]["version"]]
        )["LaunchTemplateVersions"][0]["LaunchTemplateData"]
        (root,) = lt["BlockDeviceMappings"]
        assert root["Ebs"]["VolumeSize"] == pool.disk_size_gib, pool.name
        assert (root["Ebs"]["VolumeType"], root["Ebs"]["Encrypted"]) == ("gp3", True)
        assert root["Ebs"]["KmsKeyId"] == data_key
        assert lt["MetadataOptions"]["HttpTokens"] == "required"
        assert lt["MetadataOptions"]["HttpPutResponseHopLimit"] == 1


@applies
def test_the_cluster_is_private_allow_listed_encrypted_and_logged(deployment: Deployment):
    cluster = deployment.client("eks").describe_cluster(name=CLUSTER)["cluster"]
    assert cluster["version"] == "1.33"
    vpc = cluster["resourcesVpcConfig"]
    assert vpc["endpointPrivateAccess"] is True
    assert vpc["publicAccessCidrs"] == API_CIDRS
    assert cluster["encryptionConfig"] == [{"resources": ["secrets"], "provider": {
        "keyArn": deployment.out["secrets_kms_key_arn"]}}]
    enabled = {t for entry in cluster["logging"]["clusterLogging"] if entry["enabled"]
               for t in entry["types"]}
    assert enabled == {"api", "audit", "authenticator", "controllerManager", "scheduler"}
    # IRSA: the OIDC provider is the cluster's issuer.
    issuer = cluster["identity"]["oidc"]["issuer"].removeprefix("https://")
    providers = [p["Arn"] for p in deployment.client("iam").list_open_id_connect_providers()[
        "OpenIDConnectProviderList"]]
    assert deployment.out["oidc_provider_arn"] in providers
    assert deployment.out["oidc_provider_arn"].endswith(issuer)
    assert deployment.out["kubeconfig_command"] == (
        f"aws eks update-kubeconfig --region {REGION} --name {CLUSTER}")


@applies
def test_the_network_spans_three_zones_with_load_balancer_tags(deployment: Deployment):
    ec2 = deployment.client("ec2")
    in_vpc = [{"Name": "vpc-id", "Values": [deployment.out["vpc_id"]]}]
    subnets = ec2.describe_subnets(Filters=in_vpc)["Subnets"]
    private = [s for s in subnets if _tags(s["Tags"]).get("kubernetes.io/role/internal-elb") == "1"]
    public = [s for s in subnets if _tags(s["Tags"]).get("kubernetes.io/role/elb") == "1"]
    assert sorted(s["SubnetId"] for s in private) == sorted(deployment.out["private_subnet_ids"])
    assert len({s["AvailabilityZone"] for s in private}) == 3
    assert len({s["AvailabilityZone"] for s in public}) == 3
    assert all(_tags(s["Tags"])[f"kubernetes.io/cluster/{CLUSTER}"] == "shared" for s in subnets)
    assert not any(s["MapPublicIpOnLaunch"] for s in subnets)
    nats = ec2.describe_nat_gateways(Filters=in_vpc)
    assert len([n for n in nats["NatGateways"] if n["State"] == "available"]) == 3
    flow_logs = ec2.describe_flow_logs()["FlowLogs"]
    assert [f["ResourceId"] for f in flow_logs] == [deployment.out["vpc_id"]]


@applies
def test_efs_is_encrypted_mounted_in_every_zone_and_tls_only(deployment: Deployment):
    efs = deployment.client("efs")
    fs_id = deployment.out["efs_id"]
    (fs,) = efs.describe_file_systems(FileSystemId=fs_id)["FileSystems"]
    assert fs["Encrypted"] is True
    assert fs["KmsKeyId"] == deployment.out["data_kms_key_arn"]
    targets = efs.describe_mount_targets(FileSystemId=fs_id)["MountTargets"]
    assert sorted(t["SubnetId"] for t in targets) == sorted(deployment.out["private_subnet_ids"])
    (ap,) = efs.describe_access_points(FileSystemId=fs_id)["AccessPoints"]
    assert ap["AccessPointId"] == deployment.out["efs_access_point_id"]
    assert ap["PosixUser"] == {"Uid": 1000, "Gid": 100}
    assert ap["RootDirectory"]["Path"] == "/rayplane"
    policy = json.loads(efs.describe_file_system_policy(FileSystemId=fs_id)["Policy"])
    deny = [s for s in policy["Statement"] if s["Effect"] == "Deny"]
    assert deny and deny[0]["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}


@applies
def test_the_bucket_is_versioned_kms_encrypted_private_and_tls_only(deployment: Deployment):
    s3 = deployment.client("s3")
    bucket = deployment.out["bucket_name"]
    assert bucket == f"{CLUSTER}-artifacts-123456789012"
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
    (lifecycle,) = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert lifecycle["Transitions"][0]["StorageClass"] == "STANDARD_IA"
    assert lifecycle["NoncurrentVersionExpiration"]["NoncurrentDays"] == 90
    logging = s3.get_bucket_logging(Bucket=bucket)["LoggingEnabled"]
    assert logging["TargetBucket"] == f"{bucket}-access-logs"


@applies
def test_kms_keys_exist_enabled_and_rotating(deployment: Deployment):
    kms = deployment.client("kms")
    for output in ("data_kms_key_arn", "secrets_kms_key_arn"):
        key = kms.describe_key(KeyId=deployment.out[output])["KeyMetadata"]
        assert key["KeyState"] == "Enabled", output
        assert kms.get_key_rotation_status(KeyId=key["KeyId"])["KeyRotationEnabled"] is True
    aliases = {a["AliasName"] for a in kms.list_aliases()["Aliases"]}
    assert {f"alias/{CLUSTER}-data", f"alias/{CLUSTER}-eks-secrets"} <= aliases


@applies
def test_irsa_roles_reach_exactly_the_bucket(deployment: Deployment):
    iam = deployment.client("iam")
    bucket_arn = f"arn:aws:s3:::{deployment.out['bucket_name']}"
    allowed = {bucket_arn, f"{bucket_arn}/*", deployment.out["data_kms_key_arn"]}
    expected_subjects = {
        "ray": {f"system:serviceaccount:{ns}:ray" for ns in ("training", "inference", "agentic")},
        "mlflow": {"system:serviceaccount:mlops:mlflow"},
    }
    assert set(deployment.out["workload_role_arns"]) == set(expected_subjects)
    for name, arn in deployment.out["workload_role_arns"].items():
        role_name = arn.split("/")[-1]
        role = iam.get_role(RoleName=role_name)["Role"]
        (trust,) = role["AssumeRolePolicyDocument"]["Statement"]
        assert trust["Principal"] == {"Federated": deployment.out["oidc_provider_arn"]}
        subjects = next(v for k, v in trust["Condition"]["StringEquals"].items()
                        if k.endswith(":sub"))
        assert set([subjects] if isinstance(subjects, str) else subjects) == expected_subjects[name]
        assert iam.list_attached_role_policies(RoleName=role_name)["AttachedPolicies"] == []
        for policy_name in iam.list_role_policies(RoleName=role_name)["PolicyNames"]:
            doc = iam.get_role_policy(RoleName=role_name, PolicyName=policy_name)["PolicyDocument"]
            for statement in doc["Statement"]:
                assert statement["Effect"] == "Allow"
                resources = statement["Resource"]
                resources = {resources} if isinstance(resources, str) else set(resources)
                assert resources <= allowed, (name, statement)


@applies
def test_storage_classes_manifest_names_the_file_system_and_key(deployment: Deployment):
    docs = list(yaml.safe_load_all(deployment.out["storage_classes_manifest"]))
    by_name = {d["metadata"]["name"]: d for d in docs}
    assert by_name["gp3"]["parameters"]["kmsKeyId"] == deployment.out["data_kms_key_arn"]
    assert by_name["gp3"]["parameters"]["type"] == "gp3"
    assert by_name["efs-shared"]["parameters"]["fileSystemId"] == deployment.out["efs_id"]


# -- platform services: images, IRSA for External Secrets and Velero, Redis, PostgreSQL --------

ACCOUNT = "123456789012"  # moto's account
PREFIX = "rayplane/production"


def _statements(iam, role_name: str) -> list[dict]:
    """Every statement of the role's inline policies; it must have no managed ones."""
    assert iam.list_attached_role_policies(RoleName=role_name)["AttachedPolicies"] == []
    out = []
    for name in iam.list_role_policies(RoleName=role_name)["PolicyNames"]:
        doc = iam.get_role_policy(RoleName=role_name, PolicyName=name)["PolicyDocument"]
        for st in doc["Statement"]:
            assert st["Effect"] == "Allow", (role_name, st)
            out.append({**st, "Action": _as_list(st["Action"]),
                        "Resource": _as_list(st["Resource"])})
    return out


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _trust_subjects(iam, role_name: str, oidc_provider_arn: str) -> set[str]:
    (trust,) = iam.get_role(RoleName=role_name)["Role"]["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Principal"] == {"Federated": oidc_provider_arn}
    assert trust["Action"] == "sts:AssumeRoleWithWebIdentity"
    equals = trust["Condition"]["StringEquals"]
    assert next(v for k, v in equals.items() if k.endswith(":aud")) == "sts.amazonaws.com"
    subjects = next(v for k, v in equals.items() if k.endswith(":sub"))
    return {subjects} if isinstance(subjects, str) else set(subjects)


def _ingress(ec2, group_id: str) -> list[dict]:
    (group,) = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"]
    return group["IpPermissions"]


def _only_from_nodes(ec2, group_id: str, port: int, node_sg: str) -> None:
    (rule,) = _ingress(ec2, group_id)
    assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", port, port)
    assert [p["GroupId"] for p in rule["UserIdGroupPairs"]] == [node_sg]
    assert rule.get("IpRanges", []) == [] and rule.get("Ipv6Ranges", []) == []


@applies
def test_the_image_repository_is_immutable_scanned_and_kms_encrypted(deployment: Deployment):
    ecr = deployment.client("ecr")
    url = deployment.out["ecr_repository_url"]
    assert url == f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/rayplane"
    (repo,) = ecr.describe_repositories(repositoryNames=["rayplane"])["repositories"]
    assert repo["repositoryUri"] == url
    assert repo["imageTagMutability"] == "IMMUTABLE"
    assert repo["imageScanningConfiguration"] == {"scanOnPush": True}
    assert repo["encryptionConfiguration"] == {
        "encryptionType": "KMS", "kmsKey": deployment.out["data_kms_key_arn"]}
    rules = json.loads(ecr.get_lifecycle_policy(repositoryName="rayplane")[
        "lifecyclePolicyText"])["rules"]
    selections = [r["selection"] for r in rules]
    assert all(r["action"] == {"type": "expire"} for r in rules)
    assert {"tagStatus": "untagged", "countType": "sinceImagePushed", "countUnit": "days",
            "countNumber": 7} in selections
    # Release tags (the ones environments pin) never expire: only untagged images and the
    # throw-away CI prefixes are selected.
    assert [s.get("tagPrefixList") for s in selections if s["tagStatus"] == "tagged"] == [
        ["ci-", "pr-"]]
    assert "any" not in {s["tagStatus"] for s in selections}
    # A pinned tag cannot be pushed twice with different content.
    manifest = {"schemaVersion": 2, "mediaType":
                "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                           "size": 7023, "digest": "sha256:" + "a" * 64}, "layers": []}
    ecr.put_image(repositoryName="rayplane", imageManifest=json.dumps(manifest),
                  imageTag="2.60.0-py311-cpu")
    manifest["config"]["digest"] = "sha256:" + "b" * 64
    # AWS answers ImageTagAlreadyExistsException, moto ImageAlreadyExistsException; a mutable
    # repository would move the tag instead.
    with pytest.raises((ecr.exceptions.ImageTagAlreadyExistsException,
                        ecr.exceptions.ImageAlreadyExistsException)):
        ecr.put_image(repositoryName="rayplane", imageManifest=json.dumps(manifest),
                      imageTag="2.60.0-py311-cpu")
    (image,) = ecr.describe_images(repositoryName="rayplane")["imageDetails"]
    assert image["imageTags"] == ["2.60.0-py311-cpu"]


@applies
def test_external_secrets_role_reads_only_the_environments_secrets(deployment: Deployment):
    iam = deployment.client("iam")
    arn = deployment.out["external_secrets_role_arn"]
    assert arn == f"arn:aws:iam::{ACCOUNT}:role/{CLUSTER}-external-secrets"
    role = arn.rsplit("/", 1)[-1]
    # Trusted by the service account the Helm release runs as, which the ClusterSecretStore names.
    (store,) = rendered("02-clustersecretstore.yaml")
    ref = store["spec"]["provider"]["aws"]["auth"]["jwt"]["serviceAccountRef"]
    assert _trust_subjects(iam, role, deployment.out["oidc_provider_arn"]) == {
        irsa_subject(external_secrets_service_account())} == {
        irsa_subject(f"{ref['namespace']}/{ref['name']}")}

    statements = _statements(iam, role)
    prefix_pattern = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:{PREFIX}/*"
    db_secret = deployment.out["mlflow_db_secret_arn"]
    secret_statements = [s for s in statements if s["Action"][0].startswith("secretsmanager:")]
    assert {a for s in secret_statements for a in s["Action"]} == {
        "secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"}
    assert {r for s in secret_statements for r in s["Resource"]} == {prefix_pattern, db_secret}
    (kms,) = [s for s in statements if s["Action"][0].startswith("kms:")]
    assert kms["Action"] == ["kms:Decrypt"]
    assert kms["Resource"] == [deployment.out["data_kms_key_arn"]]
    assert kms["Condition"]["StringEquals"] == {
        "kms:ViaService": f"secretsmanager.{REGION}.amazonaws.com"}
    assert len(statements) == len(secret_statements) + 1

    # Every secret the rendered ExternalSecrets ask for is readable; nothing outside the prefix
    # is, except MLflow's RDS-managed password, by its exact ARN.
    def readable(secret_arn: str) -> bool:
        return any(fnmatch.fnmatchcase(secret_arn, r)
                   for s in secret_statements for r in s["Resource"])

    keys = {d["remoteRef"]["key"] for es in rendered("08-externalsecret.yaml")
            for d in es["spec"]["data"]}
    for key in keys:
        if key.startswith("arn:"):
            # The agents' DSN is composed from the RDS-managed password, named by its ARN
            # (the environment's placeholder for the output mlflow_db_secret_arn).
            assert fnmatch.fnmatchcase(key, "arn:aws:secretsmanager:*:secret:rds!db-*"), key
            continue
        assert readable(f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:{key}-AbCdEf"), key
    assert readable(db_secret)
    assert not readable(f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:rayplane/staging/x-A")
    assert not readable(f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:other-AbCdEf")


@applies
def test_velero_role_reaches_only_its_bucket_and_snapshots(deployment: Deployment):
    iam = deployment.client("iam")
    arn = deployment.out["velero_role_arn"]
    assert arn == f"arn:aws:iam::{ACCOUNT}:role/{CLUSTER}-velero"
    role = arn.rsplit("/", 1)[-1]
    assert _trust_subjects(iam, role, deployment.out["oidc_provider_arn"]) == {
        irsa_subject(velero_service_account())}
    assert helm_values("velero")["serviceAccount"]["server"]["annotations"][
        "eks.amazonaws.com/role-arn"].rsplit("/", 1)[-1] == role

    bucket_arn = f"arn:aws:s3:::{deployment.out['velero_bucket_name']}"
    statements = _statements(iam, role)
    for st in statements:
        services = {a.split(":")[0] for a in st["Action"]}
        assert len(services) == 1, st
        (service,) = services
        if service == "s3":
            assert set(st["Resource"]) <= {bucket_arn, f"{bucket_arn}/*"}, st
        elif service == "kms":
            assert st["Resource"] == [deployment.out["data_kms_key_arn"]], st
            assert st["Condition"]["StringEquals"]["kms:ViaService"] in {
                f"s3.{REGION}.amazonaws.com", f"ec2.{REGION}.amazonaws.com"}, st
        elif st["Resource"] == ["*"]:
            # EC2 Describe actions take no resource-level permissions; nothing else gets "*".
            assert all(a.startswith("ec2:Describe") for a in st["Action"]), st
        else:
            assert service == "ec2", st
            assert all(r.startswith(f"arn:aws:ec2:{REGION}:") for r in st["Resource"]), st
    (delete,) = [s for s in statements if "ec2:DeleteSnapshot" in s["Action"]]
    # Only snapshots Velero tagged may go, never the lifecycle policy's daily ones.
    assert delete["Condition"] == {"Null": {"aws:ResourceTag/velero.io/backup": "false"}}
    covered = {a for s in statements for a in s["Action"]}
    assert {"s3:PutObject", "s3:GetObject", "s3:DeleteObject", "s3:ListBucket",
            "ec2:CreateSnapshot", "ec2:CreateVolume", "ec2:DescribeVolumes",
            "ec2:DeleteSnapshot"} <= covered


@applies
def test_the_velero_bucket_is_versioned_kms_encrypted_private_tls_only_and_logged(
        deployment: Deployment):
    s3 = deployment.client("s3")
    bucket = deployment.out["velero_bucket_name"]
    assert bucket == f"{CLUSTER}-backups-{ACCOUNT}"
    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
    (rule,) = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    assert rule["ApplyServerSideEncryptionByDefault"] == {
        "SSEAlgorithm": "aws:kms", "KMSMasterKeyID": deployment.out["data_kms_key_arn"]}
    block = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
    assert all(block.values()) and len(block) == 4
    policy = json.loads(s3.get_bucket_policy(Bucket=bucket)["Policy"])
    conditions = [s["Condition"] for s in policy["Statement"] if s["Effect"] == "Deny"]
    assert {"Bool": {"aws:SecureTransport": "false"}} in conditions
    assert {"NumericLessThan": {"s3:TlsVersion": "1.2"}} in conditions
    logging = s3.get_bucket_logging(Bucket=bucket)["LoggingEnabled"]
    assert logging == {"TargetBucket": f"{deployment.out['bucket_name']}-access-logs",
                       "TargetPrefix": "velero/"}
    # The access-log bucket admits the backup bucket as a log source.
    log_policy = json.loads(s3.get_bucket_policy(Bucket=logging["TargetBucket"])["Policy"])
    (delivery,) = [s for s in log_policy["Statement"] if s["Effect"] == "Allow"]
    assert f"arn:aws:s3:::{bucket}" in delivery["Condition"]["ArnLike"]["aws:SourceArn"]


@applies
def test_the_gcs_redis_auth_token_and_network_are_ready(deployment: Deployment):
    sm, ec2 = deployment.client("secretsmanager"), deployment.client("ec2")
    name = deployment.out["redis_auth_secret_name"]
    assert name == f"{PREFIX}/redis-auth-token"
    secret = sm.describe_secret(SecretId=name)
    assert secret["KmsKeyId"] == deployment.out["data_kms_key_arn"]
    # A plain string (the rendered ExternalSecret reads the whole value), strong and generated.
    token = sm.get_secret_value(SecretId=name)["SecretString"]
    assert re.fullmatch(r"[A-Za-z0-9]{64}", token)
    (group,) = ec2.describe_security_groups(Filters=[
        {"Name": "tag:Name", "Values": [f"{CLUSTER}-gcs-redis"]}])["SecurityGroups"]
    assert group["VpcId"] == deployment.out["vpc_id"]
    _only_from_nodes(ec2, group["GroupId"], 6379, deployment.out["node_security_group_id"])
    # The replication group itself is gated off here (see test_what_moto_cannot_emulate...).
    assert deployment.out.get("redis_address") is None


@applies
def test_the_mlflow_database_is_private_encrypted_backed_up_with_a_managed_password(
        deployment: Deployment):
    rds, sm, ec2 = (deployment.client(s) for s in ("rds", "secretsmanager", "ec2"))
    (db,) = rds.describe_db_instances(DBInstanceIdentifier=f"{CLUSTER}-mlflow")["DBInstances"]
    key = deployment.out["data_kms_key_arn"]
    assert (db["Engine"], db["DBName"], db["MasterUsername"]) == ("postgres", "mlflow", "mlflow")
    assert db["Endpoint"]["Address"] == deployment.out["mlflow_db_address"]
    assert db["Endpoint"]["Port"] == deployment.out["mlflow_db_port"] == 5432
    assert db["StorageEncrypted"] is True and db["KmsKeyId"] == key
    assert db["PubliclyAccessible"] is False
    assert db["MultiAZ"] is True
    assert db["BackupRetentionPeriod"] == 14
    assert db["IAMDatabaseAuthenticationEnabled"] is True
    assert set(db["EnabledCloudwatchLogsExports"]) == {"postgresql", "upgrade"}
    (pg,) = db["DBParameterGroups"]
    assert pg["DBParameterGroupName"].startswith(f"{CLUSTER}-mlflow-")
    subnets = {s["SubnetIdentifier"] for s in db["DBSubnetGroup"]["Subnets"]}
    assert subnets == set(deployment.out["private_subnet_ids"])
    (sg,) = db["VpcSecurityGroups"]
    _only_from_nodes(ec2, sg["VpcSecurityGroupId"], 5432, deployment.out["node_security_group_id"])
    # The password: made and kept by RDS in Secrets Manager, encrypted with the data key.
    assert db["MasterUserSecret"]["SecretArn"] == deployment.out["mlflow_db_secret_arn"]
    assert db["MasterUserSecret"]["KmsKeyId"] == key
    credentials = json.loads(sm.get_secret_value(
        SecretId=deployment.out["mlflow_db_secret_arn"])["SecretString"])
    # The keys the mlflow-db ExternalSecret maps (moto writes fixed values into them).
    assert {"username", "password"} <= set(credentials) and credentials["password"]
    groups = {g["logGroupName"]: g for g in deployment.client("logs").describe_log_groups(
        logGroupNamePrefix=f"/aws/rds/instance/{CLUSTER}-mlflow/")["logGroups"]}
    assert set(groups) == {f"/aws/rds/instance/{CLUSTER}-mlflow/{t}"
                           for t in ("postgresql", "upgrade")}
    assert all(g["kmsKeyId"] == key and g["retentionInDays"] == 365 for g in groups.values())


@applies
def test_the_outputs_fill_the_environment_file(deployment: Deployment):
    """What docs/deployment.md tells the operator to copy: the environment file, filled from the
    outputs, still validates and points at what Terraform made."""
    out = deployment.out
    data = yaml.safe_load(
        (ROOT / "raycluster" / "environments" / "production.yaml").read_text())
    data.update(cluster_name=out["cluster_name"], region=out["region"],
                kubernetes_version=out["cluster_version"], account_id=ACCOUNT,
                irsa_role_arns={ns: out["workload_role_arns"]["ray"] for ns in data[
                    "irsa_role_arns"]})
    data["images"]["repository"] = out["ecr_repository_url"]
    data["storage"]["artifacts_bucket"] = out["bucket_name"]
    env = Environment.parse(data)
    assert env.images.image(gpu=False) == f"{out['ecr_repository_url']}:2.60.0-py311-cpu"
    assert out["redis_auth_secret_name"] == f"{env.secrets_manager_prefix}/redis-auth-token"
    # The agents' threads live in the database Terraform made, read with its managed password.
    for app in data.get("agents", []):
        app["database"].update(host=out["mlflow_db_address"], port=out["mlflow_db_port"],
                               database=out["mlflow_db_name"], secret=out["mlflow_db_secret_arn"])
    assert [a.database.secret for a in Environment.parse(data).agents] == [
        out["mlflow_db_secret_arn"]]


@applies
@pytest.mark.parametrize("gate", sorted(MOTO_GATES))
def test_what_moto_cannot_emulate_is_gated_off_and_on_by_default(deployment: Deployment,
                                                                  gate: str):
    resource_type, _ = MOTO_GATES[gate]
    assert MOTO_TFVARS[gate] is False
    state = deployment.state()
    assert not [r for r in state if f".{resource_type}." in r], f"{gate}=false left {resource_type}"
    assert tf_default(deployment.env_dir / "variables.tf", gate) is True, (
        f"{gate} must default to true: only the emulator turns it off")


def _gated(gate: str):
    """The gate as a parameter, skipped (at collection, so nothing is applied for it) while the
    emulator's variables turn it off, with what is not covered and why."""
    resource_type, why = MOTO_GATES[gate]
    return pytest.param(gate, marks=pytest.mark.skipif(
        not MOTO_TFVARS[gate],
        reason=f"{resource_type} is not applied against moto ({gate}=false): {why}"))


@applies
@pytest.mark.parametrize("gate", [_gated(g) for g in sorted(MOTO_GATES)])
def test_what_a_gate_turns_on_is_applied(deployment: Deployment, gate: str):
    resource_type, _ = MOTO_GATES[gate]
    assert [r for r in deployment.state() if f".{resource_type}." in r], (
        f"{gate}=true applied no {resource_type}")


@applies
def test_a_new_catalog_pool_is_applied_without_editing_terraform(deployment: Deployment):
    eks = deployment.client("eks")
    before = {n: eks.describe_nodegroup(clusterName=CLUSTER, nodegroupName=n)["nodegroup"][
        "nodegroupArn"] for n in eks.list_nodegroups(clusterName=CLUSTER)["nodegroups"]}
    data = load_catalog().model_dump(mode="json")
    data["pools"].append(A10G_POOL)
    catalog = Catalog.parse(data)
    tf_files = {p: p.read_text() for p in deployment.root.rglob("*.tf")}
    write_tfvars(catalog, deployment.env_dir / TFVARS_NAME)
    out = deployment.apply()
    assert {p: p.read_text() for p in deployment.root.rglob("*.tf")} == tf_files
    # Exactly the new pool's launch template and node group; nothing replaced or changed.
    assert "Apply complete! Resources: 2 added, 0 changed, 0 destroyed." in out
    pool = catalog.pool("a10g-inference")
    ng = eks.describe_nodegroup(clusterName=CLUSTER, nodegroupName="a10g-inference")["nodegroup"]
    assert ng["instanceTypes"] == ["g5.12xlarge"]
    assert ng["capacityType"] == "SPOT"
    assert ng["labels"] == pool.node_labels
    assert ng["labels"]["nvidia.com/device-plugin.config"] == "time-slicing-2"
    assert ng["scalingConfig"] == {"minSize": 0, "maxSize": 3, "desiredSize": 0}
    after = {n: eks.describe_nodegroup(clusterName=CLUSTER, nodegroupName=n)["nodegroup"][
        "nodegroupArn"] for n in before}
    assert after == before  # the existing node groups were not replaced


@applies
def test_destroy_removes_everything(deployment: Deployment):
    out = deployment.destroy()
    assert "Destroy complete!" in out
    assert deployment.client("eks").list_clusters()["clusters"] == []
    assert deployment.client("efs").describe_file_systems()["FileSystems"] == []
    buckets = [b["Name"] for b in deployment.client("s3").list_buckets()["Buckets"]]
    assert not [b for b in buckets if b.startswith(CLUSTER)]
    vpcs = deployment.client("ec2").describe_vpcs(
        Filters=[{"Name": "tag:Name", "Values": [CLUSTER]}])["Vpcs"]
    assert vpcs == []
    kms = deployment.client("kms")
    for output in ("data_kms_key_arn", "secrets_kms_key_arn"):
        assert kms.describe_key(KeyId=deployment.out[output])["KeyMetadata"]["KeyState"] == \
            "PendingDeletion"
    roles = [r["RoleName"] for r in deployment.client("iam").list_roles()["Roles"]]
    assert not [r for r in roles if r.startswith(CLUSTER)]
    assert deployment.client("ecr").describe_repositories()["repositories"] == []
    assert deployment.client("rds").describe_db_instances()["DBInstances"] == []
    # The Redis AUTH token (recovery window 0 here) and RDS's managed password are gone.
    assert deployment.client("secretsmanager").list_secrets()["SecretList"] == []
