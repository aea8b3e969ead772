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
  description = "The node pools, rendered from the pool catalog into pools.auto.tfvars.json by `rayplane render`. Do not edit by hand: change raycluster/data/pools.yaml and render."
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

variable "tags" {
  description = "Tags on every resource (added to the environment's own)."
  type        = map(string)
  default     = {}
}
