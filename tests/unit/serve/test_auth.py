"""API keys (serve/auth.py): kept only as SHA-256 digests, compared in constant time with every
stored digest, mapped to their tenant, rotated by rewriting the file, and never written to a
log. The keys here are test fixtures, not secrets."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import pickle

import pytest

from serve import auth
from serve.auth import ApiKeyStore, Principal, authorize, key_id

KEY = "rp-test-default-0123456789"  # pragma: allowlist secret
TENANT_A = "rp-test-tenant-a-0123456789"  # pragma: allowlist secret
TENANT_B = "rp-test-tenant-b-0123456789"  # pragma: allowlist secret
ALL = (KEY, TENANT_A, TENANT_B)


@pytest.fixture()
def files(tmp_path, monkeypatch):
    monkeypatch.setattr(auth, "RELOAD_CHECK_S", 0.0)
    default, a = tmp_path / "api_key", tmp_path / "tenant-a"
    default.write_text(f"# the platform's key\n{KEY}\n\n")
    a.write_text(TENANT_A + "\n")
    monkeypatch.setenv("TEST_TENANT_B_KEYS", f" {TENANT_B} ,")
    return {"default": default, "a": a}


def store(files) -> ApiKeyStore:
    return ApiKeyStore(file=str(files["default"]), tenants=[
        {"name": "a", "api_keys": {"file": str(files["a"])}},
        {"name": "b", "api_keys": {"env": "TEST_TENANT_B_KEYS"}}])


def test_keys_map_to_their_tenant_or_to_their_digest(files):
    s = store(files)
    assert s.identify(TENANT_A) == Principal("a", "a")
    assert s.identify(TENANT_B) == Principal("b", "b")
    digest = hashlib.sha256(KEY.encode()).digest()
    assert s.identify(KEY) == Principal("key-" + digest.hex()[:8], None) == \
        Principal(key_id(digest), None)
    assert s.identify("rp-wrong") is None and s.identify("") is None
    assert s.valid(KEY) and not s.valid(KEY + " ")
    assert s.tenants == ["a", "b"]


def test_the_store_holds_digests_never_keys(files):
    s = store(files)
    raw = pickle.dumps(s)
    for key in ALL:
        assert key.encode() not in raw
        assert hashlib.sha256(key.encode()).digest() in raw
    assert not any(key in repr(vars(s)) for key in ALL)


def test_every_digest_is_compared_in_constant_time_whichever_matches(files, monkeypatch):
    calls = []
    real = hmac.compare_digest

    def compare(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", compare)
    s = store(files)
    for key in (*ALL, "rp-unknown"):
        calls.clear()
        s.identify(key)
        assert calls == [(32, 32)] * 3  # no early exit, digests only


def test_a_tenants_key_listed_in_api_keys_too_is_the_tenants(files):
    files["default"].write_text(f"{KEY}\n{TENANT_A}\n")
    assert store(files).identify(TENANT_A) == Principal("a", "a")


def test_two_tenants_holding_one_key_refuse_to_start_without_naming_it(files, monkeypatch):
    monkeypatch.setenv("TEST_TENANT_B_KEYS", TENANT_A)
    with pytest.raises(ValueError) as err:
        store(files)
    assert "tenants 'a' and 'b' hold the same API key" in str(err.value)
    assert TENANT_A not in str(err.value)


def test_no_key_at_all_refuses_to_serve(tmp_path):
    with pytest.raises(RuntimeError, match="no API keys found"):
        ApiKeyStore(file=str(tmp_path / "missing"), env="TEST_UNSET_KEYS_VAR")


def test_rotation_applies_a_rewritten_file_and_refuses_a_bad_one(files, caplog):
    s = store(files)
    new = "rp-test-rotated-0123456789"  # pragma: allowlist secret
    files["a"].write_text(new + "\n")
    os.utime(files["a"], (1, 1))  # a new mtime, whatever the clock's resolution
    assert s.identify(new) == Principal("a", "a")
    assert s.identify(TENANT_A) is None
    # A rewrite that gives tenant a tenant b's key is not applied; the old keys stay.
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        files["a"].write_text(TENANT_B + "\n")
        os.utime(files["a"], (2, 2))
        assert s.identify(new) == Principal("a", "a")
    assert "were not applied" in caplog.text
    assert TENANT_B not in caplog.text


def test_a_tenant_without_keys_is_logged_by_name(tmp_path, files, caplog):
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        s = ApiKeyStore(file=str(files["default"]), tenants=[
            {"name": "empty", "api_keys": {"file": str(tmp_path / "none")}}])
    assert "tenant empty: no API keys" in caplog.text
    assert s.valid(KEY)


def test_authorize_answers_openais_401_bodies(files):
    s = store(files)
    assert authorize(s, f"Bearer {TENANT_A}") == (Principal("a", "a"), None)
    assert authorize(s, f"bearer  {TENANT_A} ")[0] == Principal("a", "a")
    for header, code in [("", "missing_api_key"), (TENANT_A, "missing_api_key"),
                         ("Basic abc", "missing_api_key"), ("Bearer ", "missing_api_key"),
                         ("Bearer rp-nope", "invalid_api_key")]:
        principal, body = authorize(s, header)
        assert principal is None
        assert body["error"]["type"] == "authentication_error" and body["error"]["code"] == code
        assert "rp-nope" not in body["error"]["message"]


def test_nothing_the_store_logs_shows_a_key(files, caplog):
    with caplog.at_level(logging.DEBUG):
        s = store(files)
        for key in (*ALL, "rp-unknown-key-123"):
            authorize(s, f"Bearer {key}")
        files["default"].write_text("")
        os.utime(files["default"], (3, 3))
        s.identify(KEY)
    for key in (*ALL, "rp-unknown-key-123"):
        assert key not in caplog.text
