"""What a caller names is checked against the feature repository before any store or job is
touched (features.online, features.jobs, ``rayplane features``): one line naming the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from features import jobs, online
from features.repo import FEATURE_SERVICE, POOLS
from raycluster.spec import SpecError

REPO = Path(__file__).resolve().parents[3]


def test_names_and_keys_come_from_the_repository():
    assert online.view_names() == ["job_outcome", "job_request", "pool_load"]
    assert online.names() == sorted([*online.view_names(), FEATURE_SERVICE])
    assert online.join_keys("pool_load") == ["pool"]
    assert online.join_keys(FEATURE_SERVICE) == ["job_id", "pool"]
    assert online.feature_refs(FEATURE_SERVICE) == [
        "job_request:requested_units", "job_request:model_size_b", "pool_load:running_units",
        "pool_load:pending_units", "pool_load:free_units", "pool_load:gpu_utilization",
        "pool_load:mean_wait_1h_s"]
    assert POOLS == ("cpu", "a100-timeslice", "a100-mig", "h100-timeslice")


def test_entities_are_typed_by_their_key():
    assert online.parse_entities(["job_id=42", "pool=a100-mig"], FEATURE_SERVICE) == {
        "job_id": 42, "pool": "a100-mig"}


@pytest.mark.parametrize("call, field, message", [
    (lambda: online.resolve("pool_lod"), "view",
     "no feature view or service 'pool_lod' (did you mean 'pool_load'?); valid: "
     "job_duration_model, job_outcome, job_request, pool_load"),
    (lambda: online.parse_entities(["job_id=abc"], "job_request"), "--entity",
     "job_id=abc: job_id is an Int64 key; give a whole number"),
    (lambda: online.parse_entities(["poool=cpu"], "pool_load"), "--entity",
     "'poool' is not an entity key of pool_load (did you mean 'pool'?); its keys: pool"),
    (lambda: online.parse_entities(["pool=a100mig"], "pool_load"), "--entity",
     "pool 'a100mig' is not in the catalog (did you mean 'a100-mig'?)"),
    (lambda: online.parse_entities(["pool=cpu"], FEATURE_SERVICE), "--entity",
     "job_duration_model needs job_id=..."),
    (lambda: online.parse_entities(["cpu"], "pool_load"), "--entity", "is not key=value"),
    (lambda: online.online_features(["pool_load:free"], [{"pool": "cpu"}]), "features[0]",
     "pool_load has no feature 'free'"),
    (lambda: online.online_features(["pool_load"], [{"pool": 3}]), "entity_rows[0]",
     "pool=3: pool is a String key"),
    (lambda: online.pool_load_now("h100"), "pool", "pool 'h100' is not in the catalog"),
    (lambda: jobs.parse_views("pool_load,job_outcom"), "--views",
     "no feature view 'job_outcom' (did you mean 'job_outcome'?)"),
    (lambda: jobs.parse_views(FEATURE_SERVICE), "--views", "is a feature service"),
    (lambda: jobs.parse_end("yesterday"), "--end", "'yesterday' is not an ISO time"),
])
def test_bad_input_is_a_spec_error_naming_the_field(call, field, message):
    with pytest.raises(SpecError) as err:
        call()
    assert err.value.field == field
    assert message in str(err.value) and "\n" not in str(err.value)


def test_views_default_to_all_of_them():
    assert jobs.parse_views(None) == ["job_outcome", "job_request", "pool_load"]
    assert jobs.parse_views(" pool_load ,job_request") == ["pool_load", "job_request"]


def test_the_cli_prints_one_line_and_exits_2_without_a_platform(tmp_path):
    """(tests/integration/test_features.py checks more cases against a running platform.)"""
    out = subprocess.run([str(Path(sys.executable).parent / "rayplane"), "features", "get",
                          "job_outcome", "--entity", "job_id=1.5", "--state-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.count("\n") == 1 and "job_id is an Int64 key" in out.stderr
