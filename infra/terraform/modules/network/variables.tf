variable "name" {
  description = "Cluster name: names the VPC and tags the subnets for the cluster's load balancers."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,37}[a-z0-9]$", var.name))
    error_message = "var.name must be 3-39 lowercase letters, digits or '-', starting with a letter."
  }
}

variable "cidr" {
  description = "IPv4 CIDR of the VPC; split into one private and one public subnet per availability zone."
  type        = string
  default     = "10.0.0.0/16"

  validation {
    condition     = can(cidrhost(var.cidr, 0)) && tonumber(split("/", var.cidr)[1]) <= 20
    error_message = "var.cidr must be an IPv4 CIDR of /20 or larger (the pods take VPC addresses through the VPC CNI)."
  }
}

variable "availability_zones" {
  description = "Availability zones (names) to spread the subnets, and so the nodes, NAT gateways and EFS mount targets, across. Named, not counted, so the set never changes when AWS adds a zone; pick zones that offer the pools' GPU instance types."
  type        = list(string)

  validation {
    condition     = length(var.availability_zones) >= 2 && length(var.availability_zones) <= 4 && length(distinct(var.availability_zones)) == length(var.availability_zones)
    error_message = "var.availability_zones must name 2 to 4 distinct zones: EKS needs subnets in at least two."
  }

  validation {
    condition     = alltrue([for az in var.availability_zones : can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9][a-z]$", az))])
    error_message = "var.availability_zones must hold zone names such as us-east-1a."
  }
}

variable "single_nat_gateway" {
  description = "One NAT gateway for all zones (cheaper; a zone outage cuts egress for every zone) instead of one per zone."
  type        = bool
  default     = false
}

variable "flow_log_retention_days" {
  description = "Days the VPC flow logs are kept in CloudWatch Logs."
  type        = number
  default     = 365

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.flow_log_retention_days)
    error_message = "var.flow_log_retention_days must be a retention CloudWatch Logs accepts (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288 or 3653)."
  }
}

variable "kms_key_arn" {
  description = "KMS key that encrypts the flow log group."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:kms:", var.kms_key_arn))
    error_message = "var.kms_key_arn must be a KMS key ARN (arn:aws:kms:...)."
  }
}

variable "tags" {
  description = "Tags for every resource of the module."
  type        = map(string)
  default     = {}
}

variable "interface_endpoints" {
  description = "AWS services that get an interface VPC endpoint with private DNS (the suffix of com.amazonaws.<region>.<service>): image pulls (ecr.api, ecr.dkr), IRSA (sts), External Secrets (secretsmanager) and log shipping (logs). S3 always gets a gateway endpoint."
  type        = list(string)
  default     = ["ecr.api", "ecr.dkr", "sts", "secretsmanager", "logs"]

  validation {
    condition     = alltrue([for s in var.interface_endpoints : can(regex("^[a-z0-9-]+(\\.[a-z0-9-]+)*$", s)) && s != "s3"])
    error_message = "var.interface_endpoints must hold service names such as ecr.api or sts (S3 has its gateway endpoint already)."
  }
}
