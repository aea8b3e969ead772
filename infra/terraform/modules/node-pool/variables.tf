variable "cluster_name" {
  description = "EKS cluster the node groups join."
  type        = string
}

variable "kubernetes_version" {
  description = "Kubernetes version of the nodes (the control plane's; nodes follow it on upgrade)."
  type        = string

  validation {
    condition     = can(regex("^1\\.[0-9]+$", var.kubernetes_version))
    error_message = "var.kubernetes_version must be a minor version such as \"1.33\"."
  }
}

variable "node_role_arn" {
  description = "IAM role of the nodes (security module)."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets the node groups place nodes in."
  type        = list(string)

  validation {
    condition     = length(var.subnet_ids) >= 1
    error_message = "var.subnet_ids must name at least one subnet."
  }
}

variable "pools" {
  description = "The node pools, one managed node group each, keyed by pool name. Generated from the pool catalog into pools.auto.tfvars.json by `rayplane render` (raycluster/terraform.py); never typed by hand."
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

  validation {
    condition     = length(var.pools) > 0
    error_message = "var.pools must hold at least one pool (run `rayplane render` to write pools.auto.tfvars.json)."
  }

  validation {
    condition     = alltrue([for name in keys(var.pools) : can(regex("^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$", name))])
    error_message = "var.pools keys must be pool names: DNS labels of lowercase letters, digits and '-'."
  }

  validation {
    condition     = alltrue([for p in values(var.pools) : length(p.instance_types) > 0])
    error_message = "var.pools[*].instance_types must name at least one instance type."
  }

  validation {
    condition     = alltrue([for p in values(var.pools) : contains(["ON_DEMAND", "SPOT"], p.capacity_type)])
    error_message = "var.pools[*].capacity_type must be ON_DEMAND or SPOT."
  }

  validation {
    condition     = alltrue([for p in values(var.pools) : contains(["AL2023_x86_64_STANDARD", "AL2023_x86_64_NVIDIA", "AL2023_ARM_64_STANDARD", "BOTTLEROCKET_x86_64", "BOTTLEROCKET_x86_64_NVIDIA"], p.ami_type)])
    error_message = "var.pools[*].ami_type must be one of AL2023_x86_64_STANDARD, AL2023_x86_64_NVIDIA, AL2023_ARM_64_STANDARD, BOTTLEROCKET_x86_64, BOTTLEROCKET_x86_64_NVIDIA."
  }

  validation {
    condition     = alltrue([for p in values(var.pools) : p.max_size >= 1 && p.min_size >= 0 && p.min_size <= p.desired_size && p.desired_size <= p.max_size])
    error_message = "var.pools[*] sizes must satisfy 0 <= min_size <= desired_size <= max_size and max_size >= 1."
  }

  validation {
    condition     = alltrue([for p in values(var.pools) : p.disk_size_gib >= 20 && p.disk_size_gib <= 16384])
    error_message = "var.pools[*].disk_size_gib must be 20 to 16384 (a gp3 volume)."
  }

  validation {
    condition     = alltrue(flatten([for p in values(var.pools) : [for t in p.taints : contains(["NO_SCHEDULE", "NO_EXECUTE", "PREFER_NO_SCHEDULE"], t.effect)]]))
    error_message = "var.pools[*].taints[*].effect must be NO_SCHEDULE, NO_EXECUTE or PREFER_NO_SCHEDULE (the EKS API's spelling)."
  }
}

variable "root_volume_kms_key_arn" {
  description = "KMS key that encrypts the nodes' root volumes; null takes the account's default EBS key."
  type        = string
  default     = null

  validation {
    condition     = var.root_volume_kms_key_arn == null || can(regex("^arn:aws[a-z-]*:kms:", var.root_volume_kms_key_arn))
    error_message = "var.root_volume_kms_key_arn must be null or a KMS key ARN."
  }
}

variable "metadata_hop_limit" {
  description = "IMDSv2 response hop limit. 1 keeps pods (which use IRSA) away from the node role's credentials; host-network pods still reach IMDS."
  type        = number
  default     = 1

  validation {
    condition     = var.metadata_hop_limit >= 1 && var.metadata_hop_limit <= 2
    error_message = "var.metadata_hop_limit must be 1 or 2."
  }
}

variable "max_unavailable_percentage" {
  description = "Share of a node group's nodes replaced at once during an update."
  type        = number
  default     = 33

  validation {
    condition     = var.max_unavailable_percentage >= 1 && var.max_unavailable_percentage <= 100
    error_message = "var.max_unavailable_percentage must be 1 to 100."
  }
}

variable "addons" {
  description = "EKS add-ons whose pods need running nodes before they turn healthy (CoreDNS, the CSI drivers), by name; created after the node groups. version null takes the default for the cluster version; service_account_role_arn is the add-on's IRSA role."
  type = map(object({
    version                  = optional(string)
    service_account_role_arn = optional(string)
  }))
  default = {
    coredns = {}
  }
}

variable "enable_addons" {
  description = "Manage the add-ons. Off only where the EKS add-on API is not available, such as the moto emulator in tests."
  type        = bool
  default     = true
}

variable "tags" {
  description = "Tags for every resource of the module."
  type        = map(string)
  default     = {}
}
