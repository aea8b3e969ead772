"""bench/serve_levers.py's two sides of a lever: they differ in exactly what the lever names,
and bad input is one line before anything is deployed (no cluster)."""

from __future__ import annotations

import pytest

from bench.guard import Fail
from bench.serve_levers import RAY_DEFAULTS, main, parse_args, variants
from serve.builder import SERVE_REPLICA_ENV


def sides(tmp_path, *argv: str):
    return variants(parse_args(list(argv)), tmp_path)


@pytest.mark.parametrize(("lever", "key", "value"), [
    ("user-code-on-loop", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "0"),
    ("grpc-handles", "RAY_SERVE_USE_GRPC_BY_DEFAULT", "1"),
    ("log-buffer", "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE", "1000"),
])
def test_a_serve_lever_changes_one_setting_from_rays_defaults(tmp_path, lever, key, value):
    before, after, what = sides(tmp_path, "--lever", lever)
    assert before.env == RAY_DEFAULTS  # measured alone, whatever rayplane renders
    assert {k for k in after.env if after.env[k] != before.env.get(k)} == {key}
    assert after.env[key] == value and lever in what
    assert before.source_path is None and after.source_path is None


def test_rayplanes_own_settings_are_a_lever_too(tmp_path):
    before, after, _ = sides(tmp_path, "--lever", "rayplane-serve-env")
    assert before.env == RAY_DEFAULTS
    assert SERVE_REPLICA_ENV.items() <= after.env.items()


def test_model_fields_and_extra_env_reach_their_side_only(tmp_path):
    before, after, _ = sides(tmp_path, "--before-model", "stream_interval_ms=50",
                             "--after-model", "stream_interval_ms=100", "--after-env", "X=1")
    assert (before.model, after.model) == ({"stream_interval_ms": 50},
                                           {"stream_interval_ms": 100})
    assert (before.env, after.env) == ({}, {"X": "1"})


@pytest.mark.parametrize(("argv", "message"), [
    (["--before-env", "NOEQUALS"], "serve_levers: --before-env: 'NOEQUALS' is not KEY=VALUE"),
    ([], "serve_levers: nothing differs"),
    (["--before-ref", "no-such-revision"], "serve_levers: --before-ref no-such-revision: "),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, argv, message):
    with pytest.raises(Fail, match=f"^{message}"):
        sides(tmp_path, *argv)
    assert main([*argv, "--state-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
