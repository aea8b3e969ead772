"""The Terraform harness of tests/integration/test_terraform.py: the terraform CLI with the
provider from the machine's mirror, the production environment copied to a temporary folder and
pointed at ``moto_server`` on loopback, and boto3 checks shared by its tests.

The test adds override files to the copy (never to the committed files) that point the provider
at moto and use a local backend. What moto cannot emulate, and how the harness handles it:

- gated off by the environment's variables (``MOTO_GATES``): ``enable_eks_addons`` (moto has no
  EKS add-on API), ``enable_access_entries`` (no EKS access-entry API), ``enable_backup_policies``
  (no Data Lifecycle Manager, no EFS PutBackupPolicy), ``enable_gcs_redis`` and
  ``enable_placement_groups`` (no placement-group API). That each is off here and on by default
  passes as a test; that its resources apply is a test of its own, skipped (before any work)
  with the reason while the gate is off;
- ignored drift, so that a second apply shows only real changes: moto drops the cluster's
  ``accessConfig`` and the node groups' ``updateConfig``, returns a default ``remoteAccess`` on
  node groups, and reports the launch template's own tags as a tag specification;
- moto's EKS makes no cluster security group: a stand-in group takes its place;
- moto answers ports -1 for the EFA group's all-protocol rules (AWS answers none): ignored;
- moto has no ``DeleteFileSystemPolicy``: the EFS policy leaves the state before destroy (deleting
  the file system removes it).
"""

from __future__ import annotations

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

from raycluster.terraform import TERRAFORM_DIR

TERRAFORM = shutil.which("terraform")
CLI_CONFIG = TERRAFORM_DIR / "mirror.tfrc"
REGION = "us-east-1"
ADMIN_ARN = "arn:aws:iam::123456789012:role/platform-admin"
API_CIDRS = ["203.0.113.0/24"]
CLUSTER = "rayplane-production"


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
    "enable_placement_groups": (
        "aws_placement_group",
        ("moto has no placement-group API (CreatePlacementGroup): the EFA pools' cluster "
         "placement groups are not applied")),
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
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
                 "ecr", "elasticache", "rds", "secretsmanager", "sqs", "events")


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
  secret_key                  = "testing" # pragma: allowlist secret
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

  lifecycle {
    # The karpenter module tags the group (aws_ec2_tag), as it tags EKS's own one.
    ignore_changes = [tags, tags_all]
  }
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
    (root / "modules" / "karpenter" / "moto_override.tf").write_text("""\
# moto answers ports -1 for an all-protocol rule (AWS: none), drops the description and
# prefixes the referenced group with the account id
resource "aws_vpc_security_group_ingress_rule" "efa_from_itself" {
  lifecycle {
    ignore_changes = [description, referenced_security_group_id, from_port, to_port]
  }
}

resource "aws_vpc_security_group_egress_rule" "efa_to_itself" {
  lifecycle {
    ignore_changes = [description, referenced_security_group_id, from_port, to_port]
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
        self._state: list[str] | None = None

    def client(self, service: str):
        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def run(self, *args: str, timeout: float = 420) -> subprocess.CompletedProcess:
        started = time.monotonic()
        proc = terraform(*args, cwd=self.env_dir, timeout=timeout)
        self.timings[args[0]] = self.timings.get(args[0], 0) + time.monotonic() - started
        return proc

    def apply(self) -> str:
        self._state = None
        try:
            return self.run("apply", "-auto-approve", "-input=false", "-parallelism=20").stdout
        except AssertionError as err:
            # moto answering a CreateSecurityGroup too slowly makes the AWS SDK send it again,
            # and the retry meets the group the first call made ("InvalidGroup.Duplicate":
            # seen once in a CI run, with the machine loaded). Not the configuration's error:
            # remove the group nothing tracks and apply once more (name_prefix picks a new
            # name); any other failure, or a second one, stands.
            orphans = re.findall(r"security group '([^']+)' already exists", str(err))
            if not orphans:
                raise
        ec2 = self.client("ec2")
        for group in ec2.describe_security_groups(
                Filters=[{"Name": "group-name", "Values": orphans}])["SecurityGroups"]:
            ec2.delete_security_group(GroupId=group["GroupId"])
        self._state = None
        return self.run("apply", "-auto-approve", "-input=false", "-parallelism=20").stdout

    def outputs(self) -> dict:
        out = json.loads(self.run("output", "-json", timeout=60).stdout)
        return {k: v["value"] for k, v in out.items()}

    def state(self) -> list[str]:
        """The addresses in the state (read once per apply: each read costs a second or two)."""
        if self._state is None:
            self._state = self.run("state", "list", timeout=60).stdout.split()
        return list(self._state)

    def destroy(self) -> str:
        # moto has no DeleteFileSystemPolicy; deleting the file system removes the policy.
        if "module.storage.aws_efs_file_system_policy.shared" in self.state():
            self.run("state", "rm", "module.storage.aws_efs_file_system_policy.shared", timeout=60)
        self._state = None
        # No refresh: the state is what the last apply left (and refreshed), and refreshing
        # every resource again costs most of a minute on 2 cores.
        out = self.run("destroy", "-auto-approve", "-input=false", "-parallelism=20",
                       "-refresh=false").stdout
        self.destroyed = True
        return out


def tags_of(items: list[dict]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in items or []}


ACCOUNT = "123456789012"  # moto's account
PREFIX = "rayplane/production"


def role_statements(iam, role_name: str) -> list[dict]:
    """Every statement of the role's inline policies; it must have no managed ones."""
    assert iam.list_attached_role_policies(RoleName=role_name)["AttachedPolicies"] == []
    out = []
    for name in iam.list_role_policies(RoleName=role_name)["PolicyNames"]:
        doc = iam.get_role_policy(RoleName=role_name, PolicyName=name)["PolicyDocument"]
        for st in doc["Statement"]:
            assert st["Effect"] == "Allow", (role_name, st)
            out.append({**st, "Action": as_list(st["Action"]),
                        "Resource": as_list(st["Resource"])})
    return out


def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def trust_subjects(iam, role_name: str, oidc_provider_arn: str) -> set[str]:
    (trust,) = iam.get_role(RoleName=role_name)["Role"]["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Principal"] == {"Federated": oidc_provider_arn}
    assert trust["Action"] == "sts:AssumeRoleWithWebIdentity"
    equals = trust["Condition"]["StringEquals"]
    assert next(v for k, v in equals.items() if k.endswith(":aud")) == "sts.amazonaws.com"
    subjects = next(v for k, v in equals.items() if k.endswith(":sub"))
    return {subjects} if isinstance(subjects, str) else set(subjects)


def ingress(ec2, group_id: str) -> list[dict]:
    (group,) = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"]
    return group["IpPermissions"]


def only_from_nodes(ec2, group_id: str, port: int, node_sg: str) -> None:
    (rule,) = ingress(ec2, group_id)
    assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", port, port)
    assert [p["GroupId"] for p in rule["UserIdGroupPairs"]] == [node_sg]
    assert rule.get("IpRanges", []) == [] and rule.get("Ipv6Ranges", []) == []


# -- the one apply of a test session --------------------------------------------------------
# Session fixtures (a plugin of tests/conftest.py): test_features_terraform.py and
# test_terraform.py check the same apply; a second apply would cost about 4 minutes on 2 cores.
# test_features_terraform.py sorts first, so its checks run before test_terraform.py's re-apply
# with new pools and its destroy test.


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        # AWS managed policies (AmazonEKSClusterPolicy...) exist in moto only when loaded.
        env={**tf_env(), "MOTO_IAM_LOAD_MANAGED_POLICIES": "true"},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_listening(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="session")
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
