# Where the platform keeps its data: EFS (ReadWriteMany) for datasets, models and checkpoints
# shared by Ray workers; the EBS CSI driver for gp3 ReadWriteOnce volumes; an S3 bucket for
# MLflow artifacts and the model registry; IRSA roles that reach that bucket and nothing
# else; snapshots of tagged EBS volumes.

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}
data "aws_region" "current" {}

locals {
  account_id  = data.aws_caller_identity.current.account_id
  partition   = data.aws_partition.current.partition
  bucket_name = coalesce(var.bucket_name, "${var.name}-artifacts-${local.account_id}")
  # Volumes the EBS StorageClass creates carry this tag; the snapshot policy selects it.
  backup_tag = { key = "rayplane.io/backup", value = "daily" }
}

# -- S3: artifacts and the model registry --------------------------------------------------

resource "aws_s3_bucket" "artifacts" {
  #checkov:skip=CKV_AWS_144:Cross-region replication is a disaster-recovery choice per environment (a second region and key); versioning below keeps every overwritten model and checkpoint.
  #checkov:skip=CKV2_AWS_62:Nothing consumes bucket events; MLflow and Ray read and write the bucket directly.
  bucket        = local.bucket_name
  force_destroy = var.force_destroy
  tags          = merge(var.tags, { Name = local.bucket_name })
}

resource "aws_s3_bucket_ownership_controls" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id
  rule {
    object_ownership = "BucketOwnerEnforced" # no ACLs: access is IAM and the bucket policy only
  }
}

resource "aws_s3_bucket_public_access_block" "artifacts" {
  bucket                  = aws_s3_bucket.artifacts.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_versioning" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = var.kms_key_arn
    }
    bucket_key_enabled = true # one data key per bucket, not a KMS call per object
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id

  rule {
    id     = "older-artifacts-to-standard-ia"
    status = "Enabled"
    filter {}
    transition {
      days          = var.transition_to_ia_days
      storage_class = "STANDARD_IA"
    }
    noncurrent_version_transition {
      noncurrent_days = 30
      storage_class   = "GLACIER_IR"
    }
    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_retention_days
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }

  depends_on = [aws_s3_bucket_versioning.artifacts]
}

data "aws_iam_policy_document" "artifacts" {
  statement {
    sid     = "DenyInsecureTransport"
    effect  = "Deny"
    actions = ["s3:*"]
    resources = [
      aws_s3_bucket.artifacts.arn,
      "${aws_s3_bucket.artifacts.arn}/*",
    ]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }

  statement {
    sid     = "DenyOldTLS"
    effect  = "Deny"
    actions = ["s3:*"]
    resources = [
      aws_s3_bucket.artifacts.arn,
      "${aws_s3_bucket.artifacts.arn}/*",
    ]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "NumericLessThan"
      variable = "s3:TlsVersion"
      values   = ["1.2"]
    }
  }
}

resource "aws_s3_bucket_policy" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id
  policy = data.aws_iam_policy_document.artifacts.json

  depends_on = [aws_s3_bucket_public_access_block.artifacts]
}

# Server access logs of the artifacts bucket: who read or changed which model.
resource "aws_s3_bucket" "access_logs" {
  #checkov:skip=CKV_AWS_18:This is the access-log target itself; logging it into itself would loop.
  #checkov:skip=CKV_AWS_144:Access logs stay in the region of the bucket they describe.
  #checkov:skip=CKV_AWS_145:S3 server access logging delivers only to buckets encrypted with SSE-S3, not SSE-KMS.
  #checkov:skip=CKV2_AWS_62:Nothing consumes access-log events; the logs are read on demand, in audits.
  bucket        = "${local.bucket_name}-access-logs"
  force_destroy = var.force_destroy
  tags          = merge(var.tags, { Name = "${local.bucket_name}-access-logs" })
}

resource "aws_s3_bucket_ownership_controls" "access_logs" {
  bucket = aws_s3_bucket.access_logs.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "access_logs" {
  bucket                  = aws_s3_bucket.access_logs.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_versioning" "access_logs" {
  bucket = aws_s3_bucket.access_logs.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "access_logs" {
  bucket = aws_s3_bucket.access_logs.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "access_logs" {
  bucket = aws_s3_bucket.access_logs.id

  rule {
    id     = "expire-access-logs"
    status = "Enabled"
    filter {}
    expiration {
      days = var.access_log_retention_days
    }
    noncurrent_version_expiration {
      noncurrent_days = 7
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }

  depends_on = [aws_s3_bucket_versioning.access_logs]
}

data "aws_iam_policy_document" "access_logs" {
  statement {
    sid       = "S3LogDeliveryWrites"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.access_logs.arn}/*"]
    principals {
      type        = "Service"
      identifiers = ["logging.s3.amazonaws.com"]
    }
    condition {
      test     = "ArnLike"
      variable = "aws:SourceArn"
      values   = concat([aws_s3_bucket.artifacts.arn], var.access_log_source_bucket_arns)
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }

  statement {
    sid     = "DenyInsecureTransport"
    effect  = "Deny"
    actions = ["s3:*"]
    resources = [
      aws_s3_bucket.access_logs.arn,
      "${aws_s3_bucket.access_logs.arn}/*",
    ]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "access_logs" {
  bucket = aws_s3_bucket.access_logs.id
  policy = data.aws_iam_policy_document.access_logs.json

  depends_on = [aws_s3_bucket_public_access_block.access_logs]
}

resource "aws_s3_bucket_logging" "artifacts" {
  bucket        = aws_s3_bucket.artifacts.id
  target_bucket = aws_s3_bucket.access_logs.id
  target_prefix = "artifacts/"

  # S3 checks that the log delivery service may write to the target before accepting this.
  depends_on = [aws_s3_bucket_policy.access_logs]
}

# -- IRSA: Ray pods and MLflow reach exactly the artifacts bucket --------------------------

data "aws_iam_policy_document" "workload_assume" {
  for_each = var.workload_identities

  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [var.oidc_provider_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${var.oidc_issuer}:aud"
      values   = ["sts.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "${var.oidc_issuer}:sub"
      values   = [for sa in each.value.service_accounts : "system:serviceaccount:${replace(sa, "/", ":")}"]
    }
  }
}

resource "aws_iam_role" "workload" {
  for_each = var.workload_identities

  name               = "${var.name}-${each.key}"
  description        = "IRSA role of ${join(", ", each.value.service_accounts)}: the artifacts bucket only"
  assume_role_policy = data.aws_iam_policy_document.workload_assume[each.key].json
  tags               = var.tags
}

data "aws_iam_policy_document" "workload" {
  for_each = var.workload_identities

  statement {
    sid       = "ListTheArtifactsBucket"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation", "s3:ListBucketMultipartUploads", "s3:ListBucketVersions"]
    resources = [aws_s3_bucket.artifacts.arn]
  }

  statement {
    sid = "ObjectsOfTheArtifactsBucket"
    actions = each.value.read_only ? ["s3:GetObject", "s3:GetObjectVersion"] : [
      "s3:GetObject", "s3:GetObjectVersion", "s3:PutObject", "s3:DeleteObject",
      "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts",
    ]
    resources = ["${aws_s3_bucket.artifacts.arn}/*"]
  }

  # SSE-KMS: writing needs a data key, reading needs Decrypt, both on the bucket's key only.
  statement {
    sid       = "TheBucketKey"
    actions   = each.value.read_only ? ["kms:Decrypt"] : ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [var.kms_key_arn]
    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["s3.${data.aws_region.current.name}.amazonaws.com"]
    }
  }
}

resource "aws_iam_role_policy" "workload" {
  for_each = var.workload_identities

  name   = "artifacts-bucket"
  role   = aws_iam_role.workload[each.key].id
  policy = data.aws_iam_policy_document.workload[each.key].json
}

# -- EBS: gp3 volumes through the CSI driver (an add-on installed with the node pools, since
# its pods need nodes), snapshots ---------------------------------------------------------------

data "aws_iam_policy_document" "csi_assume" {
  for_each = {
    ebs = ["kube-system:ebs-csi-controller-sa"]
    efs = ["kube-system:efs-csi-controller-sa", "kube-system:efs-csi-node-sa"]
  }

  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [var.oidc_provider_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${var.oidc_issuer}:aud"
      values   = ["sts.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "${var.oidc_issuer}:sub"
      values   = [for sa in each.value : "system:serviceaccount:${sa}"]
    }
  }
}

resource "aws_iam_role" "ebs_csi" {
  name               = "${var.name}-ebs-csi"
  description        = "IRSA role of the EBS CSI controller"
  assume_role_policy = data.aws_iam_policy_document.csi_assume["ebs"].json
  tags               = var.tags
}

resource "aws_iam_role_policy_attachment" "ebs_csi" {
  role       = aws_iam_role.ebs_csi.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AmazonEBSCSIDriverPolicy"
}

data "aws_iam_policy_document" "ebs_csi_kms" {
  statement {
    sid       = "EncryptVolumesWithTheDataKey"
    actions   = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:DescribeKey"]
    resources = [var.kms_key_arn]
  }

  statement {
    sid       = "GrantTheKeyToEC2"
    actions   = ["kms:CreateGrant", "kms:ListGrants", "kms:RevokeGrant"]
    resources = [var.kms_key_arn]
    condition {
      test     = "Bool"
      variable = "kms:GrantIsForAWSResource"
      values   = ["true"]
    }
  }
}

resource "aws_iam_role_policy" "ebs_csi_kms" {
  name   = "data-key"
  role   = aws_iam_role.ebs_csi.id
  policy = data.aws_iam_policy_document.ebs_csi_kms.json
}

data "aws_iam_policy_document" "dlm_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["dlm.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "dlm" {
  count = var.enable_backup_policies ? 1 : 0

  name               = "${var.name}-ebs-snapshots"
  description        = "Data Lifecycle Manager: daily snapshots of volumes tagged ${local.backup_tag.key}=${local.backup_tag.value}"
  assume_role_policy = data.aws_iam_policy_document.dlm_assume.json
  tags               = var.tags
}

resource "aws_iam_role_policy_attachment" "dlm" {
  count = var.enable_backup_policies ? 1 : 0

  role       = aws_iam_role.dlm[0].name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AWSDataLifecycleManagerServiceRole"
}

resource "aws_dlm_lifecycle_policy" "ebs" {
  count = var.enable_backup_policies ? 1 : 0

  description        = "${var.name}: daily snapshots of tagged EBS volumes"
  execution_role_arn = aws_iam_role.dlm[0].arn
  state              = "ENABLED"

  policy_details {
    resource_types = ["VOLUME"]
    target_tags    = { (local.backup_tag.key) = local.backup_tag.value }

    schedule {
      name      = "daily"
      copy_tags = true

      create_rule {
        interval      = 24
        interval_unit = "HOURS"
        times         = [var.snapshot_time]
      }

      retain_rule {
        count = var.snapshot_retain_count
      }

      tags_to_add = {
        "rayplane.io/snapshot" = "dlm-daily"
      }
    }
  }

  tags = var.tags
}

# -- EFS: datasets, models, checkpoints (ReadWriteMany) --------------------------------------

resource "aws_efs_file_system" "shared" {
  creation_token   = "${var.name}-shared"
  encrypted        = true
  kms_key_id       = var.kms_key_arn
  performance_mode = "generalPurpose"
  throughput_mode  = "elastic" # checkpoint bursts without provisioning throughput

  lifecycle_policy {
    transition_to_ia = "AFTER_30_DAYS"
  }

  lifecycle_policy {
    transition_to_primary_storage_class = "AFTER_1_ACCESS"
  }

  tags = merge(var.tags, { Name = "${var.name}-shared" })
}

resource "aws_security_group" "efs" {
  name_prefix = "${var.name}-efs-"
  description = "NFS to the ${var.name} EFS mount targets from the node subnets"
  vpc_id      = var.vpc_id
  tags        = merge(var.tags, { Name = "${var.name}-efs" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "nfs" {
  for_each = toset(var.nfs_client_cidrs)

  security_group_id = aws_security_group.efs.id
  description       = "NFS from node subnet ${each.value}"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 2049
  to_port           = 2049
}

resource "aws_efs_mount_target" "shared" {
  for_each = var.private_subnets_by_az

  file_system_id  = aws_efs_file_system.shared.id
  subnet_id       = each.value
  security_groups = [aws_security_group.efs.id]
}

resource "aws_efs_access_point" "shared" {
  file_system_id = aws_efs_file_system.shared.id

  posix_user {
    uid = var.efs_posix_user.uid
    gid = var.efs_posix_user.gid
  }

  root_directory {
    path = "/rayplane"
    creation_info {
      owner_uid   = var.efs_posix_user.uid
      owner_gid   = var.efs_posix_user.gid
      permissions = "0775"
    }
  }

  tags = merge(var.tags, { Name = "${var.name}-shared" })
}

data "aws_iam_policy_document" "efs" {
  statement {
    sid       = "MountThroughMountTargets"
    actions   = ["elasticfilesystem:ClientMount", "elasticfilesystem:ClientWrite"]
    resources = [aws_efs_file_system.shared.arn]
    principals {
      type        = "AWS"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "elasticfilesystem:AccessedViaMountTarget"
      values   = ["true"]
    }
  }

  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["*"]
    resources = [aws_efs_file_system.shared.arn]
    principals {
      type        = "AWS"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_efs_file_system_policy" "shared" {
  file_system_id = aws_efs_file_system.shared.id
  policy         = data.aws_iam_policy_document.efs.json
}

resource "aws_efs_backup_policy" "shared" {
  count = var.enable_backup_policies ? 1 : 0

  file_system_id = aws_efs_file_system.shared.id
  backup_policy {
    status = "ENABLED" # AWS Backup's default daily plan, 35 days
  }
}

resource "aws_iam_role" "efs_csi" {
  name               = "${var.name}-efs-csi"
  description        = "IRSA role of the EFS CSI driver"
  assume_role_policy = data.aws_iam_policy_document.csi_assume["efs"].json
  tags               = var.tags
}

resource "aws_iam_role_policy_attachment" "efs_csi" {
  role       = aws_iam_role.efs_csi.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AmazonEFSCSIDriverPolicy"
}

# -- the Kubernetes side: StorageClasses for the two CSI drivers -----------------------------
# Only the AWS provider is available to this configuration, so the StorageClasses are an
# output that the operator applies (docs/deployment.md): `terraform output -raw
# storage_classes_manifest | kubectl apply -f -`.

locals {
  storage_classes = [
    {
      apiVersion = "storage.k8s.io/v1"
      kind       = "StorageClass"
      metadata = {
        name        = "gp3"
        annotations = { "storageclass.kubernetes.io/is-default-class" = "true" }
      }
      provisioner = "ebs.csi.aws.com"
      parameters = {
        type                        = "gp3"
        encrypted                   = "true"
        kmsKeyId                    = var.kms_key_arn
        "csi.storage.k8s.io/fstype" = "ext4"
        tagSpecification_1          = "${local.backup_tag.key}=${local.backup_tag.value}"
      }
      reclaimPolicy        = "Delete"
      allowVolumeExpansion = true
      volumeBindingMode    = "WaitForFirstConsumer"
    },
    {
      apiVersion  = "storage.k8s.io/v1"
      kind        = "StorageClass"
      metadata    = { name = "efs-shared" }
      provisioner = "efs.csi.aws.com"
      parameters = {
        provisioningMode = "efs-ap"
        fileSystemId     = aws_efs_file_system.shared.id
        directoryPerms   = "775"
        uid              = tostring(var.efs_posix_user.uid)
        gid              = tostring(var.efs_posix_user.gid)
        basePath         = "/dynamic"
      }
      mountOptions  = ["tls", "iam"]
      reclaimPolicy = "Retain" # datasets and checkpoints outlive the claim that made them
    },
  ]
}
