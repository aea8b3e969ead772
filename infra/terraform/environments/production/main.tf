# The production platform: composes the modules, nothing else. The node pools come from
# pools.auto.tfvars.json (rendered from the pool catalog by `rayplane render`): the pools
# without GPUs as managed node groups (node_pools), the GPU pools as what Karpenter needs from
# AWS to provision them (karpenter_pools).

provider "aws" {
  region = var.region

  default_tags {
    tags = local.tags
  }
}

locals {
  tags = merge(var.tags, {
    "rayplane.io/environment" = "production"
    "rayplane.io/cluster"     = var.cluster_name
    ManagedBy                 = "terraform"
  })
  admin_entries = {
    for arn in var.cluster_admin_arns : "admin-${element(split("/", arn), length(split("/", arn)) - 1)}" => {
      principal_arn = arn
      policy        = "AmazonEKSClusterAdminPolicy"
      namespaces    = []
    }
  }
}

module "security" {
  source = "../../modules/security"

  name = var.cluster_name
}

module "network" {
  source = "../../modules/network"

  name               = var.cluster_name
  cidr               = var.vpc_cidr
  availability_zones = var.availability_zones
  single_nat_gateway = var.single_nat_gateway
  kms_key_arn        = module.security.data_kms_key_arn
}

module "eks" {
  source = "../../modules/eks-cluster"

  name                  = var.cluster_name
  kubernetes_version    = var.kubernetes_version
  vpc_id                = module.network.vpc_id
  vpc_cidr              = module.network.vpc_cidr
  subnet_ids            = module.network.private_subnet_ids
  cluster_role_arn      = module.security.cluster_role_arn
  enable_network_policy = var.enable_network_policy
  secrets_kms_key_arn   = module.security.secrets_kms_key_arn
  logs_kms_key_arn      = module.security.data_kms_key_arn
  public_access_cidrs   = var.public_access_cidrs
  access_entries        = merge(local.admin_entries, var.access_entries)
  enable_access_entries = var.enable_access_entries
  enable_addons         = var.enable_eks_addons

  # The control plane must not start before its role can act.
  depends_on = [module.security]
}

module "storage" {
  source = "../../modules/storage"

  name                   = var.cluster_name
  vpc_id                 = module.network.vpc_id
  private_subnets_by_az  = module.network.private_subnets_by_az
  nfs_client_cidrs       = module.network.private_subnet_cidrs
  kms_key_arn            = module.security.data_kms_key_arn
  oidc_provider_arn      = module.eks.oidc_provider_arn
  oidc_issuer            = module.eks.oidc_issuer
  bucket_name            = var.bucket_name
  force_destroy          = var.force_destroy_buckets
  workload_identities    = var.workload_identities
  enable_backup_policies = var.enable_backup_policies
  # Velero's backup bucket and the Feast bucket log their access here too.
  access_log_source_bucket_arns = [module.platform.velero_bucket_arn, module.platform.feature_store_bucket_arn]
}

module "platform" {
  source = "../../modules/platform-services"

  name                   = var.cluster_name
  secrets_manager_prefix = var.secrets_manager_prefix
  vpc_id                 = module.network.vpc_id
  subnet_ids             = module.network.private_subnet_ids
  node_security_group_id = module.eks.cluster_security_group_id
  kms_key_arn            = module.security.data_kms_key_arn
  oidc_provider_arn      = module.eks.oidc_provider_arn
  oidc_issuer            = module.eks.oidc_issuer
  access_log_bucket      = module.storage.access_log_bucket_name
  force_destroy          = var.force_destroy_buckets

  ecr_repository_name                       = var.ecr_repository_name
  external_secrets_service_accounts         = var.external_secrets_service_accounts
  velero_service_accounts                   = var.velero_service_accounts
  load_balancer_controller_service_accounts = var.load_balancer_controller_service_accounts
  enable_redis                              = var.enable_gcs_redis
  redis_node_type                           = var.redis_node_type
  mlflow_db_instance_class                  = var.mlflow_db_instance_class
  mlflow_db_deletion_protection             = var.mlflow_db_deletion_protection
  mlflow_db_skip_final_snapshot             = var.mlflow_db_skip_final_snapshot
  secret_recovery_window_days               = var.secret_recovery_window_days
}

module "karpenter" {
  source = "../../modules/karpenter"

  cluster_name            = module.eks.name
  vpc_id                  = module.network.vpc_id
  node_security_group_id  = module.eks.cluster_security_group_id
  oidc_provider_arn       = module.eks.oidc_provider_arn
  oidc_issuer             = module.eks.oidc_issuer
  service_account         = var.karpenter_service_account
  pools                   = var.karpenter_pools
  enable_access_entry     = var.enable_access_entries
  enable_placement_groups = var.enable_placement_groups
}

module "node_pools" {
  source = "../../modules/node-pool"

  cluster_name            = module.eks.name
  kubernetes_version      = module.eks.version
  node_role_arn           = module.security.node_role_arn
  subnet_ids              = module.network.private_subnet_ids
  pools                   = var.node_pools
  root_volume_kms_key_arn = module.security.data_kms_key_arn
  enable_addons           = var.enable_eks_addons
  addons = {
    coredns              = {}
    "aws-ebs-csi-driver" = { service_account_role_arn = module.storage.ebs_csi_role_arn }
    "aws-efs-csi-driver" = { service_account_role_arn = module.storage.efs_csi_role_arn }
  }

  # Nodes join only once the node role's policies are attached and the VPC CNI add-on and
  # access entries exist; otherwise they never turn Ready.
  depends_on = [module.security, module.eks]
}
