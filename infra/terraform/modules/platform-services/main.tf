# The AWS services the platform's Kubernetes side expects (docs/deployment.md): the image
# repository of the Ray images, IRSA roles for External Secrets (the Ray token, Redis AUTH and
# API-key Secrets come from Secrets Manager through it), Velero (with its backup bucket) and the
# AWS Load Balancer Controller (load-balancer-controller.tf),
# ElastiCache Redis for Ray GCS fault tolerance, and RDS PostgreSQL for MLflow's backend store.

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}
data "aws_region" "current" {}

locals {
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition
  region     = data.aws_region.current.name

  velero_bucket_name = coalesce(var.velero_bucket_name, "${var.name}-backups-${local.account_id}")
  # Every secret of the environment: rayplane/<env>/<namespace>/ray-auth-token,
  # rayplane/<env>/redis-auth-token, rayplane/<env>/<namespace>/serve-api-keys...
  secrets_arn_pattern = "arn:${local.partition}:secretsmanager:${local.region}:${local.account_id}:secret:${var.secrets_manager_prefix}/*"

  irsa_service_accounts = {
    "external-secrets"             = var.external_secrets_service_accounts
    velero                         = var.velero_service_accounts
    "aws-load-balancer-controller" = var.load_balancer_controller_service_accounts
    "feature-store"                = var.feature_store_service_accounts
  }
}

# -- ECR: the rayplane Ray images ----------------------------------------------------------

resource "aws_ecr_repository" "images" {
  name = var.ecr_repository_name
  # Environments pin tags (2.60.0-py311-cpu); an immutable tag always means the same image.
  image_tag_mutability = "IMMUTABLE"
  force_delete         = var.force_destroy

  image_scanning_configuration {
    scan_on_push = true
  }

  encryption_configuration {
    encryption_type = "KMS"
    kms_key         = var.kms_key_arn
  }

  tags = var.tags
}

resource "aws_ecr_lifecycle_policy" "images" {
  repository = aws_ecr_repository.images.name

  # Only leftovers expire: untagged layers and throw-away CI tags. Release tags are never
  # expired by count, since a RayCluster pinning one would then fail to pull.
  policy = jsonencode({
    rules = [
      {
        rulePriority = 1
        description  = "Untagged images (replaced or failed pushes)"
        selection = {
          tagStatus   = "untagged"
          countType   = "sinceImagePushed"
          countUnit   = "days"
          countNumber = var.ecr_untagged_expiry_days
        }
        action = { type = "expire" }
      },
      {
        rulePriority = 2
        description  = "Throw-away CI builds"
        selection = {
          tagStatus     = "tagged"
          tagPrefixList = var.ecr_ephemeral_tag_prefixes
          countType     = "sinceImagePushed"
          countUnit     = "days"
          countNumber   = var.ecr_ephemeral_tag_expiry_days
        }
        action = { type = "expire" }
      },
    ]
  })
}

# -- IRSA: External Secrets and Velero ------------------------------------------------------

data "aws_iam_policy_document" "irsa_assume" {
  for_each = local.irsa_service_accounts

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
      values   = [for sa in each.value : "system:serviceaccount:${replace(sa, "/", ":")}"]
    }
  }
}

resource "aws_iam_role" "external_secrets" {
  name               = "${var.name}-external-secrets"
  description        = "IRSA role of External Secrets (${join(", ", var.external_secrets_service_accounts)}): reads ${var.secrets_manager_prefix}/* only"
  assume_role_policy = data.aws_iam_policy_document.irsa_assume["external-secrets"].json
  tags               = var.tags
}

data "aws_iam_policy_document" "external_secrets" {
  statement {
    sid       = "ReadTheEnvironmentsSecrets"
    actions   = ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"]
    resources = [local.secrets_arn_pattern]
  }

  # MLflow's database password is managed by RDS, which names its secret rds!db-<id>: outside
  # the prefix, so it is granted by its exact ARN (the mlflow-db ExternalSecret reads it).
  statement {
    sid       = "ReadMLflowsDatabasePassword"
    actions   = ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"]
    resources = [aws_db_instance.mlflow.master_user_secret[0].secret_arn]
  }

  # The secrets are encrypted with the data key; Secrets Manager decrypts on the caller's
  # behalf, and only for secrets this role may read (the encryption context is the secret ARN).
  statement {
    sid       = "DecryptThoseSecretsOnly"
    actions   = ["kms:Decrypt"]
    resources = [var.kms_key_arn]
    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["secretsmanager.${local.region}.amazonaws.com"]
    }
    condition {
      test     = "StringLike"
      variable = "kms:EncryptionContext:SecretARN"
      values   = [local.secrets_arn_pattern, aws_db_instance.mlflow.master_user_secret[0].secret_arn]
    }
  }
}

resource "aws_iam_role_policy" "external_secrets" {
  name   = "environment-secrets"
  role   = aws_iam_role.external_secrets.id
  policy = data.aws_iam_policy_document.external_secrets.json
}

# Velero: cluster objects to its own bucket, EBS volumes as snapshots.

resource "aws_iam_role" "velero" {
  name               = "${var.name}-velero"
  description        = "IRSA role of Velero (${join(", ", var.velero_service_accounts)}): its backup bucket and EBS snapshots"
  assume_role_policy = data.aws_iam_policy_document.irsa_assume["velero"].json
  tags               = var.tags
}

data "aws_iam_policy_document" "velero" {
  #checkov:skip=CKV_AWS_356:Only ec2:DescribeVolumes and ec2:DescribeSnapshots have Resource "*": EC2 Describe actions support no resource-level permissions; every other statement names its resources.
  statement {
    sid       = "ListTheBackupBucket"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation"]
    resources = [aws_s3_bucket.velero.arn]
  }

  statement {
    sid       = "BackupObjects"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"]
    resources = ["${aws_s3_bucket.velero.arn}/*"]
  }

  statement {
    sid       = "TheBucketKeyThroughS3"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [var.kms_key_arn]
    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["s3.${local.region}.amazonaws.com"]
    }
  }

  statement {
    sid       = "DescribeVolumesAndSnapshots"
    actions   = ["ec2:DescribeVolumes", "ec2:DescribeSnapshots"]
    resources = ["*"]
  }

  statement {
    sid     = "SnapshotVolumesAndRestoreThem"
    actions = ["ec2:CreateSnapshot", "ec2:CreateVolume"]
    resources = [
      "arn:${local.partition}:ec2:${local.region}:${local.account_id}:volume/*",
      "arn:${local.partition}:ec2:${local.region}::snapshot/*",
    ]
  }

  # Velero tags at creation (TagSpecifications); tagging anything else is not allowed.
  statement {
    sid     = "TagWhatItCreates"
    actions = ["ec2:CreateTags"]
    resources = [
      "arn:${local.partition}:ec2:${local.region}:${local.account_id}:volume/*",
      "arn:${local.partition}:ec2:${local.region}::snapshot/*",
    ]
    condition {
      test     = "StringEquals"
      variable = "ec2:CreateAction"
      values   = ["CreateSnapshot", "CreateVolume"]
    }
  }

  # Only snapshots Velero made (it tags each with its backup's name) may be deleted, never the
  # Data Lifecycle Manager's daily snapshots.
  statement {
    sid       = "DeleteItsOwnSnapshots"
    actions   = ["ec2:DeleteSnapshot"]
    resources = ["arn:${local.partition}:ec2:${local.region}::snapshot/*"]
    condition {
      test     = "Null"
      variable = "aws:ResourceTag/velero.io/backup"
      values   = ["false"]
    }
  }

  # Volumes are encrypted with the data key: snapshotting and restoring them needs it via EC2.
  statement {
    sid       = "TheVolumeKeyThroughEC2"
    actions   = ["kms:Decrypt", "kms:GenerateDataKeyWithoutPlaintext", "kms:ReEncrypt*", "kms:DescribeKey", "kms:CreateGrant"]
    resources = [var.kms_key_arn]
    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["ec2.${local.region}.amazonaws.com"]
    }
  }
}

resource "aws_iam_role_policy" "velero" {
  name   = "backups"
  role   = aws_iam_role.velero.id
  policy = data.aws_iam_policy_document.velero.json
}

# -- S3: Velero's backups ----------------------------------------------------------------------

resource "aws_s3_bucket" "velero" {
  #checkov:skip=CKV_AWS_144:Cross-region replication is a disaster-recovery choice per environment (a second region and key); the bucket is versioned.
  #checkov:skip=CKV2_AWS_62:Nothing consumes bucket events; Velero reads and writes the bucket directly.
  bucket        = local.velero_bucket_name
  force_destroy = var.force_destroy
  tags          = merge(var.tags, { Name = local.velero_bucket_name })
}

resource "aws_s3_bucket_ownership_controls" "velero" {
  bucket = aws_s3_bucket.velero.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "velero" {
  bucket                  = aws_s3_bucket.velero.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_versioning" "velero" {
  bucket = aws_s3_bucket.velero.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "velero" {
  bucket = aws_s3_bucket.velero.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = var.kms_key_arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "velero" {
  bucket = aws_s3_bucket.velero.id

  # Velero deletes expired backups itself (their TTL); versions it deleted go after a while.
  rule {
    id     = "expire-deleted-backups"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = var.velero_noncurrent_version_days
    }
    expiration {
      expired_object_delete_marker = true
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }

  depends_on = [aws_s3_bucket_versioning.velero]
}

data "aws_iam_policy_document" "velero_bucket" {
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.velero.arn, "${aws_s3_bucket.velero.arn}/*"]
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
    sid       = "DenyOldTLS"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.velero.arn, "${aws_s3_bucket.velero.arn}/*"]
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

resource "aws_s3_bucket_policy" "velero" {
  bucket = aws_s3_bucket.velero.id
  policy = data.aws_iam_policy_document.velero_bucket.json

  depends_on = [aws_s3_bucket_public_access_block.velero]
}

resource "aws_s3_bucket_logging" "velero" {
  bucket        = aws_s3_bucket.velero.id
  target_bucket = var.access_log_bucket
  target_prefix = "velero/"
}

# -- ElastiCache Redis: Ray GCS fault tolerance ------------------------------------------------

resource "aws_security_group" "redis" {
  name_prefix = "${var.name}-gcs-redis-"
  description = "Redis (GCS fault tolerance) of ${var.name}: from the nodes only"
  vpc_id      = var.vpc_id
  tags        = merge(var.tags, { Name = "${var.name}-gcs-redis" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "redis_from_nodes" {
  security_group_id            = aws_security_group.redis.id
  description                  = "Redis TLS from the nodes (Ray heads)"
  referenced_security_group_id = var.node_security_group_id
  ip_protocol                  = "tcp"
  from_port                    = 6379
  to_port                      = 6379
}

resource "aws_elasticache_subnet_group" "redis" {
  count = var.enable_redis ? 1 : 0

  name        = "${var.name}-gcs"
  description = "Private subnets of ${var.name}"
  subnet_ids  = var.subnet_ids
  tags        = var.tags
}

# The AUTH token: generated by Secrets Manager at the first apply, stored under the environment's
# prefix where the rendered ExternalSecret rayplane-redis reads it (key <prefix>/redis-auth-token,
# a plain string). The data source answers a new password on every plan, so both consumers keep
# the first one (ignore_changes). Rotation is a manual ROTATE/SET on the replication group plus a
# new secret version (docs/deployment.md, Day 2): replacing the group would lose the GCS data.
# The token is in the Terraform state, which is why the state bucket is encrypted and private.
data "aws_secretsmanager_random_password" "redis" {
  password_length     = 64
  exclude_punctuation = true # ElastiCache refuses some punctuation (@, ", /) in AUTH tokens
}

resource "aws_secretsmanager_secret" "redis_auth" {
  #checkov:skip=CKV2_AWS_57:Rotating the AUTH token needs a coordinated ModifyReplicationGroup (auth_token_update_strategy ROTATE, then SET) and a Ray head restart; it is rotated by hand, not by a rotation Lambda.
  name                    = "${var.secrets_manager_prefix}/redis-auth-token"
  description             = "AUTH token of the ${var.name} GCS Redis (ExternalSecret rayplane-redis)"
  kms_key_id              = var.kms_key_arn
  recovery_window_in_days = var.secret_recovery_window_days
  tags                    = var.tags
}

resource "aws_secretsmanager_secret_version" "redis_auth" {
  secret_id     = aws_secretsmanager_secret.redis_auth.id
  secret_string = data.aws_secretsmanager_random_password.redis.random_password

  lifecycle {
    ignore_changes = [secret_string]
  }
}

resource "aws_elasticache_replication_group" "gcs" {
  count = var.enable_redis ? 1 : 0

  replication_group_id = "${var.name}-gcs"
  description          = "Ray GCS fault tolerance of ${var.name}"
  engine               = "redis"
  engine_version       = var.redis_engine_version
  node_type            = var.redis_node_type
  port                 = 6379
  num_cache_clusters   = var.redis_num_cache_clusters
  # Cluster mode off: Ray's GCS speaks to one primary.
  automatic_failover_enabled = true
  multi_az_enabled           = true
  subnet_group_name          = aws_elasticache_subnet_group.redis[0].name
  security_group_ids         = [aws_security_group.redis.id]

  at_rest_encryption_enabled = true
  kms_key_id                 = var.kms_key_arn
  transit_encryption_enabled = true # the head connects with rediss://
  auth_token                 = data.aws_secretsmanager_random_password.redis.random_password

  snapshot_retention_limit   = var.redis_snapshot_retention_days
  snapshot_window            = "02:00-03:00"
  maintenance_window         = "sun:04:00-sun:05:00"
  auto_minor_version_upgrade = true
  apply_immediately          = false
  tags                       = var.tags

  lifecycle {
    ignore_changes = [auth_token]
  }

  depends_on = [aws_secretsmanager_secret_version.redis_auth]
}

# -- RDS PostgreSQL: MLflow's backend store ----------------------------------------------------

resource "aws_security_group" "mlflow_db" {
  name_prefix = "${var.name}-mlflow-db-"
  description = "PostgreSQL (MLflow backend store) of ${var.name}: from the nodes only"
  vpc_id      = var.vpc_id
  tags        = merge(var.tags, { Name = "${var.name}-mlflow-db" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "mlflow_db_from_nodes" {
  security_group_id            = aws_security_group.mlflow_db.id
  description                  = "PostgreSQL from the nodes (the MLflow server)"
  referenced_security_group_id = var.node_security_group_id
  ip_protocol                  = "tcp"
  from_port                    = 5432
  to_port                      = 5432
}

resource "aws_db_subnet_group" "mlflow" {
  name        = "${var.name}-mlflow"
  description = "Private subnets of ${var.name}"
  subnet_ids  = var.subnet_ids
  tags        = var.tags
}

resource "aws_db_parameter_group" "mlflow" {
  name_prefix = "${var.name}-mlflow-"
  description = "MLflow's PostgreSQL: TLS only, slow queries and DDL logged"
  family      = "postgres${var.mlflow_db_engine_version}"
  tags        = var.tags

  parameter {
    name  = "rds.force_ssl"
    value = "1"
  }

  parameter {
    name  = "log_statement"
    value = "ddl"
  }

  parameter {
    name  = "log_min_duration_statement"
    value = "1000" # ms
  }

  lifecycle {
    create_before_destroy = true
  }
}

data "aws_iam_policy_document" "rds_monitoring_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["monitoring.rds.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "rds_monitoring" {
  name               = "${var.name}-rds-monitoring"
  description        = "RDS enhanced monitoring of ${var.name}-mlflow"
  assume_role_policy = data.aws_iam_policy_document.rds_monitoring_assume.json
  tags               = var.tags
}

resource "aws_iam_role_policy_attachment" "rds_monitoring" {
  role       = aws_iam_role.rds_monitoring.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AmazonRDSEnhancedMonitoringRole"
}

# RDS writes its exports to these names; creating them first sets retention and encryption.
resource "aws_cloudwatch_log_group" "mlflow_db" {
  for_each = toset(["postgresql", "upgrade"])

  name              = "/aws/rds/instance/${var.name}-mlflow/${each.key}"
  retention_in_days = var.log_retention_days
  kms_key_id        = var.kms_key_arn
  tags              = var.tags
}

resource "aws_db_instance" "mlflow" {
  identifier     = "${var.name}-mlflow"
  engine         = "postgres"
  engine_version = var.mlflow_db_engine_version
  instance_class = var.mlflow_db_instance_class
  db_name        = "mlflow"
  username       = "mlflow"
  port           = 5432
  # RDS generates the password into Secrets Manager (rds!db-<id>, JSON username/password),
  # encrypted with the data key, and rotates it; Terraform never sees it.
  manage_master_user_password   = true
  master_user_secret_kms_key_id = var.kms_key_arn

  allocated_storage     = var.mlflow_db_allocated_storage_gib
  max_allocated_storage = var.mlflow_db_max_allocated_storage_gib
  storage_type          = "gp3"
  storage_encrypted     = true
  kms_key_id            = var.kms_key_arn

  db_subnet_group_name   = aws_db_subnet_group.mlflow.name
  vpc_security_group_ids = [aws_security_group.mlflow_db.id]
  publicly_accessible    = false
  multi_az               = var.mlflow_db_multi_az
  parameter_group_name   = aws_db_parameter_group.mlflow.name

  iam_database_authentication_enabled = true
  backup_retention_period             = var.mlflow_db_backup_retention_days
  backup_window                       = "02:00-03:00"
  maintenance_window                  = "sun:04:00-sun:05:00"
  copy_tags_to_snapshot               = true
  deletion_protection                 = var.mlflow_db_deletion_protection
  skip_final_snapshot                 = var.mlflow_db_skip_final_snapshot
  final_snapshot_identifier           = var.mlflow_db_skip_final_snapshot ? null : "${var.name}-mlflow-final"
  auto_minor_version_upgrade          = true
  apply_immediately                   = false

  enabled_cloudwatch_logs_exports       = ["postgresql", "upgrade"]
  performance_insights_enabled          = true
  performance_insights_kms_key_id       = var.kms_key_arn
  performance_insights_retention_period = 7
  monitoring_interval                   = 60
  monitoring_role_arn                   = aws_iam_role.rds_monitoring.arn

  tags = var.tags

  depends_on = [aws_iam_role_policy_attachment.rds_monitoring, aws_cloudwatch_log_group.mlflow_db]
}
