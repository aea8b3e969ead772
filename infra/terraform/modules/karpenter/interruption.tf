# Karpenter's interruption handling: EventBridge sends spot interruption warnings, rebalance
# recommendations, instance state changes, AWS Health scheduled changes and capacity
# reservation interruptions to an SQS queue; the controller (settings.interruptionQueue) reads
# it and drains a node before EC2 takes it away, instead of losing its Ray workers mid-step.
# As the official Karpenter v1.14 setup makes them.

locals {
  interruption_queue_name = "${var.cluster_name}-karpenter"
  # Named, not read from the queue: the policy is part of the queue (one attribute write, one
  # wait for SQS to propagate it, instead of a second resource and a second wait).
  interruption_queue_arn = "arn:${local.partition}:sqs:${local.region}:${local.account_id}:${local.interruption_queue_name}"
}

resource "aws_sqs_queue" "interruption" {
  name                      = local.interruption_queue_name
  message_retention_seconds = 300 # an interruption notice is worthless after two minutes
  sqs_managed_sse_enabled   = true
  policy                    = data.aws_iam_policy_document.interruption_queue.json
  tags                      = var.tags
}

data "aws_iam_policy_document" "interruption_queue" {
  policy_id = "EC2InterruptionPolicy"

  statement {
    sid       = "EventBridgeSendsInterruptionEvents"
    actions   = ["sqs:SendMessage"]
    resources = [local.interruption_queue_arn]
    principals {
      type        = "Service"
      identifiers = ["events.amazonaws.com", "sqs.amazonaws.com"]
    }
  }

  statement {
    sid       = "DenyHTTP"
    effect    = "Deny"
    actions   = ["sqs:*"]
    resources = [local.interruption_queue_arn]
    principals {
      type        = "AWS"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

locals {
  # Rule name suffix -> the event; names stay within EventBridge's 64 characters.
  interruption_events = {
    health    = { source = "aws.health", detail_type = "AWS Health Event" }
    spot      = { source = "aws.ec2", detail_type = "EC2 Spot Instance Interruption Warning" }
    rebalance = { source = "aws.ec2", detail_type = "EC2 Instance Rebalance Recommendation" }
    state     = { source = "aws.ec2", detail_type = "EC2 Instance State-change Notification" }
    capacity  = { source = "aws.ec2", detail_type = "EC2 Capacity Reservation Instance Interruption Warning" }
  }
}

resource "aws_cloudwatch_event_rule" "interruption" {
  for_each = local.interruption_events

  name        = "${var.cluster_name}-karpenter-${each.key}"
  description = "${each.value.detail_type} events to Karpenter's interruption queue of ${var.cluster_name}"
  event_pattern = jsonencode({
    source      = [each.value.source]
    detail-type = [each.value.detail_type]
  })
  tags = var.tags
}

resource "aws_cloudwatch_event_target" "interruption" {
  for_each = local.interruption_events

  rule      = aws_cloudwatch_event_rule.interruption[each.key].name
  target_id = "KarpenterInterruptionQueueTarget"
  arn       = aws_sqs_queue.interruption.arn
}
