terraform {
  required_version = ">= 1.10"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.95, < 6.0"
    }
  }

  # State in S3 with S3-native locking (use_lockfile). Partial configuration: the state bucket
  # is per account, so `terraform init -backend-config=backend.hcl` supplies it
  # (docs/deployment.md, "State").
  backend "s3" {}
}
