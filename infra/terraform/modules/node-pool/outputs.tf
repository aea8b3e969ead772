output "node_groups" {
  description = "Node group of each pool: ARN, status and launch template."
  value = {
    for name, ng in aws_eks_node_group.pool : name => {
      arn                = ng.arn
      status             = ng.status
      launch_template_id = aws_launch_template.pool[name].id
    }
  }
}

output "node_group_names" {
  description = "Names of the node groups (the pool names)."
  value       = sort(keys(aws_eks_node_group.pool))
}
