variable "name" {
  description = "Cluster name; prefixes the keys' aliases and the IAM roles."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,37}[a-z0-9]$", var.name))
    error_message = "var.name must be 3-39 lowercase letters, digits or '-', starting with a letter (it prefixes IAM role names, which are limited to 64 characters)."
  }
}

variable "key_deletion_window_days" {
  description = "Days a scheduled KMS key deletion waits before the key is gone (7-30)."
  type        = number
  default     = 30

  validation {
    condition     = var.key_deletion_window_days >= 7 && var.key_deletion_window_days <= 30
    error_message = "var.key_deletion_window_days must be between 7 and 30 (the KMS limits)."
  }
}

variable "tags" {
  description = "Tags for every resource of the module."
  type        = map(string)
  default     = {}
}
