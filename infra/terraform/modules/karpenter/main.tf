# What Karpenter needs from AWS to provision the GPU pools (the NodePools and EC2NodeClasses are
# rendered into infra/k8s from the catalog): the role its nodes run as (with an instance
# profile and an EKS access entry, so they can join), the discovery tag on the node security
# group, and for EFA pools a security group and a cluster placement group each. The
# controller's own IRSA role is in controller.tf, the interruption queue in interruption.tf.

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}
data "aws_region" "current" {}

locals {
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition
  region     = data.aws_region.current.name
  # The tag the EC2NodeClasses select subnets and security groups by (the network module puts
  # it on the private subnets).
  discovery_tag = { "karpenter.sh/discovery" = var.cluster_name }
  efa_pools     = sort([for name, pool in var.pools : name if pool.efa])
}

# -- the nodes' role ---------------------------------------------------------------------------

data "aws_iam_policy_document" "node_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

# The EC2NodeClasses name this role (spec.role); Karpenter makes and tags an instance profile
# per EC2NodeClass from it. Workloads get AWS permissions through IRSA, never through it.
resource "aws_iam_role" "node" {
  name               = "${var.cluster_name}-karpenter-node"
  description        = "Nodes Karpenter launches for the GPU pools of ${var.cluster_name}"
  assume_role_policy = data.aws_iam_policy_document.node_assume.json
  tags               = var.tags
}

# What the official Karpenter v1.14 setup attaches: kubelet, VPC CNI, image pulls (pull only),
# SSM instead of SSH.
resource "aws_iam_role_policy_attachment" "node" {
  for_each = toset([
    "AmazonEKSWorkerNodePolicy",
    "AmazonEKS_CNI_Policy",
    "AmazonEC2ContainerRegistryPullOnly",
    "AmazonSSMManagedInstanceCore",
  ])

  role       = aws_iam_role.node.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/${each.value}"
}

# For an EC2NodeClass that names spec.instanceProfile instead of spec.role.
resource "aws_iam_instance_profile" "node" {
  name = "${var.cluster_name}-karpenter-node"
  role = aws_iam_role.node.name
  tags = var.tags
}

# Nodes authenticate to the API server with the role; an EC2_LINUX entry maps it to the
# system:nodes group (the cluster has no aws-auth ConfigMap: authentication_mode API).
resource "aws_eks_access_entry" "node" {
  count = var.enable_access_entry ? 1 : 0

  cluster_name  = var.cluster_name
  principal_arn = aws_iam_role.node.arn
  type          = "EC2_LINUX"
  tags          = var.tags
}

# -- discovery and EFA -------------------------------------------------------------------------

# The node security group (the cluster security group EKS makes: the one Redis and PostgreSQL
# admit) is not Terraform's own resource, so its discovery tag is set on its own.
resource "aws_ec2_tag" "node_security_group" {
  resource_id = var.node_security_group_id
  key         = "karpenter.sh/discovery"
  value       = var.cluster_name
}

# EFA wants a security group that admits all traffic from and to itself, both rules naming the
# group (AWS's EFA setup); the cluster security group has the ingress one but only a CIDR egress
# rule, and is EKS's to manage. This group carries the discovery tag, so the EC2NodeClasses' one
# selector term attaches it beside the cluster security group.
resource "aws_security_group" "efa" {
  #checkov:skip=CKV2_AWS_5:Karpenter attaches this group to the nodes it launches (the EC2NodeClasses select it by its karpenter.sh/discovery tag); no Terraform resource names it.
  count = length(local.efa_pools) > 0 ? 1 : 0

  name_prefix = "${var.cluster_name}-efa-"
  description = "EFA traffic between the nodes of the ${var.cluster_name} EFA pools"
  vpc_id      = var.vpc_id
  tags        = merge(var.tags, local.discovery_tag, { Name = "${var.cluster_name}-efa" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "efa_from_itself" {
  count = length(local.efa_pools) > 0 ? 1 : 0

  security_group_id            = aws_security_group.efa[0].id
  description                  = "All traffic from EFA nodes (EFA needs every protocol)"
  referenced_security_group_id = aws_security_group.efa[0].id
  ip_protocol                  = "-1"
}

resource "aws_vpc_security_group_egress_rule" "efa_to_itself" {
  count = length(local.efa_pools) > 0 ? 1 : 0

  security_group_id            = aws_security_group.efa[0].id
  description                  = "All traffic to EFA nodes (EFA needs every protocol)"
  referenced_security_group_id = aws_security_group.efa[0].id
  ip_protocol                  = "-1"
}

# One cluster placement group per EFA pool: its nodes land on one network spine, which is what
# EFA's collective bandwidth assumes. The pool's EC2NodeClass selects it by name
# (spec.placementGroupSelector.name). A cluster placement group lives in one availability
# zone: the first node fixes it, and a zone without capacity leaves the pool Pending.
resource "aws_placement_group" "efa" {
  for_each = var.enable_placement_groups ? toset(local.efa_pools) : toset([])

  name     = "${var.cluster_name}-${each.key}"
  strategy = "cluster"
  tags     = merge(var.tags, { "rayplane.io/pool" = each.key })
}
