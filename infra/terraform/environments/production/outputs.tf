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
  description = "Managed node group per catalog pool without GPUs (the GPU pools are Karpenter's)."
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

output "ecr_repository_url" {
  description = "Repository of the Ray images: images.repository of raycluster/environments/production.yaml."
  value       = module.platform.ecr_repository_url
}

output "external_secrets_role_arn" {
  description = "IRSA role of External Secrets: serviceAccount.annotations in infra/helm/external-secrets/values.yaml."
  value       = module.platform.external_secrets_role_arn
}

output "velero_role_arn" {
  description = "IRSA role of Velero: serviceAccount.server.annotations in infra/helm/velero/values.yaml."
  value       = module.platform.velero_role_arn
}

output "load_balancer_controller_role_arn" {
  description = "IRSA role of the AWS Load Balancer Controller: serviceAccount.annotations in infra/helm/aws-load-balancer-controller/values.yaml."
  value       = module.platform.load_balancer_controller_role_arn
}

output "velero_bucket_name" {
  description = "Velero's backup bucket: configuration.backupStorageLocation[0].bucket in infra/helm/velero/values.yaml."
  value       = module.platform.velero_bucket_name
}

output "redis_address" {
  description = "host:port of the GCS fault-tolerance Redis (TLS only): redis_address of the environment, as rediss://<this>."
  value       = module.platform.redis_address
}

output "redis_auth_secret_name" {
  description = "Secrets Manager secret with the Redis AUTH token (made by Terraform; the rendered ExternalSecret rayplane-redis reads it)."
  value       = module.platform.redis_auth_secret_name
}

output "mlflow_db_address" {
  description = "Host of MLflow's PostgreSQL: backendStore.postgres.host in infra/helm/mlflow/values.yaml."
  value       = module.platform.mlflow_db_address
}

output "mlflow_db_port" {
  description = "Port of MLflow's PostgreSQL."
  value       = module.platform.mlflow_db_port
}

output "mlflow_db_name" {
  description = "Database of MLflow's PostgreSQL, where the agents' threads live too: agents[].database.database in raycluster/environments/production.yaml."
  value       = module.platform.mlflow_db_name
}

output "mlflow_db_secret_arn" {
  description = "RDS-managed secret (JSON username/password) of MLflow's database: the remoteRef key of the mlflow-db ExternalSecret."
  value       = module.platform.mlflow_db_secret_arn
}

output "node_security_group_id" {
  description = "Security group of the nodes (the EKS cluster security group): the only source Redis and PostgreSQL admit; admit it in further services the pods reach."
  value       = module.eks.cluster_security_group_id
}

output "karpenter_controller_role_arn" {
  description = "IRSA role of the Karpenter controller: serviceAccount.annotations of infra/helm/karpenter's values."
  value       = module.karpenter.controller_role_arn
}

output "karpenter_node_role_name" {
  description = "Role of the nodes Karpenter launches: spec.role of the rendered EC2NodeClasses."
  value       = module.karpenter.node_role_name
}

output "karpenter_node_instance_profile_name" {
  description = "Instance profile of the Karpenter node role (for an EC2NodeClass naming spec.instanceProfile)."
  value       = module.karpenter.node_instance_profile_name
}

output "karpenter_interruption_queue_name" {
  description = "Karpenter's interruption queue: settings.interruptionQueue of infra/helm/karpenter's values."
  value       = module.karpenter.interruption_queue_name
}

output "karpenter_discovery_tag" {
  description = "The tag the EC2NodeClasses select subnets and security groups by."
  value       = module.karpenter.discovery_tag
}

output "efa_security_group_id" {
  description = "Security group for EFA traffic between the EFA pools' nodes (selected by the discovery tag)."
  value       = module.karpenter.efa_security_group_id
}

output "placement_group_names" {
  description = "Cluster placement group per EFA pool: spec.placementGroupSelector.name of its EC2NodeClass."
  value       = module.karpenter.placement_group_names
}

output "vpc_endpoint_ids" {
  description = "VPC endpoint per AWS service: S3 (gateway), ECR API and registry, STS, Secrets Manager, CloudWatch Logs (interface, private DNS)."
  value       = module.network.vpc_endpoint_ids
}

output "feature_store_bucket_name" {
  description = "Feast's registry and offline-store bucket: feature_store.bucket of raycluster/environments/production.yaml."
  value       = module.platform.feature_store_bucket_name
}

output "feature_store_role_arn" {
  description = "IRSA role of the feature-store service account: feature_store.role_arn of the environment."
  value       = module.platform.feature_store_role_arn
}

output "feature_store_db_name" {
  description = "Database and login of Feast's online store on the MLflow instance: feature_store.database.database of the environment."
  value       = module.platform.feature_store_db_name
}

output "feature_store_db_secret_name" {
  description = "Secrets Manager secret of the online store's login: feature_store.database.secret of the environment."
  value       = module.platform.feature_store_db_secret_name
}
