output "controller_role_arn" {
  description = "IRSA role of the Karpenter controller: the eks.amazonaws.com/role-arn annotation of its service account."
  value       = aws_iam_role.controller.arn
}

output "node_role_name" {
  description = "Role of the nodes Karpenter launches: spec.role of the EC2NodeClasses."
  value       = aws_iam_role.node.name
}

output "node_role_arn" {
  description = "ARN of the node role."
  value       = aws_iam_role.node.arn
}

output "node_instance_profile_name" {
  description = "Instance profile of the node role (for an EC2NodeClass that names spec.instanceProfile instead of spec.role)."
  value       = aws_iam_instance_profile.node.name
}

output "interruption_queue_name" {
  description = "SQS queue of the interruption events: settings.interruptionQueue of the Karpenter chart."
  value       = aws_sqs_queue.interruption.name
}

output "interruption_queue_arn" {
  description = "ARN of the interruption queue."
  value       = aws_sqs_queue.interruption.arn
}

output "discovery_tag" {
  description = "The tag (key = value) the EC2NodeClasses select the subnets and security groups by."
  value       = { "karpenter.sh/discovery" = var.cluster_name }
}

output "efa_security_group_id" {
  description = "Security group admitting EFA traffic between the EFA pools' nodes (null without an efa pool)."
  value       = one(aws_security_group.efa[*].id)
}

output "placement_group_names" {
  description = "Cluster placement group per EFA pool: spec.placementGroupSelector.name of the pool's EC2NodeClass."
  value       = { for pool, group in aws_placement_group.efa : pool => group.name }
}
