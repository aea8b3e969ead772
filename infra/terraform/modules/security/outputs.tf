output "secrets_kms_key_arn" {
  description = "KMS key that envelope-encrypts Kubernetes secrets."
  value       = aws_kms_key.secrets.arn
}

output "data_kms_key_arn" {
  description = "KMS key for data at rest: the artifacts bucket, EFS, EBS volumes, log groups."
  value       = aws_kms_key.data.arn
}

output "data_kms_key_id" {
  description = "Id of the data key (the StorageClass parameters take the ARN, some APIs the id)."
  value       = aws_kms_key.data.key_id
}

output "cluster_role_arn" {
  description = "IAM role of the EKS control plane."
  value       = aws_iam_role.cluster.arn
}

output "node_role_arn" {
  description = "IAM role of the managed node groups' instances."
  value       = aws_iam_role.node.arn
}

output "node_role_name" {
  description = "Name of the node role."
  value       = aws_iam_role.node.name
}

output "policy_attachments" {
  description = "Managed policies attached to the cluster and node roles (for depends_on: nodes must not start before their role can act)."
  value       = concat([for a in aws_iam_role_policy_attachment.cluster : a.id], [for a in aws_iam_role_policy_attachment.node : a.id])
}
