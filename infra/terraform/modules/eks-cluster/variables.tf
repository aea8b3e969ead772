variable "name" {
  description = "EKS cluster name."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,37}[a-z0-9]$", var.name))
    error_message = "var.name must be 3-39 lowercase letters, digits or '-', starting with a letter."
  }
}

variable "kubernetes_version" {
  description = "Kubernetes minor version of the control plane, pinned (upgrade deliberately, one minor at a time)."
  type        = string

  validation {
    condition     = can(regex("^1\\.(2[89]|3[0-9])$", var.kubernetes_version))
    error_message = "var.kubernetes_version must be a minor version such as \"1.33\" (1.28 or newer)."
  }
}

variable "vpc_id" {
  description = "VPC of the cluster."
  type        = string
}

variable "vpc_cidr" {
  description = "VPC CIDR: the API's private endpoint accepts HTTPS from it."
  type        = string

  validation {
    condition     = can(cidrhost(var.vpc_cidr, 0))
    error_message = "var.vpc_cidr must be an IPv4 CIDR."
  }
}

variable "subnet_ids" {
  description = "Private subnets for the control plane's network interfaces (at least two zones)."
  type        = list(string)

  validation {
    condition     = length(var.subnet_ids) >= 2
    error_message = "var.subnet_ids must name at least two subnets (EKS needs two availability zones)."
  }
}

variable "cluster_role_arn" {
  description = "IAM role of the control plane (security module)."
  type        = string
}

variable "secrets_kms_key_arn" {
  description = "KMS key that envelope-encrypts Kubernetes secrets."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:kms:", var.secrets_kms_key_arn))
    error_message = "var.secrets_kms_key_arn must be a KMS key ARN (arn:aws:kms:...)."
  }
}

variable "logs_kms_key_arn" {
  description = "KMS key that encrypts the control-plane log group."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:kms:", var.logs_kms_key_arn))
    error_message = "var.logs_kms_key_arn must be a KMS key ARN (arn:aws:kms:...)."
  }
}

variable "endpoint_public_access" {
  description = "Expose the API server publicly as well, to the CIDRs in public_access_cidrs only. The private endpoint is always on."
  type        = bool
  default     = true
}

variable "public_access_cidrs" {
  description = "CIDRs allowed to reach the public API endpoint (operators' and CI egress addresses)."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.public_access_cidrs : can(cidrhost(c, 0)) && c != "0.0.0.0/0"])
    error_message = "var.public_access_cidrs must hold IPv4 CIDRs and not 0.0.0.0/0 (the public endpoint is allow-listed)."
  }

  validation {
    condition     = !var.endpoint_public_access || length(var.public_access_cidrs) > 0
    error_message = "var.public_access_cidrs must name at least one CIDR when var.endpoint_public_access is true."
  }
}

variable "log_types" {
  description = "Control-plane logs sent to CloudWatch."
  type        = list(string)
  default     = ["api", "audit", "authenticator", "controllerManager", "scheduler"]

  validation {
    condition     = alltrue([for t in var.log_types : contains(["api", "audit", "authenticator", "controllerManager", "scheduler"], t)])
    error_message = "var.log_types may hold only api, audit, authenticator, controllerManager and scheduler."
  }
}

variable "log_retention_days" {
  description = "Days the control-plane logs are kept."
  type        = number
  default     = 365

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.log_retention_days)
    error_message = "var.log_retention_days must be a retention CloudWatch Logs accepts (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288 or 3653)."
  }
}

variable "access_entries" {
  description = "Who may use the cluster: IAM principal ARN -> EKS access policy, cluster-wide or limited to namespaces."
  type = map(object({
    principal_arn = string
    policy        = string
    namespaces    = optional(list(string), [])
  }))
  default = {}

  validation {
    condition     = alltrue([for e in values(var.access_entries) : contains(["AmazonEKSClusterAdminPolicy", "AmazonEKSAdminPolicy", "AmazonEKSEditPolicy", "AmazonEKSViewPolicy"], e.policy)])
    error_message = "var.access_entries[*].policy must be one of AmazonEKSClusterAdminPolicy, AmazonEKSAdminPolicy, AmazonEKSEditPolicy, AmazonEKSViewPolicy."
  }

  validation {
    condition     = alltrue([for e in values(var.access_entries) : can(regex("^arn:aws[a-z-]*:iam::[0-9]{12}:(role|user)/", e.principal_arn))])
    error_message = "var.access_entries[*].principal_arn must be an IAM role or user ARN."
  }
}

variable "enable_access_entries" {
  description = "Create the access entries (EKS access API). Off only where the API is not available, such as the moto emulator in tests."
  type        = bool
  default     = true
}

variable "addons" {
  description = "EKS add-ons the nodes need before they can become Ready (VPC CNI, kube-proxy), by name; version null takes the default for the cluster version; configuration_values is the add-on's JSON configuration (the VPC CNI's enableNetworkPolicy comes from var.enable_network_policy)."
  type = map(object({
    version              = optional(string)
    configuration_values = optional(string)
  }))
  default = {
    "vpc-cni"    = {}
    "kube-proxy" = {}
  }
}

variable "enable_network_policy" {
  description = "Enforce Kubernetes NetworkPolicies with the VPC CNI (its enableNetworkPolicy setting). Off leaves every NetworkPolicy on paper."
  type        = bool
  default     = true
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
