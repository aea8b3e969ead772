variable "name" {
  description = "Cluster name; prefixes the repository-independent resources (IAM roles, bucket, Redis, database)."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,37}[a-z0-9]$", var.name))
    error_message = "var.name must be 3-39 lowercase letters, digits or '-', starting with a letter (it prefixes IAM role names, limited to 64 characters)."
  }
}

variable "secrets_manager_prefix" {
  description = "Prefix of the environment's secrets in AWS Secrets Manager (secrets_manager_prefix of raycluster/environments/<env>.yaml): External Secrets may read only below it, and the Redis AUTH token is written there."
  type        = string
  default     = "rayplane/production"

  validation {
    condition     = can(regex("^[A-Za-z0-9_+=.@-]+(/[A-Za-z0-9_+=.@-]+)*$", var.secrets_manager_prefix))
    error_message = "var.secrets_manager_prefix must be a Secrets Manager name prefix such as rayplane/production (no leading or trailing '/', no wildcards)."
  }
}

variable "vpc_id" {
  description = "VPC of the cluster: the Redis and PostgreSQL security groups live in it."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets (network module) for the Redis and PostgreSQL subnet groups; at least two zones, so a replica or standby survives a zone."
  type        = list(string)

  validation {
    condition     = length(var.subnet_ids) >= 2
    error_message = "var.subnet_ids must name at least two private subnets (Multi-AZ Redis and PostgreSQL need two zones)."
  }
}

variable "node_security_group_id" {
  description = "Security group of the nodes (the EKS cluster security group that managed node groups use): the only source allowed to reach Redis and PostgreSQL."
  type        = string

  validation {
    condition     = can(regex("^sg-[0-9a-f]+$", var.node_security_group_id))
    error_message = "var.node_security_group_id must be a security group id (sg-...)."
  }
}

variable "kms_key_arn" {
  description = "KMS key (security module's data key) for the image repository, the backup bucket, Redis, PostgreSQL, its managed password and the Redis AUTH secret."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:kms:", var.kms_key_arn))
    error_message = "var.kms_key_arn must be a KMS key ARN (arn:aws:kms:...)."
  }
}

variable "oidc_provider_arn" {
  description = "IAM OIDC provider of the cluster (eks-cluster module): the federated principal of the IRSA roles."
  type        = string
}

variable "oidc_issuer" {
  description = "OIDC issuer without https:// (eks-cluster module), the prefix of the IRSA condition keys."
  type        = string

  validation {
    condition     = !startswith(var.oidc_issuer, "https://")
    error_message = "var.oidc_issuer must be given without the https:// scheme."
  }
}

variable "access_log_bucket" {
  description = "Bucket that receives the backup bucket's server access logs: the storage module's access-log bucket, whose policy must admit the backup bucket as a source (its access_log_source_bucket_arns)."
  type        = string
}

variable "force_destroy" {
  description = "Let `terraform destroy` delete the backup bucket and the image repository with their contents (test environments only)."
  type        = bool
  default     = false
}

# -- images ----------------------------------------------------------------------------------

variable "ecr_repository_name" {
  description = "ECR repository of the rayplane Ray images (images.repository of the environment is <account>.dkr.ecr.<region>.amazonaws.com/<this>)."
  type        = string
  default     = "rayplane"

  validation {
    condition     = can(regex("^[a-z0-9]+([._-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*$", var.ecr_repository_name)) && length(var.ecr_repository_name) <= 256
    error_message = "var.ecr_repository_name must be a valid ECR repository name: lowercase letters, digits, '.', '_', '-' and '/' separators, at most 256 characters."
  }
}

variable "ecr_untagged_expiry_days" {
  description = "Days after which untagged images (layers of replaced or failed pushes) are expired."
  type        = number
  default     = 7

  validation {
    condition     = var.ecr_untagged_expiry_days >= 1
    error_message = "var.ecr_untagged_expiry_days must be at least 1."
  }
}

variable "ecr_ephemeral_tag_prefixes" {
  description = "Tag prefixes of throw-away CI builds that expire after ecr_ephemeral_tag_expiry_days. Release tags (the ones environments pin, such as 2.60.0-py311-cpu) never expire."
  type        = list(string)
  default     = ["ci-", "pr-"]

  validation {
    condition     = length(var.ecr_ephemeral_tag_prefixes) > 0 && alltrue([for p in var.ecr_ephemeral_tag_prefixes : can(regex("^[A-Za-z0-9_.-]+$", p))])
    error_message = "var.ecr_ephemeral_tag_prefixes must hold at least one tag prefix of letters, digits, '_', '.' or '-' (an empty prefix would expire release tags)."
  }
}

variable "ecr_ephemeral_tag_expiry_days" {
  description = "Days after which images with an ephemeral tag prefix are expired."
  type        = number
  default     = 30

  validation {
    condition     = var.ecr_ephemeral_tag_expiry_days >= 1
    error_message = "var.ecr_ephemeral_tag_expiry_days must be at least 1."
  }
}

# -- IRSA: External Secrets and Velero -------------------------------------------------------

variable "external_secrets_service_accounts" {
  description = "Service accounts (namespace/name) allowed to assume <name>-external-secrets: the External Secrets controller of infra/helm/external-secrets (release namespace external-secrets, serviceAccount.name external-secrets), which the ClusterSecretStore names."
  type        = list(string)
  default     = ["external-secrets/external-secrets"]

  validation {
    condition     = length(var.external_secrets_service_accounts) > 0 && alltrue([for sa in var.external_secrets_service_accounts : can(regex("^[a-z0-9-]+/[a-z0-9.-]+$", sa))])
    error_message = "var.external_secrets_service_accounts must hold namespace/name pairs, such as external-secrets/external-secrets."
  }
}

variable "load_balancer_controller_service_accounts" {
  description = "Service accounts (namespace/name) that may assume the AWS Load Balancer Controller's IRSA role: the controller that infra/helm/aws-load-balancer-controller installs."
  type        = list(string)
  default     = ["kube-system/aws-load-balancer-controller"]

  validation {
    condition     = length(var.load_balancer_controller_service_accounts) > 0 && alltrue([for sa in var.load_balancer_controller_service_accounts : can(regex("^[a-z0-9-]+/[a-z0-9.-]+$", sa))])
    error_message = "var.load_balancer_controller_service_accounts must hold namespace/name pairs, such as kube-system/aws-load-balancer-controller."
  }
}

variable "velero_service_accounts" {
  description = "Service accounts (namespace/name) allowed to assume <name>-velero: the Velero server of infra/helm/velero (release velero in namespace velero; the chart names its server account <fullname>-server = velero-server)."
  type        = list(string)
  default     = ["velero/velero-server"]

  validation {
    condition     = length(var.velero_service_accounts) > 0 && alltrue([for sa in var.velero_service_accounts : can(regex("^[a-z0-9-]+/[a-z0-9.-]+$", sa))])
    error_message = "var.velero_service_accounts must hold namespace/name pairs, such as velero/velero-server."
  }
}

variable "velero_bucket_name" {
  description = "Velero's backup bucket; null makes <name>-backups-<account id>."
  type        = string
  default     = null

  validation {
    condition     = var.velero_bucket_name == null || can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.velero_bucket_name))
    error_message = "var.velero_bucket_name must be 3-63 lowercase letters, digits, '.' or '-'."
  }
}

variable "velero_noncurrent_version_days" {
  description = "Days an overwritten or deleted backup object version is kept (Velero expires backups itself by their TTL; this bounds what a deleted backup leaves behind)."
  type        = number
  default     = 30

  validation {
    condition     = var.velero_noncurrent_version_days >= 1
    error_message = "var.velero_noncurrent_version_days must be at least 1."
  }
}

# -- Redis for Ray GCS fault tolerance ---------------------------------------------------------

variable "enable_redis" {
  description = "Create the ElastiCache replication group and its subnet group. Off only where ElastiCache cannot be emulated (moto in tests); the AUTH secret and the security group are made either way."
  type        = bool
  default     = true
}

variable "redis_node_type" {
  description = "ElastiCache node type of the GCS fault-tolerance Redis (GCS tables are small: metadata of actors, jobs, nodes, Serve apps)."
  type        = string
  default     = "cache.r7g.large"

  validation {
    condition     = startswith(var.redis_node_type, "cache.")
    error_message = "var.redis_node_type must be an ElastiCache node type such as cache.r7g.large."
  }
}

variable "redis_engine_version" {
  description = "Redis OSS engine version (ElastiCache)."
  type        = string
  default     = "7.1"

  validation {
    condition     = can(regex("^[6-9]\\.[0-9x]+$", var.redis_engine_version))
    error_message = "var.redis_engine_version must be a Redis 6 or newer version such as 7.1 (AUTH with TLS needs 6+)."
  }
}

variable "redis_num_cache_clusters" {
  description = "Nodes of the Redis replication group: one primary plus replicas in other zones (2 or more gives automatic failover)."
  type        = number
  default     = 2

  validation {
    condition     = var.redis_num_cache_clusters >= 2 && var.redis_num_cache_clusters <= 6
    error_message = "var.redis_num_cache_clusters must be 2 to 6 (a primary and at least one replica, for automatic failover)."
  }
}

variable "redis_snapshot_retention_days" {
  description = "Days of automatic daily Redis snapshots kept."
  type        = number
  default     = 7

  validation {
    condition     = var.redis_snapshot_retention_days >= 1 && var.redis_snapshot_retention_days <= 35
    error_message = "var.redis_snapshot_retention_days must be 1 to 35 (the ElastiCache limits)."
  }
}

variable "secret_recovery_window_days" {
  description = "Days a deleted Secrets Manager secret (the Redis AUTH token) can be restored; 0 deletes at once (test environments only)."
  type        = number
  default     = 30

  validation {
    condition     = var.secret_recovery_window_days == 0 || (var.secret_recovery_window_days >= 7 && var.secret_recovery_window_days <= 30)
    error_message = "var.secret_recovery_window_days must be 0 or 7 to 30 (the Secrets Manager limits)."
  }
}

# -- PostgreSQL for MLflow's backend store -------------------------------------------------------

variable "mlflow_db_instance_class" {
  description = "RDS instance class of MLflow's PostgreSQL."
  type        = string
  default     = "db.m7g.large"

  validation {
    condition     = startswith(var.mlflow_db_instance_class, "db.")
    error_message = "var.mlflow_db_instance_class must be an RDS instance class such as db.m7g.large."
  }
}

variable "mlflow_db_engine_version" {
  description = "PostgreSQL major version (RDS picks the newest minor and upgrades minors in the maintenance window)."
  type        = string
  default     = "17"

  validation {
    condition     = can(regex("^1[4-9]$", var.mlflow_db_engine_version))
    error_message = "var.mlflow_db_engine_version must be a PostgreSQL major version from 14 to 19, such as \"17\"."
  }
}

variable "mlflow_db_allocated_storage_gib" {
  description = "Initial gp3 storage of MLflow's database in GiB (storage autoscaling grows it up to mlflow_db_max_allocated_storage_gib)."
  type        = number
  default     = 50

  validation {
    condition     = var.mlflow_db_allocated_storage_gib >= 20
    error_message = "var.mlflow_db_allocated_storage_gib must be at least 20 (the RDS gp3 minimum)."
  }
}

variable "mlflow_db_max_allocated_storage_gib" {
  description = "Upper bound of storage autoscaling for MLflow's database in GiB."
  type        = number
  default     = 500

  validation {
    condition     = var.mlflow_db_max_allocated_storage_gib >= 20
    error_message = "var.mlflow_db_max_allocated_storage_gib must be at least 20."
  }
}

variable "mlflow_db_multi_az" {
  description = "A synchronous standby in a second zone for MLflow's database."
  type        = bool
  default     = true
}

variable "mlflow_db_backup_retention_days" {
  description = "Days of automated backups (point-in-time recovery) of MLflow's database."
  type        = number
  default     = 14

  validation {
    condition     = var.mlflow_db_backup_retention_days >= 1 && var.mlflow_db_backup_retention_days <= 35
    error_message = "var.mlflow_db_backup_retention_days must be 1 to 35 (0 would turn backups off)."
  }
}

variable "mlflow_db_deletion_protection" {
  description = "Refuse to delete MLflow's database (it holds every run, metric and registered model version). Off only in test environments."
  type        = bool
  default     = true
}

variable "mlflow_db_skip_final_snapshot" {
  description = "Delete MLflow's database without a final snapshot (test environments only)."
  type        = bool
  default     = false
}

variable "log_retention_days" {
  description = "Days the database's exported logs (postgresql, upgrade) are kept in CloudWatch Logs."
  type        = number
  default     = 365

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.log_retention_days)
    error_message = "var.log_retention_days must be a retention CloudWatch Logs accepts (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288 or 3653)."
  }
}

variable "tags" {
  description = "Tags for every resource of the module."
  type        = map(string)
  default     = {}
}

# -- the Feast feature store (feature-store.tf) ------------------------------------------------

variable "feature_store_bucket_name" {
  description = "Bucket of Feast's registry and offline store; default <name>-feast-<account id>."
  type        = string
  default     = null
}

variable "feature_store_service_accounts" {
  description = "Service accounts (namespace/name) allowed to assume <name>-feature-store: the feature-store account of the materialisation RayCronJob and the TF RayJob (training) and of the agents app's workers, whose job_estimate tool reads the store (agentic); rendered by raycluster/kuberay/features.py."
  type        = list(string)
  default     = ["training/feature-store", "agentic/feature-store"]

  validation {
    condition     = length(var.feature_store_service_accounts) > 0 && alltrue([for sa in var.feature_store_service_accounts : can(regex("^[a-z0-9-]+/[a-z0-9.-]+$", sa))])
    error_message = "var.feature_store_service_accounts must hold namespace/name pairs, such as training/feature-store."
  }
}

variable "feature_store_db_name" {
  description = "Database and login role of Feast's online store on the MLflow instance."
  type        = string
  default     = "feast"

  validation {
    condition     = can(regex("^[a-z][a-z0-9_]{0,62}$", var.feature_store_db_name)) && var.feature_store_db_name != "mlflow"
    error_message = "var.feature_store_db_name must be a PostgreSQL identifier (lowercase letters, digits, '_') other than mlflow (MLflow's master login)."
  }
}

variable "feature_store_noncurrent_version_days" {
  description = "Days a replaced registry or offline file is kept (the registry, features/registry.db, is overwritten by each feast apply)."
  type        = number
  default     = 30

  validation {
    condition     = var.feature_store_noncurrent_version_days >= 1
    error_message = "var.feature_store_noncurrent_version_days must be at least 1."
  }
}
