"""rayplane's cluster layer: the pool catalog, cluster specs, KubeRay rendering, GPU Operator
config, policies, the local multi-node cluster and the CLI."""

from raycluster.catalog import Catalog, GPUSharing, Pool, SharingMode, load_catalog
from raycluster.spec import Spec, SpecError

__all__ = ["Catalog", "GPUSharing", "Pool", "SharingMode", "Spec", "SpecError", "load_catalog"]
