output "ecr_repository_url" {
  description = "Repository of the rayplane Ray images: images.repository of the environment (push the tags it pins)."
  value       = aws_ecr_repository.images.repository_url
}

output "ecr_repository_arn" {
  description = "ARN of the image repository."
  value       = aws_ecr_repository.images.arn
}

output "external_secrets_role_arn" {
  description = "IRSA role of External Secrets: the eks.amazonaws.com/role-arn annotation in infra/helm/external-secrets/values.yaml."
  value       = aws_iam_role.external_secrets.arn
}

output "velero_role_arn" {
  description = "IRSA role of Velero: serviceAccount.server annotation in infra/helm/velero/values.yaml."
  value       = aws_iam_role.velero.arn
}

output "velero_bucket_name" {
  description = "Velero's backup bucket: configuration.backupStorageLocation[0].bucket in infra/helm/velero/values.yaml."
  value       = aws_s3_bucket.velero.id
}

output "velero_bucket_arn" {
  description = "ARN of Velero's backup bucket (the access-log bucket admits it as a log source)."
  value       = aws_s3_bucket.velero.arn
}

output "redis_address" {
  description = "host:port of the GCS fault-tolerance Redis primary (TLS only: Ray connects with rediss://<this>); null with enable_redis off."
  value       = var.enable_redis ? "${aws_elasticache_replication_group.gcs[0].primary_endpoint_address}:${aws_elasticache_replication_group.gcs[0].port}" : null
}

output "redis_auth_secret_name" {
  description = "Secrets Manager secret holding the Redis AUTH token (the rendered ExternalSecret rayplane-redis reads it)."
  value       = aws_secretsmanager_secret.redis_auth.name
}

output "redis_auth_secret_arn" {
  description = "ARN of the Redis AUTH token secret."
  value       = aws_secretsmanager_secret.redis_auth.arn
}

output "redis_security_group_id" {
  description = "Security group of the Redis nodes (ingress from the node security group only)."
  value       = aws_security_group.redis.id
}

output "mlflow_db_address" {
  description = "Host name of MLflow's PostgreSQL: backendStore.postgres.host in infra/helm/mlflow/values.yaml."
  value       = aws_db_instance.mlflow.address
}

output "mlflow_db_port" {
  description = "Port of MLflow's PostgreSQL."
  value       = aws_db_instance.mlflow.port
}

output "mlflow_db_name" {
  description = "Database of MLflow's backend store."
  value       = aws_db_instance.mlflow.db_name
}

output "mlflow_db_secret_arn" {
  description = "Secrets Manager secret that RDS manages for MLflow's database (JSON keys username, password): the remoteRef key of the mlflow-db ExternalSecret."
  value       = aws_db_instance.mlflow.master_user_secret[0].secret_arn
}

output "mlflow_db_security_group_id" {
  description = "Security group of MLflow's PostgreSQL (ingress from the node security group only)."
  value       = aws_security_group.mlflow_db.id
}

output "load_balancer_controller_role_arn" {
  description = "IRSA role of the AWS Load Balancer Controller: serviceAccount.annotations in infra/helm/aws-load-balancer-controller/values.yaml."
  value       = aws_iam_role.load_balancer_controller.arn
}

output "feature_store_bucket_name" {
  description = "Bucket of Feast's registry, offline data and staging (s3://<this>/features/...): feature_store.bucket of the environment."
  value       = aws_s3_bucket.feast.id
}

output "feature_store_bucket_arn" {
  description = "ARN of the Feast bucket (the access-log bucket admits it as a log source)."
  value       = aws_s3_bucket.feast.arn
}

output "feature_store_role_arn" {
  description = "IRSA role of the feature-store service account: feature_store.role_arn of the environment."
  value       = aws_iam_role.feature_store.arn
}

output "feature_store_db_name" {
  description = "Database (and login role) of Feast's online store on the MLflow instance (mlflow_db_address)."
  value       = var.feature_store_db_name
}

output "feature_store_db_secret_name" {
  description = "Secrets Manager secret with the online store's login (JSON username, password): the ExternalSecret feast-online-store reads it."
  value       = aws_secretsmanager_secret.feast_db.name
}
