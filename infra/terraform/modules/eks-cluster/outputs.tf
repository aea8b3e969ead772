output "name" {
  description = "Cluster name."
  value       = aws_eks_cluster.this.name
}

output "arn" {
  description = "Cluster ARN."
  value       = aws_eks_cluster.this.arn
}

output "version" {
  description = "Kubernetes version of the control plane."
  value       = aws_eks_cluster.this.version
}

output "endpoint" {
  description = "API server endpoint."
  value       = aws_eks_cluster.this.endpoint
}

output "certificate_authority_data" {
  description = "Base64 CA certificate of the API server."
  value       = aws_eks_cluster.this.certificate_authority[0].data
}

output "oidc_provider_arn" {
  description = "ARN of the IAM OIDC provider (IRSA trust policies name it as the federated principal)."
  value       = aws_iam_openid_connect_provider.this.arn
}

output "oidc_issuer" {
  description = "OIDC issuer without the scheme, as IRSA trust-policy condition keys spell it (oidc.eks.<region>.amazonaws.com/id/<id>)."
  value       = replace(aws_eks_cluster.this.identity[0].oidc[0].issuer, "https://", "")
}

output "security_group_id" {
  description = "The extra security group of the control plane ENIs."
  value       = aws_security_group.cluster.id
}

output "kubeconfig_command" {
  description = "Command that writes a kubeconfig entry for the cluster."
  value       = "aws eks update-kubeconfig --region ${data.aws_region.current.name} --name ${aws_eks_cluster.this.name}"
}

output "cluster_security_group_id" {
  description = "The security group EKS creates for the cluster and attaches to managed node groups' nodes (their launch templates name none): the node security group that other services admit."
  value       = aws_eks_cluster.this.vpc_config[0].cluster_security_group_id
}
