variable "name" {
  description = "Cluster name; prefixes the bucket, file system and IAM roles."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,37}[a-z0-9]$", var.name))
    error_message = "var.name must be 3-39 lowercase letters, digits or '-', starting with a letter."
  }
}

variable "vpc_id" {
  description = "VPC of the EFS mount targets."
  type        = string
}

variable "private_subnets_by_az" {
  description = "Private subnet id by availability zone: one EFS mount target each."
  type        = map(string)

  validation {
    condition     = length(var.private_subnets_by_az) >= 1
    error_message = "var.private_subnets_by_az must name at least one subnet."
  }
}

variable "nfs_client_cidrs" {
  description = "CIDRs allowed to mount EFS over NFS (the nodes' private subnets)."
  type        = list(string)

  validation {
    condition     = length(var.nfs_client_cidrs) > 0 && alltrue([for c in var.nfs_client_cidrs : can(cidrhost(c, 0)) && c != "0.0.0.0/0"])
    error_message = "var.nfs_client_cidrs must hold at least one IPv4 CIDR, and not 0.0.0.0/0."
  }
}

variable "kms_key_arn" {
  description = "KMS key for the bucket, EFS, and the volumes the EBS CSI driver creates."
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

variable "bucket_name" {
  description = "Name of the artifacts and model-registry bucket; null makes <name>-artifacts-<account id>."
  type        = string
  default     = null

  validation {
    condition     = var.bucket_name == null || can(regex("^[a-z0-9][a-z0-9.-]{1,48}[a-z0-9]$", var.bucket_name))
    error_message = "var.bucket_name must be 3-50 lowercase letters, digits, '.' or '-' (the access-log bucket adds a suffix)."
  }
}

variable "force_destroy" {
  description = "Let `terraform destroy` delete the buckets with their objects. Keep false in production: the bucket holds checkpoints and registered models."
  type        = bool
  default     = false
}

variable "transition_to_ia_days" {
  description = "Days after which current objects move to S3 Standard-IA (checkpoints and old artifacts are read rarely)."
  type        = number
  default     = 30

  validation {
    condition     = var.transition_to_ia_days >= 30
    error_message = "var.transition_to_ia_days must be at least 30 (S3's minimum for Standard-IA)."
  }
}

variable "noncurrent_version_retention_days" {
  description = "Days an overwritten or deleted object version is kept (the undo window of the bucket)."
  type        = number
  default     = 90

  validation {
    condition     = var.noncurrent_version_retention_days >= 7
    error_message = "var.noncurrent_version_retention_days must be at least 7."
  }
}

variable "access_log_retention_days" {
  description = "Days the bucket's server access logs are kept."
  type        = number
  default     = 365

  validation {
    condition     = var.access_log_retention_days >= 1
    error_message = "var.access_log_retention_days must be at least 1."
  }
}

variable "access_log_source_bucket_arns" {
  description = "Further buckets (ARNs) whose server access logs the access-log bucket accepts, such as Velero's backup bucket."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for a in var.access_log_source_bucket_arns : can(regex("^arn:aws[a-z-]*:s3:::[a-z0-9][a-z0-9.-]+$", a))])
    error_message = "var.access_log_source_bucket_arns must hold bucket ARNs (arn:aws:s3:::<bucket>)."
  }
}

variable "workload_identities" {
  description = "IRSA roles that may use the bucket (and nothing else), by role suffix: the Kubernetes service accounts (namespace/name) allowed to assume each."
  type = map(object({
    service_accounts = list(string)
    read_only        = optional(bool, false)
  }))
  default = {
    ray = {
      service_accounts = ["training/ray", "inference/ray", "agentic/ray"]
    }
    mlflow = {
      service_accounts = ["mlops/mlflow"]
    }
  }

  validation {
    condition     = alltrue(flatten([for w in values(var.workload_identities) : [for sa in w.service_accounts : can(regex("^[a-z0-9-]+/[a-z0-9.-]+$", sa))]]))
    error_message = "var.workload_identities[*].service_accounts must be namespace/name pairs, such as training/ray."
  }
}

variable "efs_posix_user" {
  description = "POSIX uid/gid the EFS access point maps every client to (Ray's images run as uid 1000, gid 100)."
  type = object({
    uid = number
    gid = number
  })
  default = {
    uid = 1000
    gid = 100
  }

  validation {
    condition     = var.efs_posix_user.uid > 0 && var.efs_posix_user.gid >= 0
    error_message = "var.efs_posix_user.uid must not be 0 (root); gid must be >= 0."
  }
}

variable "snapshot_retain_count" {
  description = "Daily EBS snapshots of volumes tagged rayplane.io/backup=daily that are kept."
  type        = number
  default     = 14

  validation {
    condition     = var.snapshot_retain_count >= 1 && var.snapshot_retain_count <= 1000
    error_message = "var.snapshot_retain_count must be 1 to 1000 (the Data Lifecycle Manager limit)."
  }
}

variable "snapshot_time" {
  description = "UTC time of day (HH:MM) the daily EBS snapshots start."
  type        = string
  default     = "03:00"

  validation {
    condition     = can(regex("^([01][0-9]|2[0-3]):[0-5][0-9]$", var.snapshot_time))
    error_message = "var.snapshot_time must be HH:MM in 24-hour UTC, such as 03:00."
  }
}

variable "enable_backup_policies" {
  description = "Create the EBS snapshot policy (Data Lifecycle Manager) and turn on AWS Backup for EFS. Off only where those APIs are not available, such as the moto emulator in tests."
  type        = bool
  default     = true
}

variable "tags" {
  description = "Tags for every resource of the module."
  type        = map(string)
  default     = {}
}
