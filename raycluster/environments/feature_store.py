"""The Feast feature store of an EKS environment (issue 17): where its registry and offline
data live (an S3 bucket), its online store (PostgreSQL: a database and login of its own on the
MLflow RDS instance), the IAM role its pods reach the bucket with, when materialisation runs,
and the TensorFlow training job that reads it. Every value is a Terraform output
(infra/terraform/environments/production, ``feature_store_*``); none is a secret: the login
comes from Secrets Manager through External Secrets (raycluster/kuberay/features.py)."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from raycluster.spec import Spec

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_ROLE_ARN = re.compile(r"^arn:aws:iam::\d{12}:role/[\w+=,.@/-]+$")


class FeatureStoreDatabase(Spec):
    """Feast's online store: its own database and login role, both ``feast``
    (features.store.DATABASE, Terraform's feature_store_db_name), on the MLflow instance, TLS
    required."""

    host: str = Field(description="Host of the MLflow RDS instance (Terraform output "
                                  "mlflow_db_address).")
    port: int = Field(default=5432, ge=1, le=65535, description="Port (mlflow_db_port).")
    secret: str = Field(description="Secrets Manager secret with the login, JSON keys username "
                                    "and password (feature_store_db_secret_name).")


class Materialization(Spec):
    """The RayCronJob that loads the latest feature values into the online store."""

    schedule: str = Field(default="*/30 * * * *",
                          description="Cron schedule (pool_load snapshots come every 10 min).")
    time_zone: str = Field(default="Etc/UTC", description="IANA time zone of the schedule.")
    views: list[str] = Field(default_factory=list,
                             description="Feature views to materialise (default: all).")

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str) -> str:
        if len(v.split()) != 5:
            raise ValueError("must be a five-field cron schedule such as '*/30 * * * *'")
        return v


class FeatureTraining(Spec):
    """The TensorFlow RayJob trained on the feature store (``python -m train.duration``)."""

    config: str = Field(default="train/configs/duration.yaml",
                        description="Duration-model config, relative to the repository root; "
                                    "its pool and num_workers size the worker group.")
    active_deadline_seconds: int = Field(default=2 * 3600, ge=60,
                                         description="Kill the job (and its cluster) after "
                                                     "this long.")
    backoff_limit: int = Field(default=1, ge=0, description="Retries of the whole RayJob.")
    image_tag_suffix: str = Field(
        default="-tf", pattern=r"^[A-Za-z0-9_.-]{1,40}$",
        description="Appended to the environment's image tags: the images built with the "
                    "tensorflow extra (2.60.0-py311-cpu-tf on the head, -cu128-tf on GPU "
                    "workers), which the TF job runs.")


class FeatureStore(Spec):
    """Feast on EKS: bucket, online store, role, materialisation and the TF job."""

    bucket: str = Field(description="Bucket of the registry, the offline data and the Ray "
                                    "offline store's staging (s3://<bucket>/features/...); "
                                    "Terraform output feature_store_bucket_name.")
    role_arn: str = Field(description="IRSA role of the feature-store service account "
                                      "(feature_store_role_arn).")
    namespace: str = Field(default="training",
                           description="Namespace of the feature-store service account, the "
                                       "materialisation RayCronJob and the TF RayJob: a Ray "
                                       "namespace (its token, EFS claim, network policies).")
    database: FeatureStoreDatabase = Field(description="The online store.")
    materialize: Materialization = Field(default_factory=Materialization,
                                         description="The materialisation RayCronJob.")
    training: FeatureTraining | None = Field(default_factory=FeatureTraining,
                                             description="The TF RayJob (null: none).")

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str) -> str:
        if not _BUCKET.match(v):
            raise ValueError("must be an S3 bucket name (3-63 lowercase letters, digits, '.' "
                             "and '-'), without s3://")
        return v

    @field_validator("role_arn")
    @classmethod
    def _role(cls, v: str) -> str:
        if not _ROLE_ARN.match(v):
            raise ValueError(f"{v!r} is not an IAM role ARN (arn:aws:iam::<account>:role/<name>)")
        return v


__all__ = ["FeatureStore", "FeatureStoreDatabase", "FeatureTraining", "Materialization"]
