output "bucket_name" {
  description = "Artifacts and model-registry bucket (MLflow --artifacts-destination s3://<bucket>/mlflow)."
  value       = aws_s3_bucket.artifacts.id
}

output "bucket_arn" {
  description = "ARN of the artifacts bucket."
  value       = aws_s3_bucket.artifacts.arn
}

output "access_log_bucket_name" {
  description = "Bucket holding the server access logs of the artifacts bucket (and of var.access_log_source_bucket_arns)."
  value       = aws_s3_bucket.access_logs.id

  # Log delivery is checked against the bucket policy: targets wait for it.
  depends_on = [aws_s3_bucket_policy.access_logs]
}

output "efs_id" {
  description = "EFS file system for datasets, models and checkpoints."
  value       = aws_efs_file_system.shared.id
}

output "efs_access_point_id" {
  description = "EFS access point at /rayplane (uid/gid of Ray's images): volumeHandle <efs_id>::<access point> of a static PersistentVolume."
  value       = aws_efs_access_point.shared.id
}

output "workload_role_arns" {
  description = "IRSA role ARN per workload identity: annotate its service accounts with eks.amazonaws.com/role-arn."
  value       = { for k, r in aws_iam_role.workload : k => r.arn }
}

output "ebs_csi_role_arn" {
  description = "IRSA role of the EBS CSI controller."
  value       = aws_iam_role.ebs_csi.arn
}

output "efs_csi_role_arn" {
  description = "IRSA role of the EFS CSI driver."
  value       = aws_iam_role.efs_csi.arn
}

output "storage_classes_manifest" {
  description = "The gp3 (default) and efs-shared StorageClasses as a multi-document YAML for kubectl apply."
  value       = join("---\n", [for sc in local.storage_classes : yamlencode(sc)])
}
