# The AWS Load Balancer Controller's IRSA role: the internal NLBs (and ALBs) of the Serve
# endpoints come from it. Its permissions are the project's own policy, vendored verbatim from
# kubernetes-sigs/aws-load-balancer-controller v2.17 (docs/install/iam_policy.json; the chart
# 1.17.0 runs v2.17): it creates and deletes only the load balancers, target groups and security
# groups it tagged (elbv2.k8s.aws/cluster), and describes the rest. Replace the file when the
# chart's version moves.

resource "aws_iam_role" "load_balancer_controller" {
  name               = "${var.name}-aws-load-balancer-controller"
  description        = "IRSA role of the AWS Load Balancer Controller (${join(", ", var.load_balancer_controller_service_accounts)})"
  assume_role_policy = data.aws_iam_policy_document.irsa_assume["aws-load-balancer-controller"].json
  tags               = var.tags

  lifecycle {
    precondition {
      condition     = length("${var.name}-aws-load-balancer-controller") <= 64
      error_message = "var.name must be at most 35 characters for the role name ${var.name}-aws-load-balancer-controller (IAM allows 64)."
    }
  }
}

resource "aws_iam_role_policy" "load_balancer_controller" {
  name   = "aws-load-balancer-controller"
  role   = aws_iam_role.load_balancer_controller.id
  policy = file("${path.module}/aws-load-balancer-controller-policy.json")
}
