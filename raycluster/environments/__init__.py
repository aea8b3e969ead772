"""Deployment environments: what differs between one EKS cluster and the next (names, versions,
images, storage, roles, addresses) and which Ray clusters, jobs and services run there.

Everything about the node pools themselves comes from the catalog (``raycluster/data/
pools.yaml``); an environment only names pools. ``rayplane render --env production`` reads
``production.yaml`` beside this file. Account ids, ARNs and addresses here are placeholders that
Terraform's outputs replace (docs/kubernetes.md says which output feeds which field); no secret
is ever written here -- secrets come from AWS Secrets Manager through External Secrets.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator, model_validator

from raycluster.environments.feature_store import FeatureStore
from raycluster.environments.serving import Serving
from raycluster.spec import Spec, SpecError, did_you_mean

ENVIRONMENTS_DIR = Path(__file__).parent
_VERSION = re.compile(r"^1\.\d{2}$")
_ROLE_ARN = re.compile(r"^arn:aws:iam::\d{12}:role/[\w+=,.@/-]+$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class Images(Spec):
    """Container images of the Ray pods (built from this repository, pushed to ECR)."""

    repository: str = Field(description="ECR repository URI, e.g. "
                                         "111122223333.dkr.ecr.us-east-1.amazonaws.com/rayplane.")
    cpu_tag: str = Field(description="Tag of the CPU image (head nodes, CPU workers).")
    gpu_tag: str = Field(description="Tag of the CUDA image with vLLM (GPU worker groups).")
    pull_policy: str = Field(default="IfNotPresent", description="imagePullPolicy of Ray pods.")

    @field_validator("cpu_tag", "gpu_tag")
    @classmethod
    def _pinned(cls, v: str) -> str:
        if v in ("", "latest"):
            raise ValueError("must be a pinned tag, not 'latest', so that every node runs the "
                             "same Ray version")
        return v

    def image(self, gpu: bool) -> str:
        return f"{self.repository}:{self.gpu_tag if gpu else self.cpu_tag}"


class Storage(Spec):
    """Shared storage: EFS for datasets and checkpoints, S3 for artifacts."""

    storage_class: str = Field(default="efs-shared",
                               description="EFS StorageClass (Terraform output "
                                           "storage_classes_manifest creates it).")
    shared_volume_size: str = Field(default="1Ti", description="Requested size of each "
                                                               "namespace's EFS claim (EFS is "
                                                               "elastic; Kubernetes needs one).")
    mount_path: str = Field(default="/mnt/shared", description="Where Ray pods mount the EFS "
                                                               "volume.")
    artifacts_bucket: str = Field(description="S3 bucket for artifacts (Terraform output "
                                              "bucket_name); pods get it as "
                                              "RAYPLANE_ARTIFACTS_BUCKET and reach it via IRSA.")


class GitOps(Spec):
    """The Argo CD Application that keeps the cluster in step with the rendered folder."""

    repo_url: str = Field(description="Git repository Argo CD syncs from.")
    revision: str = Field(default="main", description="Branch, tag or commit to sync.")
    path: str = Field(default="infra/k8s", description="Folder of rendered manifests.")
    argocd_namespace: str = Field(default="argocd", description="Namespace of Argo CD.")


class AddOns(Spec):
    """What the add-ons Argo CD installs (infra/helm/charts.yaml) need from Terraform's outputs
    that the rendered objects name."""

    mlflow_db_secret: str | None = Field(
        default=None,
        description="The secret RDS manages for MLflow's database (Terraform output "
                    "mlflow_db_secret_arn): the ExternalSecret `mlflow-db` that MLflow's chart "
                    "reads copies its username and password.")


class WorkerGroupSpec(Spec):
    """One KubeRay worker group: Ray workers on one pool."""

    pool: str = Field(description="Catalog pool the group's pods run on.")
    name: str | None = Field(default=None, description="Group name (default: the pool name).")
    min_replicas: int = Field(default=0, ge=0, description="Fewest workers (0: scale to zero).")
    max_replicas: int | None = Field(default=None, ge=1,
                                     description="Most workers (default: what the pool's nodes "
                                                 "hold at max_nodes).")
    gpu_units: int | None = Field(default=None, ge=0,
                                  description="GPU units per worker (default: the pool's worker "
                                              "shape).")
    cpus: int | None = Field(default=None, ge=1, description="CPUs per worker (default: pool's).")
    memory_gib: int | None = Field(default=None, ge=1,
                                   description="Memory per worker, GiB (default: pool's).")
    idle_timeout_seconds: int = Field(default=300, ge=0,
                                      description="Idle time before the autoscaler removes a "
                                                  "worker of this group.")

    @model_validator(mode="after")
    def _replicas(self) -> WorkerGroupSpec:
        if self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is greater than max_replicas "
                             f"({self.max_replicas})")
        return self

    @property
    def group_name(self) -> str:
        return self.name or self.pool


class HeadSpec(Spec):
    cpus: int | None = Field(default=None, ge=1,
                             description="CPUs of the head pod (default: the head pool's worker "
                                         "shape).")
    memory_gib: int | None = Field(default=None, ge=1,
                                   description="Memory of the head pod, GiB (default: the head "
                                               "pool's worker shape).")


class ClusterSpec(Spec):
    """A long-lived RayCluster for a team or workload."""

    name: str = Field(description="RayCluster name (a DNS label).")
    namespace: str = Field(description="Catalog namespace the cluster lives in.")
    priority_class: str | None = Field(default=None,
                                       description="Priority class of its pods (default: the "
                                                   "namespace's).")
    head: HeadSpec = Field(default_factory=HeadSpec, description="Head pod size.")
    worker_groups: list[WorkerGroupSpec] = Field(default_factory=list,
                                                 description="Worker groups, one per pool.")
    gcs_fault_tolerance: bool = Field(default=False,
                                      description="Keep GCS state in the external Redis so a "
                                                  "restarted head keeps its jobs and actors.")

    @field_validator("name")
    @classmethod
    def _dns(cls, v: str) -> str:
        if not _DNS_LABEL.match(v):
            raise ValueError("must be a DNS label: lowercase letters, digits and '-'")
        return v


class RayJobSpec(Spec):
    """A RayJob: one training config run on its own RayCluster, torn down after."""

    config: str = Field(description="Training config (train/configs/*.yaml), relative to the "
                                    "repository root.")
    namespace: str = Field(default="training", description="Namespace of the RayJob.")
    priority_class: str | None = Field(default=None,
                                       description="Priority class (default: the pool's).")
    active_deadline_seconds: int = Field(default=6 * 3600, ge=60,
                                         description="Kill the job (and its cluster) after this "
                                                     "long.")
    backoff_limit: int = Field(default=2, ge=0, description="Retries of the whole RayJob (a "
                                                            "new cluster each).")
    ttl_seconds_after_finished: int = Field(default=3600, ge=0,
                                            description="Keep the finished cluster this long for "
                                                        "logs.")
    shutdown_after_job_finishes: bool = Field(default=True,
                                              description="Delete the cluster when the job ends.")


class _ServeClusterSpec(Spec):
    """What every RayService of an environment sets: its name, GCS fault tolerance, upgrades
    and the Serve ingress on its pods."""

    name: str | None = Field(default=None, description="RayService name (default: the "
                                                       "config's name).")
    gcs_fault_tolerance: bool = Field(default=True, description="GCS FT with the external Redis "
                                                                "(a restarted head keeps apps).")
    upgrade_strategy: str | None = Field(
        default=None,
        description="KubeRay upgrade strategy. Default: NewClusterWithIncrementalUpgrade where "
                    "the environment names a Gateway class (serving.gateway_class), else "
                    "NewCluster (blue-green at twice the GPUs); None: no cluster upgrades.")
    serve_proxy: str = Field(default="haproxy",
                             description="Serve's HTTP ingress on every pod: haproxy (Ray Serve's "
                                         "RAY_SERVE_ENABLE_HA_PROXY, straight to the ingress "
                                         "replicas) or ray (Ray's Python proxy actor).")

    @field_validator("serve_proxy")
    @classmethod
    def _proxy(cls, v: str) -> str:
        valid = ("haproxy", "ray")
        if v not in valid:
            raise ValueError(f"must be one of {', '.join(valid)}{did_you_mean(v, valid)}")
        return v

    @field_validator("upgrade_strategy")
    @classmethod
    def _strategy(cls, v: str | None) -> str | None:
        if v is None:
            return v
        valid = ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")
        if v not in valid:
            raise ValueError(f"must be one of {', '.join(valid)}{did_you_mean(v, valid)}")
        return v


class RayServiceSpec(_ServeClusterSpec):
    """A RayService: a serve config on a RayCluster with zero-downtime upgrades."""

    config: str = Field(description="Serve config (serve/configs/*.yaml), relative to the "
                                    "repository root.")
    namespace: str = Field(default="inference", description="Namespace of the RayService.")
    priority_class: str | None = Field(default=None,
                                       description="Priority class (default: the GPU pool's "
                                                   "of its models).")


class AgentsDatabase(Spec):
    """The PostgreSQL server where the agents' threads live: the RDS instance Terraform
    creates (module platform-services), reached with the password RDS manages in Secrets
    Manager. LangGraph's checkpoint tables sit beside MLflow's in its database; their names
    do not meet."""

    host: str = Field(description="Host name (Terraform output mlflow_db_address).")
    port: int = Field(default=5432, ge=1, le=65535, description="Port (mlflow_db_port).")
    database: str = Field(default="mlflow", description="Database (mlflow_db_name).")
    secret: str = Field(description="Secrets Manager secret RDS manages for the database, "
                                    "JSON keys username and password (Terraform output "
                                    "mlflow_db_secret_arn).")
    sslmode: str = Field(default="require", description="libpq sslmode: the instance's "
                                                        "parameter group forces TLS.")

    @field_validator("sslmode")
    @classmethod
    def _sslmode(cls, v: str) -> str:
        valid = ("require", "verify-ca", "verify-full")
        if v not in valid:
            raise ValueError(f"must be one of {', '.join(valid)} (the database refuses "
                             f"plain connections){did_you_mean(v, valid)}")
        return v


class AgentsServiceSpec(_ServeClusterSpec):
    """The agents app as a RayService: an agents config (graphs, model endpoint, pool,
    priority, autoscaling, keys) and the database its threads live in."""

    config: str = Field(description="Agents config (agents/configs/*.yaml), relative to the "
                                    "repository root.")
    namespace: str = Field(default="agentic", description="Namespace of the RayService.")
    database: AgentsDatabase = Field(description="Where the threads live (RDS PostgreSQL).")


class RayCronJobSpec(RayJobSpec):
    """A RayCronJob: a RayJob on a schedule (off-peak batch work)."""

    name: str = Field(description="RayCronJob name.")
    schedule: str = Field(description="Cron schedule, e.g. '0 2 * * *'.")
    time_zone: str = Field(default="Etc/UTC", description="IANA time zone of the schedule.")

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str) -> str:
        if len(v.split()) != 5:
            raise ValueError("must be a five-field cron schedule such as '0 2 * * *'")
        return v


class Environment(Spec):
    """One deployment target: an EKS cluster and what runs on it."""

    spec_kind = "environment file"
    name: str = Field(description="Environment name (production, staging).")
    kubernetes_version: str = Field(description="EKS Kubernetes version, e.g. 1.33; manifests "
                                                "are validated against this version's schema.")
    cluster_name: str = Field(description="EKS cluster name.")
    region: str = Field(description="AWS region.")
    account_id: str = Field(description="AWS account id (12 digits).")
    vpc_cidr: str = Field(description="VPC CIDR: EFS, Redis and the load balancers live there.")
    ray_version: str = Field(description="Ray version of the images (KubeRay's rayVersion).")
    kuberay_version: str = Field(default="1.7.0", description="KubeRay operator version.")
    images: Images = Field(description="Container images.")
    storage: Storage = Field(description="EFS and S3.")
    irsa_role_arns: dict[str, str] = Field(
        description="IAM role (IRSA) of the `ray` service account per namespace: S3 access "
                    "(Terraform output workload_role_arns[\"ray\"]).")
    redis_address: str = Field(description="rediss://host:port of the Redis (ElastiCache, TLS "
                                           "only) for GCS fault tolerance.")
    redis_ca_bundle: str | None = Field(
        default=None, validate_default=True,
        description="PEM file, relative to the repository root, of the CAs that sign the Redis "
                    "server certificate; mounted on every head with GCS fault tolerance as "
                    "RAY_REDIS_CA_CERT. ElastiCache: raycluster/kuberay/amazon-root-cas.pem.")
    secrets_manager_prefix: str = Field(description="Prefix of this environment's secrets in "
                                                    "AWS Secrets Manager.")
    mlflow_tracking_uri: str = Field(default="http://mlflow.mlops.svc.cluster.local:5000",
                                     description="MLflow tracking server as pods reach it.")
    kuberay_namespace: str = Field(default="kuberay-system",
                                   description="Namespace of the KubeRay operator.")
    gpu_operator_namespace: str = Field(default="gpu-operator",
                                        description="Namespace of the NVIDIA GPU Operator.")
    ingress_cidrs: list[str] = Field(default_factory=list,
                                     description="Where Serve traffic comes from (the internal "
                                                 "load balancer's subnets); default: vpc_cidr.")
    gpu_driver_preinstalled: bool = Field(default=True,
                                          description="The EKS GPU AMI ships the driver and "
                                                      "container toolkit, so the GPU Operator "
                                                      "leaves them alone.")
    gitops: GitOps = Field(description="Argo CD Application settings.")
    serving: Serving | None = Field(
        default=None,
        description="The Serve endpoints' internal TLS load balancer and upgrade path "
                    "(unset: endpoints reachable in the cluster only, NewCluster upgrades).")
    addons: AddOns = Field(default_factory=AddOns,
                           description="What the add-ons need from Terraform (infra/helm).")
    feature_store: FeatureStore | None = Field(
        default=None,
        description="The Feast feature store on EKS (Terraform outputs feature_store_*): its "
                    "registry/offline bucket, the online store on the MLflow RDS instance, the "
                    "materialisation RayCronJob and the TF RayJob "
                    "(raycluster/kuberay/features.py).")
    clusters: list[ClusterSpec] = Field(default_factory=list, description="RayClusters.")
    jobs: list[RayJobSpec] = Field(default_factory=list, description="RayJobs.")
    services: list[RayServiceSpec] = Field(default_factory=list, description="RayServices.")
    agents: list[AgentsServiceSpec] = Field(default_factory=list,
                                            description="Agents apps, each a RayService.")
    cronjobs: list[RayCronJobSpec] = Field(default_factory=list, description="RayCronJobs.")

    @field_validator("kubernetes_version")
    @classmethod
    def _k8s_version(cls, v: str) -> str:
        if not _VERSION.match(v):
            raise ValueError("must be a Kubernetes minor version such as '1.33'")
        return v

    @field_validator("account_id")
    @classmethod
    def _account(cls, v: str) -> str:
        if not re.fullmatch(r"\d{12}", v):
            raise ValueError("must be a 12-digit AWS account id")
        return v

    @field_validator("irsa_role_arns")
    @classmethod
    def _arns(cls, v: dict[str, str]) -> dict[str, str]:
        for ns, arn in v.items():
            if not _ROLE_ARN.match(arn):
                raise ValueError(f"{ns}: {arn!r} is not an IAM role ARN "
                                 "(arn:aws:iam::<account>:role/<name>)")
        return v

    @field_validator("redis_address")
    @classmethod
    def _host_port(cls, v: str) -> str:
        # The Terraform-made ElastiCache accepts TLS only (transit encryption): a plain
        # redis:// or bare host:port address would never connect.
        if not re.fullmatch(r"rediss://[\w.-]+:\d{1,5}", v):
            raise ValueError("must be rediss://host:port (the ElastiCache accepts TLS only), "
                             "e.g. rediss://rayplane-gcs.abc123.cache.amazonaws.com:6379")
        return v

    @field_validator("redis_ca_bundle")
    @classmethod
    def _ca_bundle(cls, v: str | None, info: ValidationInfo) -> str | None:
        # Without a CA, Ray's GCS fails its TLS handshake (CERTIFICATE_VERIFY_FAILED).
        if v is None and str(info.data.get("redis_address", "")).startswith("rediss://"):
            raise ValueError("required with a rediss:// redis_address: the PEM CAs that sign "
                             "the Redis certificate (ElastiCache: "
                             "raycluster/kuberay/amazon-root-cas.pem)")
        if v is not None and (v.startswith("/") or not v.endswith(".pem")):
            raise ValueError("must be a .pem file relative to the repository root")
        return v

    @model_validator(mode="after")
    def _unique_names(self) -> Environment:
        seen: dict[tuple[str, str], str] = {}
        for field, items in (("clusters", self.clusters), ("cronjobs", self.cronjobs)):
            for i, item in enumerate(items):
                key = (item.namespace, item.name)
                if key in seen:
                    raise ValueError(f"{field}[{i}].name: {item.name!r} is already used in "
                                     f"namespace {item.namespace!r} by {seen[key]}")
                seen[key] = f"{field}[{i}]"
        return self

    @property
    def serve_ingress_cidrs(self) -> list[str]:
        return self.ingress_cidrs or [self.vpc_cidr]


def environment_names() -> list[str]:
    return sorted(p.stem for p in ENVIRONMENTS_DIR.glob("*.yaml"))


def load_environment(name_or_path: str | Path) -> Environment:
    """The environment called ``name`` (a file beside this module) or at ``path``."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        names = environment_names()
        if str(name_or_path) not in names:
            raise SpecError(f"--env: {str(name_or_path)!r} is not an environment"
                            f"{did_you_mean(str(name_or_path), names)}; valid: "
                            f"{', '.join(names)} (or a path to an environment file)",
                            field="env")
        path = ENVIRONMENTS_DIR / f"{name_or_path}.yaml"
    return Environment.from_file(path)


__all__ = ["AddOns", "AgentsDatabase", "AgentsServiceSpec", "ClusterSpec", "Environment", "FeatureStore",
           "GitOps",
           "HeadSpec", "Images", "RayCronJobSpec", "RayJobSpec", "RayServiceSpec", "Serving",
           "Storage", "WorkerGroupSpec", "environment_names", "load_environment"]
