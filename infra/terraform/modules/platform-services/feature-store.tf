# The Feast feature store's AWS side (issue 17; docs/features.md): one bucket for the registry
# (features/registry.db), the offline data and the Ray offline store's staging; an IRSA role
# for the feature-store service account (the materialisation RayCronJob and the TF RayJob);
# the online store's login. The online store is PostgreSQL on MLflow's RDS instance (main.tf),
# not a second instance and not ElastiCache Redis: Feast's online rows are a few hundred keys
# per materialisation (per pool and per job), read at request rate by the agents tool, which
# one small PostgreSQL answers; the instance is already Multi-AZ, encrypted, backed up and
# reachable from the nodes, and locally the platform's PostgreSQL plays the same part. Feast
# gets a database and a login role of its own there (`feast`, not MLflow's master user), so a
# leaked Feast password reaches the feature rows only. RDS's API makes one database per
# instance and this configuration has no PostgreSQL provider: the rendered Job
# feast-db-bootstrap (raycluster/kuberay/features_db.py) creates the role and database with
# the master login, on every Argo CD sync of the platform, idempotently.

locals {
  feast_bucket_name = coalesce(var.feature_store_bucket_name, "${var.name}-feast-${local.account_id}")
}

# -- S3: registry and offline store ------------------------------------------------------------

resource "aws_s3_bucket" "feast" {
  #checkov:skip=CKV_AWS_144:Cross-region replication is a disaster-recovery choice per environment (a second region and key); the bucket is versioned, and the offline data can be generated again.
  #checkov:skip=CKV2_AWS_62:Nothing consumes bucket events; Feast and Ray read and write the bucket directly.
  bucket        = local.feast_bucket_name
  force_destroy = var.force_destroy
  tags          = merge(var.tags, { Name = local.feast_bucket_name })
}

resource "aws_s3_bucket_ownership_controls" "feast" {
  bucket = aws_s3_bucket.feast.id
  rule {
    object_ownership = "BucketOwnerEnforced" # no ACLs: IAM and the bucket policy only
  }
}

resource "aws_s3_bucket_public_access_block" "feast" {
  bucket                  = aws_s3_bucket.feast.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

# Versioned: `feast apply` overwrites features/registry.db; a bad apply is undone from the
# last version.
resource "aws_s3_bucket_versioning" "feast" {
  bucket = aws_s3_bucket.feast.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "feast" {
  bucket = aws_s3_bucket.feast.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = var.kms_key_arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "feast" {
  bucket = aws_s3_bucket.feast.id

  rule {
    id     = "expire-replaced-versions"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = var.feature_store_noncurrent_version_days
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }

  depends_on = [aws_s3_bucket_versioning.feast]
}

data "aws_iam_policy_document" "feast_bucket" {
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.feast.arn, "${aws_s3_bucket.feast.arn}/*"]
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
    resources = [aws_s3_bucket.feast.arn, "${aws_s3_bucket.feast.arn}/*"]
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

resource "aws_s3_bucket_policy" "feast" {
  bucket = aws_s3_bucket.feast.id
  policy = data.aws_iam_policy_document.feast_bucket.json

  depends_on = [aws_s3_bucket_public_access_block.feast]
}

resource "aws_s3_bucket_logging" "feast" {
  bucket        = aws_s3_bucket.feast.id
  target_bucket = var.access_log_bucket
  target_prefix = "feast/"
}

# -- IRSA: the feature-store service account reaches this bucket and nothing else ---------------

resource "aws_iam_role" "feature_store" {
  name               = "${var.name}-feature-store"
  description        = "IRSA role of ${join(", ", var.feature_store_service_accounts)}: the Feast bucket only"
  assume_role_policy = data.aws_iam_policy_document.irsa_assume["feature-store"].json
  tags               = var.tags
}

data "aws_iam_policy_document" "feature_store" {
  statement {
    sid       = "ListTheFeastBucket"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation", "s3:ListBucketMultipartUploads"]
    resources = [aws_s3_bucket.feast.arn]
  }

  # `feast apply` writes the registry, materialisation reads the offline parquet, the TF job
  # reads both; Ray Data writes parquet in parts (multipart uploads).
  statement {
    sid = "ObjectsOfTheFeastBucket"
    actions = [
      "s3:GetObject", "s3:GetObjectVersion", "s3:PutObject", "s3:DeleteObject",
      "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts",
    ]
    resources = ["${aws_s3_bucket.feast.arn}/*"]
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
}

resource "aws_iam_role_policy" "feature_store" {
  name   = "feast-bucket"
  role   = aws_iam_role.feature_store.id
  policy = data.aws_iam_policy_document.feature_store.json
}

# -- The online store's login ----------------------------------------------------------------
# Generated by Secrets Manager at the first apply, under the environment's prefix, where the
# rendered ExternalSecret feast-online-store reads it (JSON username/password) for the Feast
# pods and for the bootstrap Job, which sets it as the role's password. Like the Redis AUTH
# token, the first value is kept (the data source answers a new one on every plan) and it is in
# the Terraform state, which is why the state bucket is encrypted and private.

data "aws_secretsmanager_random_password" "feast_db" {
  password_length     = 48
  exclude_punctuation = true # it goes into a libpq connection string unquoted
}

resource "aws_secretsmanager_secret" "feast_db" {
  #checkov:skip=CKV2_AWS_57:Rotated by putting a new value: the bootstrap Job sets it as the role's password at the next Argo CD sync (docs/deployment.md, day 2); a rotation Lambda would need MLflow's master login for a role that reaches feature rows only.
  name                    = "${var.secrets_manager_prefix}/feast-db"
  description             = "Login of Feast's online store (role and database ${var.feature_store_db_name} on ${var.name}-mlflow; ExternalSecret feast-online-store)"
  kms_key_id              = var.kms_key_arn
  recovery_window_in_days = var.secret_recovery_window_days
  tags                    = var.tags
}

resource "aws_secretsmanager_secret_version" "feast_db" {
  secret_id = aws_secretsmanager_secret.feast_db.id
  secret_string = jsonencode({
    username = var.feature_store_db_name
    password = data.aws_secretsmanager_random_password.feast_db.random_password
  })

  lifecycle {
    ignore_changes = [secret_string]
  }
}
