"""Terraform for real. (checkov's scan of the configuration is in test_checkov.py.)

- ``terraform fmt -check`` and ``terraform validate`` of every module and environment, with the
  AWS provider from the machine's mirror (infra/terraform/mirror.tfrc; nothing is downloaded).
- ``terraform apply`` of environments/production against ``moto_server`` on loopback, boto3
  checks of what it made, a new catalog pool applied without a Terraform edit, then
  ``terraform destroy``.

The configuration is copied to a temporary folder that tests/support/terraform.py points at moto
(never the committed files); what moto cannot emulate, and how the harness handles it, is said
there (``MOTO_GATES``).

Karpenter's side (issue 15) is checked as applied: the controller's IRSA role and its policies,
the node role with its instance profile, the interruption queue and the EventBridge rules that
feed it, the discovery tags; the VPC endpoints; and the VPC CNI's network policy enforcement
through the plan of the add-on (moto has no add-on API).
"""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import pytest
import yaml

from raycluster.catalog import Catalog, load_catalog
from raycluster.environments import Environment
from raycluster.terraform import (
    AMI_TYPE_CPU,
    EKS_TAINT_EFFECT,
    TERRAFORM_DIR,
    TFVARS_NAME,
    write_tfvars,
)
from tests.conftest import requires_terraform
from tests.support.infra import (
    A10G_POOL,
    CPU_POOL,
    ROOT,
    aws_external_secrets,
    aws_secret_store,
    external_secrets_service_account,
    helm_values,
    irsa_subject,
    tf_default,
    velero_service_account,
)
from tests.support.terraform import (
    ACCOUNT,
    API_CIDRS,
    CLUSTER,
    MOTO_GATES,
    MOTO_TFVARS,
    PREFIX,
    REGION,
    Deployment,
    copy_configuration,
    ingress,
    only_from_nodes,
    role_statements,
    tags_of,
    terraform,
    trust_subjects,
)


def applies(test):
    """The apply/destroy cycle against moto: about 4 minutes on 2 cores, so marked slow."""
    return requires_terraform(pytest.mark.slow(test))


TF_DIRS = sorted(str(p.relative_to(TERRAFORM_DIR)) for p in
                 [*TERRAFORM_DIR.glob("modules/*"), *TERRAFORM_DIR.glob("environments/*")]
                 if p.is_dir())


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


#: A root module of the eks-cluster module alone, with made-up inputs: its plan needs no AWS
#: endpoint (everything is to be created, nothing refreshed).
EKS_ONLY_ROOT = """
provider "aws" {
  region                      = "us-east-1"
  access_key                  = "testing"
  secret_key                  = "testing"
  skip_credentials_validation = true
  skip_requesting_account_id  = true
  skip_metadata_api_check     = true
}

module "eks" {
  source              = "../modules/eks-cluster"
  name                = "rayplane-production"
  kubernetes_version  = "1.33"
  vpc_id              = "vpc-0123456789abcdef0"
  vpc_cidr            = "10.0.0.0/16"
  subnet_ids          = ["subnet-0123456789abcdef0", "subnet-0123456789abcdef1"]
  cluster_role_arn    = "arn:aws:iam::123456789012:role/rayplane-production-cluster"
  secrets_kms_key_arn = "arn:aws:kms:us-east-1:123456789012:key/0000" # pragma: allowlist secret
  logs_kms_key_arn    = "arn:aws:kms:us-east-1:123456789012:key/0000"
  public_access_cidrs = ["203.0.113.0/24"]
}
"""


@requires_terraform
def test_the_vpc_cni_enforces_network_policies(tmp_path: Path):
    """Finding 4: the vpc-cni add-on is created with enableNetworkPolicy, or every NetworkPolicy
    rayplane renders is on paper. moto has no add-on API, so the module's plan is read: what
    Terraform would send to CreateAddon (the environment keeps the module's default:
    tests/unit/infra/test_platform_services.py)."""
    work = copy_configuration(tmp_path / "terraform") / "eks-only"
    work.mkdir()
    (work / "main.tf").write_text(EKS_ONLY_ROOT)
    terraform("init", "-backend=false", "-input=false", cwd=work, timeout=120)
    terraform("plan", "-input=false", "-refresh=false", "-target=module.eks.aws_eks_addon.this",
              "-out=addons.tfplan", cwd=work, timeout=120)
    plan = json.loads(terraform("show", "-json", "addons.tfplan", cwd=work, timeout=60).stdout)
    addons = {c["index"]: c["change"]["after"] for c in plan["resource_changes"]
              if c["address"].startswith("module.eks.aws_eks_addon.this[")}
    assert set(addons) == {"vpc-cni", "kube-proxy"}
    configuration = addons["vpc-cni"].get("configuration_values")
    assert configuration, "the vpc-cni add-on has no configuration: NetworkPolicies unenforced"
    assert json.loads(configuration) == {"enableNetworkPolicy": "true"}
    assert addons["kube-proxy"].get("configuration_values") is None


# -- apply against moto ------------------------------------------------------------------------


# `moto_endpoint` and `deployment` (one apply per session, shared with
# test_features_terraform.py) are tests/support/terraform.py's session fixtures.


@applies
def test_every_pool_without_gpus_is_a_node_group_with_its_shape(deployment: Deployment):
    eks, ec2 = deployment.client("eks"), deployment.client("ec2")
    catalog = load_catalog()
    managed = [p for p in catalog.pools if not p.has_gpu]
    assert [p.name for p in managed] == ["cpu"]
    # The GPU pools are Karpenter's: no node group that nothing would scale (finding 1).
    assert sorted(eks.list_nodegroups(clusterName=CLUSTER)["nodegroups"]) == ["cpu"]
    data_key = deployment.out["data_kms_key_arn"]
    for pool in managed:
        ng = eks.describe_nodegroup(clusterName=CLUSTER, nodegroupName=pool.name)["nodegroup"]
        assert ng["instanceTypes"] == pool.instance_types, pool.name
        assert ng["capacityType"] == pool.capacity_type.value, pool.name
        assert ng["amiType"] == AMI_TYPE_CPU, pool.name
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
def test_the_network_spans_three_zones_with_load_balancertags_of(deployment: Deployment):
    ec2 = deployment.client("ec2")
    in_vpc = [{"Name": "vpc-id", "Values": [deployment.out["vpc_id"]]}]
    subnets = ec2.describe_subnets(Filters=in_vpc)["Subnets"]
    private = [s for s in subnets if tags_of(s["Tags"]).get("kubernetes.io/role/internal-elb") == "1"]
    public = [s for s in subnets if tags_of(s["Tags"]).get("kubernetes.io/role/elb") == "1"]
    assert sorted(s["SubnetId"] for s in private) == sorted(deployment.out["private_subnet_ids"])
    assert len({s["AvailabilityZone"] for s in private}) == 3
    assert len({s["AvailabilityZone"] for s in public}) == 3
    assert all(tags_of(s["Tags"])[f"kubernetes.io/cluster/{CLUSTER}"] == "shared" for s in subnets)
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
    store = aws_secret_store()
    ref = store["spec"]["provider"]["aws"]["auth"]["jwt"]["serviceAccountRef"]
    assert trust_subjects(iam, role, deployment.out["oidc_provider_arn"]) == {
        irsa_subject(external_secrets_service_account())} == {
        irsa_subject(f"{ref['namespace']}/{ref['name']}")}

    statements = role_statements(iam, role)
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

    keys = {d["remoteRef"]["key"] for es in aws_external_secrets()
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
    assert trust_subjects(iam, role, deployment.out["oidc_provider_arn"]) == {
        irsa_subject(velero_service_account())}
    assert helm_values("velero")["serviceAccount"]["server"]["annotations"][
        "eks.amazonaws.com/role-arn"].rsplit("/", 1)[-1] == role

    bucket_arn = f"arn:aws:s3:::{deployment.out['velero_bucket_name']}"
    statements = role_statements(iam, role)
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
def test_the_load_balancer_controller_role_is_the_upstream_policy(deployment: Deployment):
    iam = deployment.client("iam")
    arn = deployment.out["load_balancer_controller_role_arn"]
    assert arn == f"arn:aws:iam::{ACCOUNT}:role/{CLUSTER}-aws-load-balancer-controller"
    role = arn.rsplit("/", 1)[-1]
    values = helm_values("aws-load-balancer-controller")
    assert trust_subjects(iam, role, deployment.out["oidc_provider_arn"]) == {
        irsa_subject(f"kube-system/{values['serviceAccount']['name']}")}
    assert values["serviceAccount"]["annotations"]["eks.amazonaws.com/role-arn"].rsplit(
        "/", 1)[-1] == role
    (name,) = iam.list_role_policies(RoleName=role)["PolicyNames"]
    vendored = TERRAFORM_DIR / "modules" / "platform-services" / \
        "aws-load-balancer-controller-policy.json"
    assert iam.get_role_policy(RoleName=role, PolicyName=name)["PolicyDocument"] == \
        json.loads(vendored.read_text())


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
    only_from_nodes(ec2, group["GroupId"], 6379, deployment.out["node_security_group_id"])
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
    only_from_nodes(ec2, sg["VpcSecurityGroupId"], 5432, deployment.out["node_security_group_id"])
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


# -- Karpenter's AWS side, VPC endpoints, network policy enforcement (issue 15) ----------------

KARPENTER_SA = "karpenter/karpenter"
#: The official Karpenter v1.14 CloudFormation setup's statements (website/content/en/v1.14/
#: getting-started/getting-started-with-karpenter/cloudformation.yaml).
KARPENTER_SIDS = {
    "AllowScopedEC2InstanceAccessActions", "AllowScopedEC2LaunchTemplateAccessActions",
    "AllowScopedEC2InstanceActionsWithTags", "AllowScopedResourceCreationTagging",
    "AllowScopedResourceTagging", "AllowScopedDeletion", "AllowPassingInstanceRole",
    "AllowScopedInstanceProfileCreationActions", "AllowScopedInstanceProfileTagActions",
    "AllowScopedInstanceProfileActions", "AllowAPIServerEndpointDiscovery",
    "AllowZonalShiftStatusReadOnly", "AllowInterruptionQueueActions", "AllowRegionalReadActions",
    "AllowSSMReadActions", "AllowPricingReadActions", "AllowUnscopedInstanceProfileListAction",
    "AllowInstanceProfileReadActions",
}
#: Actions that take no resource-level permissions: the only ones granted on "*".
UNSCOPED_ACTIONS = {"pricing:GetProducts", "iam:ListInstanceProfiles",
                    "arc-zonal-shift:GetManagedResource"}


@applies
def test_the_karpenter_controller_role_is_the_official_policy_for_this_cluster_only(
        deployment: Deployment):
    iam = deployment.client("iam")
    arn = deployment.out["karpenter_controller_role_arn"]
    assert arn == f"arn:aws:iam::{ACCOUNT}:role/{CLUSTER}-karpenter-controller"
    role = arn.rsplit("/", 1)[-1]
    assert trust_subjects(iam, role, deployment.out["oidc_provider_arn"]) == {
        irsa_subject(KARPENTER_SA)}
    # The Helm values H3 installs Karpenter with name this role and the queue.
    values = helm_values("karpenter")
    assert values["serviceAccount"]["annotations"]["eks.amazonaws.com/role-arn"].rsplit(
        "/", 1)[-1] == role
    assert values["settings"]["interruptionQueue"] == \
        deployment.out["karpenter_interruption_queue_name"]
    by_sid = {s["Sid"]: s for s in role_statements(iam, role)}
    assert set(by_sid) == KARPENTER_SIDS
    node_role_arn = f"arn:aws:iam::{ACCOUNT}:role/{deployment.out['karpenter_node_role_name']}"
    assert by_sid["AllowPassingInstanceRole"]["Resource"] == [node_role_arn]
    queue_arn = f"arn:aws:sqs:{REGION}:{ACCOUNT}:{CLUSTER}-karpenter"
    assert by_sid["AllowInterruptionQueueActions"]["Resource"] == [queue_arn]
    assert by_sid["AllowAPIServerEndpointDiscovery"]["Resource"] == [
        f"arn:aws:eks:{REGION}:{ACCOUNT}:cluster/{CLUSTER}"]
    owned = f"aws:ResourceTag/kubernetes.io/cluster/{CLUSTER}"
    for sid in ("AllowScopedEC2LaunchTemplateAccessActions", "AllowScopedDeletion",
                "AllowScopedResourceTagging"):
        # Only launch templates and instances it launched for this cluster's NodePools.
        assert by_sid[sid]["Condition"]["StringEquals"][owned] == "owned", sid
        assert by_sid[sid]["Condition"]["StringLike"] == {
            "aws:ResourceTag/karpenter.sh/nodepool": "*"}, sid
    for sid in ("AllowScopedEC2InstanceActionsWithTags", "AllowScopedResourceCreationTagging"):
        equals = by_sid[sid]["Condition"]["StringEquals"]
        assert equals[f"aws:RequestTag/kubernetes.io/cluster/{CLUSTER}"] == "owned", sid
        assert equals["aws:RequestTag/eks:eks-cluster-name"] == CLUSTER, sid
    placement = [r for r in by_sid["AllowScopedEC2InstanceAccessActions"]["Resource"]
                 if ":placement-group/" in r]
    assert placement == [f"arn:aws:ec2:{REGION}:{ACCOUNT}:placement-group/{CLUSTER}-*"]
    for st in by_sid.values():
        if st["Resource"] == ["*"]:
            regional = st.get("Condition", {}).get("StringEquals", {}).get("aws:RequestedRegion")
            assert all(a.startswith("ec2:Describe") for a in st["Action"]) and \
                regional == REGION or set(st["Action"]) <= UNSCOPED_ACTIONS, st


@applies
def test_karpenter_nodes_get_their_role_and_instance_profile(deployment: Deployment):
    iam = deployment.client("iam")
    name = deployment.out["karpenter_node_role_name"]
    assert name == f"{CLUSTER}-karpenter-node"
    (trust,) = iam.get_role(RoleName=name)["Role"]["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Principal"] == {"Service": "ec2.amazonaws.com"}
    attached = {p["PolicyName"] for p in iam.list_attached_role_policies(RoleName=name)[
        "AttachedPolicies"]}
    assert attached == {"AmazonEKSWorkerNodePolicy", "AmazonEKS_CNI_Policy",
                        "AmazonEC2ContainerRegistryPullOnly", "AmazonSSMManagedInstanceCore"}
    assert iam.list_role_policies(RoleName=name)["PolicyNames"] == []
    profile = iam.get_instance_profile(
        InstanceProfileName=deployment.out["karpenter_node_instance_profile_name"])
    assert [r["RoleName"] for r in profile["InstanceProfile"]["Roles"]] == [name]


@applies
def test_interruption_events_reach_karpenters_queue(deployment: Deployment):
    sqs, events = deployment.client("sqs"), deployment.client("events")
    name = deployment.out["karpenter_interruption_queue_name"]
    assert name == f"{CLUSTER}-karpenter"
    url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert attrs["SqsManagedSseEnabled"] == "true"
    assert attrs["MessageRetentionPeriod"] == "300"
    policy = json.loads(attrs["Policy"])
    (allow,) = [s for s in policy["Statement"] if s["Effect"] == "Allow"]
    assert sorted(allow["Principal"]["Service"]) == ["events.amazonaws.com", "sqs.amazonaws.com"]
    assert allow["Action"] == "sqs:SendMessage" and allow["Resource"] == attrs["QueueArn"]
    (deny,) = [s for s in policy["Statement"] if s["Effect"] == "Deny"]
    assert deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    rules = events.list_rules(NamePrefix=f"{CLUSTER}-karpenter-")["Rules"]
    patterns = {}
    for rule in rules:
        pattern = json.loads(rule["EventPattern"])
        (detail_type,) = pattern["detail-type"]
        patterns[detail_type] = pattern["source"]
        (target,) = events.list_targets_by_rule(Rule=rule["Name"])["Targets"]
        assert target["Arn"] == attrs["QueueArn"], rule["Name"]
    assert patterns == {
        "AWS Health Event": ["aws.health"],
        "EC2 Spot Instance Interruption Warning": ["aws.ec2"],
        "EC2 Instance Rebalance Recommendation": ["aws.ec2"],
        "EC2 Instance State-change Notification": ["aws.ec2"],
        "EC2 Capacity Reservation Instance Interruption Warning": ["aws.ec2"],
    }


@applies
def test_karpenter_discovers_the_private_subnets_and_node_security_groups(
        deployment: Deployment):
    ec2 = deployment.client("ec2")
    tag = deployment.out["karpenter_discovery_tag"]
    assert tag == {"karpenter.sh/discovery": CLUSTER}
    discovered = [{"Name": "tag:karpenter.sh/discovery", "Values": [CLUSTER]}]
    subnets = ec2.describe_subnets(Filters=discovered)["Subnets"]
    assert sorted(s["SubnetId"] for s in subnets) == sorted(deployment.out["private_subnet_ids"])
    groups = {g["GroupId"]: g for g in ec2.describe_security_groups(Filters=discovered)[
        "SecurityGroups"]}
    efa = deployment.out["efa_security_group_id"]
    assert set(groups) == {deployment.out["node_security_group_id"], efa}
    # EFA: all traffic from and to the group itself, nothing else.
    (ingress,) = groups[efa]["IpPermissions"]
    (egress,) = groups[efa]["IpPermissionsEgress"]
    for rule in (ingress, egress):
        assert rule["IpProtocol"] == "-1"
        assert [p["GroupId"] for p in rule["UserIdGroupPairs"]] == [efa]
        assert rule.get("IpRanges", []) == []
    # The EFA pools' cluster placement groups are gated off here (MOTO_GATES).
    assert deployment.out["placement_group_names"] == {}


@applies
def test_vpc_endpoints_keep_images_checkpoints_and_aws_calls_off_the_nat(
        deployment: Deployment):
    ec2 = deployment.client("ec2")
    endpoints = {e["ServiceName"].removeprefix(f"com.amazonaws.{REGION}."): e
                 for e in ec2.describe_vpc_endpoints(Filters=[
                     {"Name": "vpc-id", "Values": [deployment.out["vpc_id"]]}])["VpcEndpoints"]}
    assert set(endpoints) == {"s3", "ecr.api", "ecr.dkr", "sts", "secretsmanager", "logs"}
    assert deployment.out["vpc_endpoint_ids"] == {
        service: e["VpcEndpointId"] for service, e in endpoints.items()}
    s3 = endpoints.pop("s3")
    assert s3["VpcEndpointType"] == "Gateway"
    private_tables = {t["RouteTableId"] for t in ec2.describe_route_tables(Filters=[
        {"Name": "association.subnet-id", "Values": deployment.out["private_subnet_ids"]}])[
        "RouteTables"]}
    assert len(private_tables) == 3 and set(s3["RouteTableIds"]) == private_tables
    vpc_cidr = ec2.describe_vpcs(VpcIds=[deployment.out["vpc_id"]])["Vpcs"][0]["CidrBlock"]
    for service, endpoint in endpoints.items():
        assert endpoint["VpcEndpointType"] == "Interface", service
        assert endpoint["PrivateDnsEnabled"] is True, service
        assert sorted(endpoint["SubnetIds"]) == sorted(deployment.out["private_subnet_ids"])
        (group,) = endpoint["Groups"]
        (rule,) = ingress(ec2, group["GroupId"])
        assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 443, 443)
        assert [r["CidrIp"] for r in rule["IpRanges"]] == [vpc_cidr]


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
def test_new_catalog_pools_are_applied_without_editing_terraform(deployment: Deployment):
    """A new pool without GPUs becomes a node group; a new GPU pool needs nothing from Terraform
    (Karpenter's NodePool is rendered into infra/k8s): one apply, exactly the node group."""
    eks = deployment.client("eks")
    before = {n: eks.describe_nodegroup(clusterName=CLUSTER, nodegroupName=n)["nodegroup"][
        "nodegroupArn"] for n in eks.list_nodegroups(clusterName=CLUSTER)["nodegroups"]}
    data = load_catalog().model_dump(mode="json")
    data["pools"] += [CPU_POOL, A10G_POOL]
    catalog = Catalog.parse(data)
    tf_files = {p: p.read_text() for p in deployment.root.rglob("*.tf")}
    write_tfvars(catalog, deployment.env_dir / TFVARS_NAME)
    out = deployment.apply()
    assert {p: p.read_text() for p in deployment.root.rglob("*.tf")} == tf_files
    # Exactly the new node group and its launch template; nothing replaced or changed (also: no
    # drift in anything applied before).
    assert "Apply complete! Resources: 2 added, 0 changed, 0 destroyed." in out
    pool = catalog.pool("cpu-batch")
    ng = eks.describe_nodegroup(clusterName=CLUSTER, nodegroupName="cpu-batch")["nodegroup"]
    assert ng["instanceTypes"] == ["m7i.4xlarge"]
    assert (ng["capacityType"], ng["amiType"]) == ("ON_DEMAND", AMI_TYPE_CPU)
    assert ng["labels"] == pool.node_labels
    assert ng["scalingConfig"] == {"minSize": 1, "maxSize": 3, "desiredSize": 1}
    assert "a10g-inference" not in eks.list_nodegroups(clusterName=CLUSTER)["nodegroups"]
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
    # Karpenter's queue and rules, and the VPC endpoints.
    assert deployment.client("sqs").list_queues().get("QueueUrls", []) == []
    assert deployment.client("events").list_rules()["Rules"] == []
    endpoints = deployment.client("ec2").describe_vpc_endpoints()["VpcEndpoints"]
    assert {e["State"].lower() for e in endpoints} <= {"deleted"}  # listed a while once deleted
