# One EKS managed node group per pool of the catalog that has no GPUs (the system pool the
# heads, MLOps tools and Karpenter itself run on; Karpenter provisions the GPU pools). The pools
# arrive as one typed map (pools.auto.tfvars.json, rendered by `rayplane render`), so a new such
# pool in the catalog is a new node group here without touching Terraform.

resource "aws_launch_template" "pool" {
  for_each = var.pools

  name_prefix            = "${var.cluster_name}-${each.key}-"
  description            = "Nodes of pool ${each.key} of ${var.cluster_name}"
  update_default_version = true

  # Managed node groups take the disk size from the launch template when one is given:
  # an encrypted gp3 root volume of the pool's size.
  block_device_mappings {
    device_name = "/dev/xvda"
    ebs {
      volume_size           = each.value.disk_size_gib
      volume_type           = "gp3"
      iops                  = 3000
      throughput            = 125
      encrypted             = true
      kms_key_id            = var.root_volume_kms_key_arn
      delete_on_termination = true
    }
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required" # IMDSv2 only
    http_put_response_hop_limit = var.metadata_hop_limit
    instance_metadata_tags      = "disabled"
  }

  monitoring {
    enabled = true
  }

  tag_specifications {
    resource_type = "instance"
    tags          = merge(var.tags, { Name = "${var.cluster_name}-${each.key}", "rayplane.io/pool" = each.key })
  }

  tag_specifications {
    resource_type = "volume"
    tags          = merge(var.tags, { Name = "${var.cluster_name}-${each.key}-root", "rayplane.io/pool" = each.key })
  }

  tags = merge(var.tags, { "rayplane.io/pool" = each.key })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_eks_node_group" "pool" {
  for_each = var.pools

  cluster_name    = var.cluster_name
  node_group_name = each.key
  node_role_arn   = var.node_role_arn
  subnet_ids      = var.subnet_ids
  version         = var.kubernetes_version

  instance_types = each.value.instance_types
  capacity_type  = each.value.capacity_type
  ami_type       = each.value.ami_type

  scaling_config {
    min_size     = each.value.min_size
    max_size     = each.value.max_size
    desired_size = each.value.desired_size
  }

  update_config {
    max_unavailable_percentage = var.max_unavailable_percentage
  }

  launch_template {
    id      = aws_launch_template.pool[each.key].id
    version = aws_launch_template.pool[each.key].latest_version
  }

  # rayplane.io/pool plus the GPU Operator labels (nvidia.com/device-plugin.config for
  # time-slicing, nvidia.com/mig.config for MIG) that choose how each node's GPUs are shared.
  labels = each.value.labels

  dynamic "taint" {
    for_each = each.value.taints
    content {
      key    = taint.value.key
      value  = taint.value.value
      effect = taint.value.effect
    }
  }

  tags = merge(var.tags, { "rayplane.io/pool" = each.key })

  lifecycle {
    # desired_size is the starting size; a group resized by hand (aws eks
    # update-nodegroup-config) is not set back by the next apply. Terraform owns the bounds.
    ignore_changes = [scaling_config[0].desired_size]
  }
}

resource "aws_eks_addon" "after_nodes" {
  for_each = var.enable_addons ? var.addons : {}

  cluster_name                = var.cluster_name
  addon_name                  = each.key
  addon_version               = each.value.version
  service_account_role_arn    = each.value.service_account_role_arn
  resolve_conflicts_on_create = "OVERWRITE"
  resolve_conflicts_on_update = "PRESERVE"
  tags                        = var.tags

  depends_on = [aws_eks_node_group.pool]
}
