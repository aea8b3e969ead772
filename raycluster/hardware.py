"""GPU models, their legal MIG profiles, and EC2 instance types.

The MIG profiles of a GPU model and the number of instances of each that fit on one GPU come
from the GPU Operator's default MIG configuration (``data/default-mig-parted-config.yaml``,
vendored from the operator release in ``../shared/schemas``): a profile is legal on a model
when one of the model's layouts (``all-3g.40gb``...) makes it, and the layout's count for the
model's PCI device id (or its unfiltered count) is the number per GPU.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import yaml
from pydantic import Field

from raycluster.spec import Spec, SpecError

DATA = Path(__file__).parent / "data"
MIG_PARTED_CONFIG = DATA / "default-mig-parted-config.yaml"
_PROFILE = re.compile(r"^(?P<slices>\d)g\.(?P<memory>\d+)gb$")


class MigProfile(Spec):
    name: str = Field(description="MIG profile name as the GPU Operator spells it, e.g. 3g.40gb.")
    instances_per_gpu: int = Field(description="How many instances of this profile one GPU holds.")
    memory_gb: int = Field(description="Memory of one instance, in GB (from the profile name).")
    compute_slices: int = Field(description="GPU compute slices (the 'Ng' part) of one instance.")

    @property
    def resource_name(self) -> str:
        """Extended resource the device plugin advertises (mixed MIG strategy)."""
        return f"nvidia.com/mig-{self.name}"


class GPUModel(Spec):
    name: str = Field(description="GPU model, e.g. A100-80GB.")
    memory_gb: int = Field(gt=0, description="Memory of one whole GPU, in GB.")
    ray_accelerator_type: str = Field(description="Ray's accelerator type (ray.util.accelerators).")
    pci_device_ids: list[str] = Field(description="PCI device ids the MIG manager filters on.")
    mig_layouts: list[str] = Field(default_factory=list,
                                   description="Single-profile MIG layouts of the default MIG "
                                               "configuration that apply to this model.")

    @property
    def supports_mig(self) -> bool:
        return bool(self.mig_layouts)

    @property
    def mig_profiles(self) -> dict[str, MigProfile]:
        return _mig_profiles(self.name)


class InstanceType(Spec):
    vcpus: int = Field(gt=0, description="vCPUs of one node.")
    memory_gib: int = Field(gt=0, description="Memory of one node, GiB.")
    gpus: int = Field(default=0, ge=0, description="Physical GPUs of one node.")
    gpu_model: str | None = Field(default=None, description="GPU model (a name in gpu_models).")
    max_pods: int = Field(gt=0, description="Pods one node holds: the VPC CNI's ENI limit "
                                            "(the EKS AMI's eni-max-pods.txt).")
    efa_interfaces: int = Field(default=0, ge=0, description="Elastic Fabric Adapter "
                                                             "interfaces the type takes (0: no "
                                                             "EFA).")

    @property
    def efa(self) -> bool:
        return self.efa_interfaces > 0


class Hardware(Spec):
    spec_kind = "hardware table"
    gpu_models: list[GPUModel] = Field(description="GPU models the platform knows.")
    instance_types: dict[str, InstanceType] = Field(description="EC2 instance types by name.")


@cache
def hardware() -> Hardware:
    return Hardware.from_file(DATA / "hardware.yaml")


def gpu_model(name: str) -> GPUModel:
    models = {m.name: m for m in hardware().gpu_models}
    if name not in models:
        raise SpecError(f"unknown GPU model {name!r}; known: {', '.join(models)}")
    return models[name]


@cache
def mig_parted_layouts() -> dict[str, list[dict]]:
    """The ``mig-configs`` of the default MIG configuration: layout name -> device entries."""
    doc = yaml.safe_load(MIG_PARTED_CONFIG.read_text())
    return yaml.safe_load(doc["data"]["config.yaml"])["mig-configs"]


def _entry_for(entries: list[dict], device_ids: list[str]) -> dict | None:
    """The entry of a layout that applies to a GPU with one of ``device_ids``: one whose
    device-filter names it, else one with no filter (it applies to every device)."""
    ids = {d.upper() for d in device_ids}
    unfiltered = None
    for entry in entries:
        flt = entry.get("device-filter")
        if flt is None:
            unfiltered = unfiltered or entry
            continue
        flt = [flt] if isinstance(flt, str) else flt
        if ids & {f.upper() for f in flt}:
            return entry
    return unfiltered


@cache
def _mig_profiles(model_name: str) -> dict[str, MigProfile]:
    model = gpu_model(model_name)
    layouts = mig_parted_layouts()
    profiles: dict[str, MigProfile] = {}
    for layout in model.mig_layouts:
        if layout not in layouts:
            raise SpecError(f"gpu_models[{model.name}].mig_layouts: {layout!r} is not a layout of "
                            f"the GPU Operator's default MIG configuration")
        entry = _entry_for(layouts[layout], model.pci_device_ids)
        if entry is None or not entry.get("mig-enabled"):
            raise SpecError(f"gpu_models[{model.name}].mig_layouts: {layout!r} has no entry for "
                            f"device ids {model.pci_device_ids}")
        for name, count in entry["mig-devices"].items():
            m = _PROFILE.match(name)
            if not m:  # media-extension variants (+me, +gfx) are not schedulable profiles here
                continue
            profiles[name] = MigProfile(name=name, instances_per_gpu=int(count),
                                        memory_gb=int(m["memory"]),
                                        compute_slices=int(m["slices"]))
    return dict(sorted(profiles.items(), key=lambda kv: (kv[1].compute_slices, kv[1].memory_gb)))


def mig_layout_name(profile: str) -> str:
    """The ``nvidia.com/mig.config`` label value that makes every GPU of a node ``profile``."""
    return f"all-{profile}"
