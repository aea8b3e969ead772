"""Any training config is either refused in one line naming the field, or becomes what Ray
and KubeRay accept: Ray Train's ``ScalingConfig`` on its pool (locally and on KubeRay), and a
RayJob valid against the KubeRay 1.7 CRD in ../shared/schemas (strictly: unknown fields
fail), whose worker group fits its pool. Configs are the shipped ones with a few fields changed
at random, to plausible values (other pools, worker counts, model sizes, schedules) or hostile
ones (wrong types, negatives, unknown keys)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raycluster.catalog import load_catalog
from raycluster.environments import RayJobSpec, load_environment
from raycluster.kuberay import render_rayjob
from raycluster.spec import SpecError
from tests.support.crds import strict as _strict
from train.config import TrainConfig, scaling_config, worker_resources

CONFIGS = Path(__file__).resolve().parents[3] / "train" / "configs"
BASES = [yaml.safe_load((CONFIGS / name).read_text()) for name in ("ci.yaml", "demo.yaml")]
CATALOG = load_catalog()
ENV = load_environment("production")
JOB = RayJobSpec.parse({"config": "train/configs/ci.yaml", "namespace": "training"})
NAMES_FIELD = re.compile(r"^[a-z_]+[\[.:]")

HOSTILE = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(),
                    st.text(max_size=12), st.lists(st.integers(0, 3), max_size=2),
                    st.dictionaries(st.text(max_size=4), st.integers(0, 3), max_size=2))
FIELDS = {
    "name": st.one_of(st.sampled_from(["ci", "Run_1", "-x", "a" * 64, "run.v2", ""]),
                      st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}[a-z0-9]", fullmatch=True)),
    "pool": st.sampled_from([*CATALOG.by_name, "a100", "tpu"]),
    "num_workers": st.integers(-1, 40),
    "model": st.fixed_dictionaries({"n_layer": st.integers(0, 50), "n_head": st.integers(0, 70),
                                    "n_embd": st.integers(0, 9000)},
                                   optional={"n_positions": st.integers(0, 9000),
                                             "dropout": st.floats(-0.5, 1.5)}),
    "data": st.fixed_dictionaries({}, optional={
        "seed": st.integers(), "train_size": st.integers(-1, 10**5),
        "vocab_size": st.integers(0, 70000)}),
    "steps": st.one_of(st.integers(-1, 10**5), st.integers(100, 2000)),
    "lr": st.floats(-1, 2),
    "warmup_steps": st.integers(-1, 1000), "min_lr_ratio": st.floats(-1, 2),
    "batch_size": st.integers(-1, 512), "checkpoint_every": st.integers(-1, 10**5),
    "keep_checkpoints": st.integers(-1, 5), "max_failures": st.integers(-3, 5),
    "storage_path": st.sampled_from(["/mnt/efs/runs", "s3://bucket/runs", "runs", "~/runs",
                                     "file:///tmp/x", ""]),
    "mlflow": st.fixed_dictionaries({}, optional={
        "tracking_uri": st.sampled_from(["http://mlflow:5000", None]),
        "experiment": st.text(max_size=8), "register_on_pass": st.booleans()}),
    "eval": st.fixed_dictionaries({}, optional={
        "min_exact_match": st.floats(-1, 2), "max_new_tokens": st.integers(0, 2000),
        "batch_size": st.integers(-1, 100)}),
    "wandb": st.one_of(st.none(), st.fixed_dictionaries(
        {"project": st.text(max_size=6)},
        optional={"mode": st.sampled_from(["online", "offline", "disabled", "cloud"])})),
    "threads_per_worker": st.one_of(st.none(), st.integers(-1, 64)),
    "amp": st.booleans(), "local": st.one_of(st.none(), st.booleans()),
}


@st.composite
def train_configs(draw) -> dict:
    """A shipped config with one or two fields changed, or an unknown one added."""
    doc = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 2))):
        key = draw(st.sampled_from([*FIELDS, "gpus"]))
        plausible = FIELDS.get(key, HOSTILE)
        doc[key] = draw(st.one_of(plausible, plausible, plausible, HOSTILE))
    return json.loads(json.dumps(doc))


@pytest.fixture(scope="module")
def rayjob_crd(schemas_dir):
    path = schemas_dir / "kuberay-v1.7.0" / "ray.io_rayjobs.yaml"
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _Validator(_strict(version["schema"]["openAPIV3Schema"]))


class _Validator(jsonschema.Draft7Validator):
    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing case
        return "<RayJob CRD validator>"




def assert_refused_naming_the_field(err: SpecError) -> None:
    message = str(err)
    assert "\n" not in message, f"not one line: {message!r}"
    assert NAMES_FIELD.match(message), f"names no field: {message!r}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=train_configs())
def test_a_training_config_is_refused_naming_the_field_or_becomes_a_valid_rayjob(
        doc, rayjob_crd):
    try:
        config = TrainConfig.parse(doc)
    except SpecError as err:
        assert_refused_naming_the_field(err)
        return
    try:  # the pool is checked against the catalog the cluster runs with
        for local in (True, False):
            scaling = scaling_config(CATALOG, config, local)  # Ray checks it on construction
            assert scaling.num_workers == config.num_workers
            assert all(v >= 0 for v in worker_resources(CATALOG, config, local).values())
        job = render_rayjob(CATALOG, ENV, JOB, config)
    except SpecError as err:  # no such pool, more workers than it holds, over the quota
        assert_refused_naming_the_field(err)
        assert err.field, str(err)
        return
    errors = list(rayjob_crd.iter_errors(job))
    assert not errors, "; ".join(f"{'.'.join(map(str, e.path))}: {e.message}"
                                 for e in errors[:3])
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", job["metadata"]["name"])
    group, = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["minReplicas"] <= group["maxReplicas"] <= CATALOG.pool(config.pool).max_workers
