"""The GPU table agrees with the GPU Operator release in ../shared/schemas."""

from __future__ import annotations

import yaml

from raycluster.hardware import MIG_PARTED_CONFIG, hardware, mig_parted_layouts
from tests.conftest import requires_schemas


@requires_schemas
def test_vendored_mig_config_is_the_operator_release(schemas_dir):
    shipped = (schemas_dir / "gpu-operator-v26.7.0" / "default-mig-parted-config.yaml")
    assert yaml.safe_load(MIG_PARTED_CONFIG.read_text()) == yaml.safe_load(shipped.read_text())


def test_every_balanced_profile_of_a_model_is_known():
    """The model's entry of the operator's `all-balanced` layout only uses profiles that the
    table derives for that model (catches a missing layout in hardware.yaml)."""
    balanced = mig_parted_layouts()["all-balanced"]
    for model in hardware().gpu_models:
        if not model.supports_mig:
            continue
        ids = {i.upper() for i in model.pci_device_ids}
        entry = next(e for e in balanced
                     if ids & {f.upper() for f in (e["device-filter"] if isinstance(
                         e["device-filter"], list) else [e["device-filter"]])})
        assert set(entry["mig-devices"]) <= set(model.mig_profiles), model.name


def test_instance_types_carry_their_pod_limit_and_efa_interfaces():
    """max_pods is the EKS AMI's eni-max-pods.txt (VPC CNI ENI limit; p5.48xlarge counts
    network card 0 only); efa_interfaces one per network card (EC2 MaximumEfaInterfaces)."""
    types = hardware().instance_types
    assert {n: t.max_pods for n, t in types.items()} == {
        "m6i.2xlarge": 58, "m6i.4xlarge": 234, "m6i.8xlarge": 234, "m7i.4xlarge": 234,
        "g5.2xlarge": 58, "g5.12xlarge": 737, "p4d.24xlarge": 737, "p4de.24xlarge": 737,
        "p5.48xlarge": 100}
    assert {n: t.efa_interfaces for n, t in types.items() if t.efa} == {
        "g5.12xlarge": 1, "p4d.24xlarge": 4, "p4de.24xlarge": 4, "p5.48xlarge": 32}
