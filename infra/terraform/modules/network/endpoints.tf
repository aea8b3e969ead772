# VPC endpoints: image pulls, checkpoints and datasets, IRSA token exchanges, secrets and logs
# stay on the AWS network instead of going through the NAT gateways (multi-GB images and
# checkpoints would otherwise pay NAT processing per GB and share its bandwidth).

data "aws_region" "current" {}

# S3 is a gateway endpoint: a route in each private route table, free of charge. ECR keeps the
# image layers in S3, so image pulls take it too.
resource "aws_vpc_endpoint" "s3" {
  vpc_id            = aws_vpc.this.id
  service_name      = "com.amazonaws.${data.aws_region.current.name}.s3"
  vpc_endpoint_type = "Gateway"
  route_table_ids   = [for az in local.azs : aws_route_table.private[az].id]
  tags              = merge(var.tags, { Name = "${var.name}-s3" })
}

resource "aws_security_group" "endpoints" {
  name_prefix = "${var.name}-vpc-endpoints-"
  description = "HTTPS to the ${var.name} interface VPC endpoints from inside the VPC"
  vpc_id      = aws_vpc.this.id
  tags        = merge(var.tags, { Name = "${var.name}-vpc-endpoints" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "endpoints_https" {
  security_group_id = aws_security_group.endpoints.id
  description       = "HTTPS to the AWS APIs from nodes and pods in the VPC"
  cidr_ipv4         = var.cidr
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}

# Interface endpoints, one network interface per private subnet (zone). Private DNS makes the
# services' public names resolve to them inside the VPC, so nothing needs configuring.
resource "aws_vpc_endpoint" "interface" {
  for_each = toset(var.interface_endpoints)

  vpc_id              = aws_vpc.this.id
  service_name        = "com.amazonaws.${data.aws_region.current.name}.${each.key}"
  vpc_endpoint_type   = "Interface"
  subnet_ids          = [for az in local.azs : aws_subnet.private[az].id]
  security_group_ids  = [aws_security_group.endpoints.id]
  private_dns_enabled = true
  tags                = merge(var.tags, { Name = "${var.name}-${each.key}" })
}
