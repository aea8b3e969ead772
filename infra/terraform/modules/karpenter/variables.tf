variable "cluster_name" {
  description = "EKS cluster name: prefixes the roles, the queue and the placement groups, and is the value of the karpenter.sh/discovery tag."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,37}[a-z0-9]$", var.cluster_name))
    error_message = "var.cluster_name must be 3-39 lowercase letters, digits or '-', starting with a letter."
  }
}

variable "vpc_id" {
  description = "VPC of the cluster (the EFA security group lives there)."
  type        = string
}

variable "node_security_group_id" {
  description = "Security group of the nodes (the EKS cluster security group): tagged for Karpenter's discovery."
  type        = string
}

variable "oidc_provider_arn" {
  description = "IAM OIDC provider of the cluster (eks-cluster module): the federated principal of the controller's IRSA role."
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

variable "service_account" {
  description = "Service account (namespace/name) the Karpenter controller runs as: the only one that may assume its IRSA role."
  type        = string
  default     = "karpenter/karpenter"

  validation {
    condition     = can(regex("^[a-z0-9-]+/[a-z0-9.-]+$", var.service_account))
    error_message = "var.service_account must be a namespace/name pair, such as karpenter/karpenter."
  }
}

variable "pools" {
  description = "The pools Karpenter provisions (the catalog's GPU pools), keyed by pool name: pools.auto.tfvars.json's karpenter_pools, rendered by `rayplane render`. An efa pool gets a cluster placement group and the EFA security group."
  type = map(object({
    efa = bool
  }))
  default = {}

  validation {
    condition     = alltrue([for name in keys(var.pools) : can(regex("^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$", name))])
    error_message = "var.pools keys must be pool names: DNS labels of lowercase letters, digits and '-'."
  }
}

variable "enable_access_entry" {
  description = "Create the EC2_LINUX access entry of the node role. Off only where the EKS access-entry API is not available, such as the moto emulator in tests."
  type        = bool
  default     = true
}

variable "enable_placement_groups" {
  description = "Create the EFA pools' cluster placement groups. Off only where the placement-group API is not available, such as the moto emulator in tests."
  type        = bool
  default     = true
}

variable "tags" {
  description = "Tags for every resource of the module."
  type        = map(string)
  default     = {}
}
