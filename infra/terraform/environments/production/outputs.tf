output "region" {
  description = "AWS region of the platform."
  value       = var.region
}

output "cluster_name" {
  description = "EKS cluster name."
  value       = module.eks.name
}

output "cluster_endpoint" {
  description = "Kubernetes API endpoint."
  value       = module.eks.endpoint
}

output "cluster_version" {
  description = "Kubernetes version of the control plane."
  value       = module.eks.version
}

output "oidc_provider_arn" {
  description = "IAM OIDC provider of the cluster (IRSA)."
  value       = module.eks.oidc_provider_arn
}

output "kubeconfig_command" {
  description = "Run this to point kubectl and helm at the cluster."
  value       = module.eks.kubeconfig_command
}

output "vpc_id" {
  description = "VPC of the cluster."
  value       = module.network.vpc_id
}

output "private_subnet_ids" {
  description = "Private subnets of the nodes."
  value       = module.network.private_subnet_ids
}

output "node_groups" {
  description = "Managed node group per catalog pool."
  value       = module.node_pools.node_groups
}

output "bucket_name" {
  description = "Artifacts and model-registry bucket (MLflow's artifact store)."
  value       = module.storage.bucket_name
}

output "efs_id" {
  description = "EFS file system for datasets, models and checkpoints."
  value       = module.storage.efs_id
}

output "efs_access_point_id" {
  description = "EFS access point at /rayplane."
  value       = module.storage.efs_access_point_id
}

output "workload_role_arns" {
  description = "IRSA role per workload (ray, mlflow): the eks.amazonaws.com/role-arn annotation of their service accounts."
  value       = module.storage.workload_role_arns
}

output "data_kms_key_arn" {
  description = "KMS key encrypting the bucket, EFS, EBS volumes and logs."
  value       = module.security.data_kms_key_arn
}

output "secrets_kms_key_arn" {
  description = "KMS key envelope-encrypting Kubernetes secrets."
  value       = module.security.secrets_kms_key_arn
}

output "storage_classes_manifest" {
  description = "StorageClasses (gp3 default, efs-shared) to kubectl apply once the cluster is up."
  value       = module.storage.storage_classes_manifest
}
