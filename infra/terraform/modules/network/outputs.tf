output "vpc_id" {
  description = "VPC id."
  value       = aws_vpc.this.id
}

output "vpc_cidr" {
  description = "VPC CIDR."
  value       = aws_vpc.this.cidr_block
}

output "azs" {
  description = "Availability zones in use."
  value       = local.azs
}

output "private_subnet_ids" {
  description = "Private subnets (nodes, pods, EFS mount targets), in zone order."
  value       = [for az in local.azs : aws_subnet.private[az].id]
}

output "private_subnets_by_az" {
  description = "Private subnet id by availability zone (keys known at plan time, for for_each)."
  value       = { for az in local.azs : az => aws_subnet.private[az].id }
}

output "private_subnet_cidrs" {
  description = "CIDRs of the private subnets."
  value       = [for az in local.azs : aws_subnet.private[az].cidr_block]
}

output "public_subnet_ids" {
  description = "Public subnets (internet-facing load balancers), in zone order."
  value       = [for az in local.azs : aws_subnet.public[az].id]
}

output "nat_public_ips" {
  description = "Egress addresses of the nodes (for allow-lists elsewhere)."
  value       = [for az in local.nat_azs : aws_eip.nat[az].public_ip]
}

output "vpc_endpoint_ids" {
  description = "VPC endpoint id per AWS service (s3: the gateway endpoint; the others: interface endpoints with private DNS)."
  value = merge({ s3 = aws_vpc_endpoint.s3.id },
  { for service, endpoint in aws_vpc_endpoint.interface : service => endpoint.id })
}

output "vpc_endpoints_security_group_id" {
  description = "Security group of the interface endpoints (HTTPS from the VPC)."
  value       = aws_security_group.endpoints.id
}
