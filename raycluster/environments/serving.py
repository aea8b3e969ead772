"""How an environment's Serve endpoints (the OpenAI RayService and the agents RayServices) are
reached and upgraded: the internal load balancer with TLS in front of them, and whether the
cluster has the Gateway API that KubeRay's incremental upgrades route through.

The AWS Load Balancer Controller makes the load balancer: an internal Network Load Balancer
whose TLS listener (port 443) holds an ACM certificate. With a Gateway class
(``gateway_class``) KubeRay upgrades a RayService with ``NewClusterWithIncrementalUpgrade``:
it shifts traffic step by step through the Gateway while the new cluster scales up and the old
one scales down. Without one, upgrades are ``NewCluster`` (blue-green; see docs). Placeholders
here come from Terraform (the certificate) and the platform's add-ons (the Gateway class).
"""

from __future__ import annotations

import ipaddress
import re

from pydantic import Field, field_validator

from raycluster.spec import Spec

_CERT_ARN = re.compile(r"^arn:aws[\w-]*:acm:[a-z0-9-]+:\d{12}:certificate/[\w-]+$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class Serving(Spec):
    """The Serve endpoints' load balancer and upgrade path."""

    certificate_arn: str = Field(
        description="ACM certificate (arn:aws:acm:<region>:<account>:certificate/<id>) of the "
                    "internal load balancer's TLS listener; its names cover the endpoints' "
                    "DNS names.")
    gateway_class: str | None = Field(
        default=None,
        description="GatewayClass of the cluster's Gateway API implementation. Set: RayServices "
                    "upgrade with NewClusterWithIncrementalUpgrade through a Gateway of this "
                    "class (an in-cluster implementation such as Istio: its proxy runs in the "
                    "RayService's namespace, behind the TLS load balancer). Unset: the cluster "
                    "has no Gateway API and RayServices upgrade with NewCluster.")
    upgrade_step_size_percent: int = Field(
        default=10, ge=1, le=100,
        description="Traffic moved to the new cluster per step of an incremental upgrade "
                    "(at most the surge: one worker pod's share of the service).")
    upgrade_interval_seconds: int = Field(
        default=60, ge=1,
        description="Seconds between traffic steps, so that the Serve and Ray autoscalers "
                    "follow (KubeRay's advice: 60).")
    ssl_policy: str = Field(
        default="ELBSecurityPolicy-TLS13-1-2-2021-06",
        description="TLS policy of the load balancer's listener (TLS 1.3 and 1.2 only).")
    source_cidrs: list[str] = Field(
        default_factory=list,
        description="Who may reach the load balancer (its security group's sources); default: "
                    "the environment's ingress_cidrs, else its VPC CIDR.")

    @field_validator("certificate_arn")
    @classmethod
    def _arn(cls, v: str) -> str:
        if not _CERT_ARN.match(v):
            raise ValueError("is not an ACM certificate ARN "
                             "(arn:aws:acm:<region>:<account>:certificate/<id>)")
        return v

    @field_validator("source_cidrs")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        for cidr in v:
            try:
                ipaddress.ip_network(cidr)
            except ValueError:
                raise ValueError(f"{cidr!r} is not a CIDR such as 10.0.0.0/16") from None
        return v

    @field_validator("gateway_class")
    @classmethod
    def _class(cls, v: str | None) -> str | None:
        if v is not None and not _DNS_LABEL.match(v):
            raise ValueError("is not a GatewayClass name (a DNS label)")
        return v


__all__ = ["Serving"]
