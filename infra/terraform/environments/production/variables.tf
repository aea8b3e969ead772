variable "region" {
  description = "AWS region of the platform."
  type        = string
  default     = "us-east-1"

  validation {
    condition     = can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9]$", var.region))
    error_message = "var.region must be an AWS region name such as us-east-1."
  }
}

variable "cluster_name" {
  description = "EKS cluster name; prefixes every resource of the environment."
  type        = string
  default     = "rayplane-production"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,37}[a-z0-9]$", var.cluster_name))
    error_message = "var.cluster_name must be 3-39 lowercase letters, digits or '-', starting with a letter."
  }
}

variable "kubernetes_version" {
  description = "Kubernetes minor version of the cluster and its nodes."
  type        = string
  default     = "1.33"
}

variable "vpc_cidr" {
  description = "IPv4 CIDR of the VPC."
  type        = string
  default     = "10.0.0.0/16"
}

variable "availability_zones" {
  description = "Availability zones of the region to spread nodes, NAT gateways and EFS mount targets across (pick zones that offer p4d/p4de/p5 capacity)."
  type        = list(string)
  default     = ["us-east-1a", "us-east-1b", "us-east-1c"]

  validation {
    condition     = alltrue([for az in var.availability_zones : startswith(az, var.region)])
    error_message = "var.availability_zones must be zones of var.region (set both when changing region)."
  }
}

variable "single_nat_gateway" {
  description = "One NAT gateway for all zones instead of one per zone (cheaper, less available)."
  type        = bool
  default     = false
}

variable "public_access_cidrs" {
  description = "CIDRs allowed to reach the public API endpoint: the operators' and CI's egress addresses."
  type        = list(string)
}

variable "cluster_admin_arns" {
  description = "IAM roles or users that administer the cluster (EKS access entries with AmazonEKSClusterAdminPolicy)."
  type        = list(string)

  validation {
    condition     = length(var.cluster_admin_arns) > 0
    error_message = "var.cluster_admin_arns must name at least one IAM principal: the cluster has no other administrator."
  }
}

variable "access_entries" {
  description = "Further access entries: name -> IAM principal and EKS access policy, cluster-wide or for namespaces."
  type = map(object({
    principal_arn = string
    policy        = string
    namespaces    = optional(list(string), [])
  }))
  default = {}
}

variable "node_pools" {
  description = "The node pools without GPUs (EKS managed node groups), rendered from the pool catalog into pools.auto.tfvars.json by `rayplane render`. Do not edit by hand: change raycluster/data/pools.yaml and render."
  type = map(object({
    instance_types = list(string)
    capacity_type  = string
    ami_type       = string
    min_size       = number
    max_size       = number
    desired_size   = number
    disk_size_gib  = number
    labels         = map(string)
    taints = list(object({
      key    = string
      value  = string
      effect = string
    }))
  }))
}

variable "karpenter_pools" {
  description = "The GPU pools Karpenter provisions, rendered from the pool catalog into pools.auto.tfvars.json by `rayplane render` (their NodePools and EC2NodeClasses are in infra/k8s). Do not edit by hand."
  type = map(object({
    efa = bool
  }))
  default = {}
}

variable "karpenter_service_account" {
  description = "Service account (namespace/name) of the Karpenter controller that infra/helm/karpenter installs: the only one that may assume its IRSA role."
  type        = string
  default     = "karpenter/karpenter"

  validation {
    condition     = can(regex("^[a-z0-9-]+/[a-z0-9.-]+$", var.karpenter_service_account))
    error_message = "var.karpenter_service_account must be a namespace/name pair, such as karpenter/karpenter."
  }
}

variable "enable_network_policy" {
  description = "Enforce the rendered NetworkPolicies with the VPC CNI (enableNetworkPolicy of the vpc-cni add-on)."
  type        = bool
  default     = true
}

variable "bucket_name" {
  description = "Artifacts and model-registry bucket; null makes <cluster_name>-artifacts-<account id>."
  type        = string
  default     = null
}

variable "force_destroy_buckets" {
  description = "Let `terraform destroy` delete the buckets with their objects (test environments only)."
  type        = bool
  default     = false
}

variable "workload_identities" {
  description = "Kubernetes service accounts (namespace/name) per IRSA role that may use the artifacts bucket."
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
}

variable "secrets_manager_prefix" {
  description = "Prefix of the environment's secrets in Secrets Manager: secrets_manager_prefix of raycluster/environments/production.yaml. External Secrets reads below it only; Terraform writes the Redis AUTH token there."
  type        = string
  default     = "rayplane/production"

  validation {
    condition     = can(regex("^[A-Za-z0-9_+=.@-]+(/[A-Za-z0-9_+=.@-]+)*$", var.secrets_manager_prefix))
    error_message = "var.secrets_manager_prefix must be a Secrets Manager name prefix such as rayplane/production (no leading or trailing '/')."
  }
}

variable "ecr_repository_name" {
  description = "ECR repository of the rayplane Ray images (the last part of images.repository in the environment file)."
  type        = string
  default     = "rayplane"

  validation {
    condition     = can(regex("^[a-z0-9]+([._-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*$", var.ecr_repository_name))
    error_message = "var.ecr_repository_name must be a valid ECR repository name (lowercase letters, digits, '.', '_', '-', '/')."
  }
}

variable "external_secrets_service_accounts" {
  description = "Service accounts (namespace/name) that may assume the External Secrets IRSA role: the controller that infra/helm/external-secrets installs and the ClusterSecretStore names."
  type        = list(string)
  default     = ["external-secrets/external-secrets"]

  validation {
    condition     = alltrue([for sa in var.external_secrets_service_accounts : can(regex("^[a-z0-9-]+/[a-z0-9.-]+$", sa))])
    error_message = "var.external_secrets_service_accounts must hold namespace/name pairs, such as external-secrets/external-secrets."
  }
}

variable "load_balancer_controller_service_accounts" {
  description = "Service accounts (namespace/name) that may assume the AWS Load Balancer Controller's IRSA role: the controller that infra/helm/aws-load-balancer-controller installs (release in kube-system)."
  type        = list(string)
  default     = ["kube-system/aws-load-balancer-controller"]

  validation {
    condition     = alltrue([for sa in var.load_balancer_controller_service_accounts : can(regex("^[a-z0-9-]+/[a-z0-9.-]+$", sa))])
    error_message = "var.load_balancer_controller_service_accounts must hold namespace/name pairs, such as kube-system/aws-load-balancer-controller."
  }
}

variable "velero_service_accounts" {
  description = "Service accounts (namespace/name) that may assume the Velero IRSA role: the server account of the velero Helm release (velero-server in namespace velero)."
  type        = list(string)
  default     = ["velero/velero-server"]

  validation {
    condition     = alltrue([for sa in var.velero_service_accounts : can(regex("^[a-z0-9-]+/[a-z0-9.-]+$", sa))])
    error_message = "var.velero_service_accounts must hold namespace/name pairs, such as velero/velero-server."
  }
}

variable "redis_node_type" {
  description = "ElastiCache node type of the Ray GCS fault-tolerance Redis."
  type        = string
  default     = "cache.r7g.large"

  validation {
    condition     = startswith(var.redis_node_type, "cache.")
    error_message = "var.redis_node_type must be an ElastiCache node type such as cache.r7g.large."
  }
}

variable "mlflow_db_instance_class" {
  description = "RDS instance class of MLflow's PostgreSQL backend store."
  type        = string
  default     = "db.m7g.large"

  validation {
    condition     = startswith(var.mlflow_db_instance_class, "db.")
    error_message = "var.mlflow_db_instance_class must be an RDS instance class such as db.m7g.large."
  }
}

variable "mlflow_db_deletion_protection" {
  description = "Refuse to delete MLflow's database (runs, metrics, the model registry). Off only in test environments."
  type        = bool
  default     = true
}

variable "mlflow_db_skip_final_snapshot" {
  description = "Delete MLflow's database without a final snapshot (test environments only)."
  type        = bool
  default     = false
}

variable "secret_recovery_window_days" {
  description = "Days a deleted Secrets Manager secret made here (the Redis AUTH token) can be restored; 0 deletes at once (test environments only)."
  type        = number
  default     = 30

  validation {
    condition     = var.secret_recovery_window_days == 0 || (var.secret_recovery_window_days >= 7 && var.secret_recovery_window_days <= 30)
    error_message = "var.secret_recovery_window_days must be 0 or 7 to 30 (the Secrets Manager limits)."
  }
}

variable "enable_eks_addons" {
  description = "Manage the EKS add-ons (VPC CNI, kube-proxy, CoreDNS, EBS and EFS CSI drivers). Off only against an emulator without the add-on API (moto in tests)."
  type        = bool
  default     = true
}

variable "enable_access_entries" {
  description = "Create the EKS access entries. Off only against an emulator without the access-entry API (moto in tests)."
  type        = bool
  default     = true
}

variable "enable_backup_policies" {
  description = "Create the EBS snapshot policy and EFS backups. Off only against an emulator without Data Lifecycle Manager (moto in tests)."
  type        = bool
  default     = true
}

variable "enable_placement_groups" {
  description = "Create a cluster placement group per EFA pool. Off only against an emulator without the placement-group API (moto in tests)."
  type        = bool
  default     = true
}

variable "enable_gcs_redis" {
  description = "Create the ElastiCache Redis for Ray GCS fault tolerance. Off only against an emulator that cannot read a replication group back (moto in tests)."
  type        = bool
  default     = true
}

variable "tags" {
  description = "Tags on every resource (added to the environment's own)."
  type        = map(string)
  default     = {}
}
