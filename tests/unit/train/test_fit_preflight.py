"""Bad input to train.fit / train.tune: one line naming the field, exit 2, before any Ray
worker (or Ray itself) starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from raycluster.catalog import load_catalog
from train import fit, tune

REPO = Path(__file__).resolve().parents[3]
CI = str(REPO / "train" / "configs" / "ci.yaml")


def run_main(main, argv, capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def one_line(err: str) -> str:
    assert err.count("\n") == 0, err
    assert "Traceback" not in err
    return err


def test_unknown_pool(capsys, tmp_path):
    code, err = run_main(fit.main, ["--config", CI, "--set", "pool=a100-migg",
                                    "--set", f"storage_path={tmp_path}"], capsys)
    assert code == 2
    assert one_line(err).startswith("error: pool: 'a100-migg' is not a pool (did you mean "
                                     "'a100-mig'?)")


def test_more_workers_than_the_pool_holds(capsys, tmp_path):
    code, err = run_main(fit.main, ["--config", CI, "--set", "pool=h100-timeslice",
                                    "--set", "num_workers=500",
                                    "--set", f"storage_path={tmp_path}"], capsys)
    assert code == 2
    pool = load_catalog().pool("h100-timeslice")
    assert one_line(err).startswith(
        "error: num_workers: 500 is more than pool 'h100-timeslice' can hold "
        f"({pool.max_workers} = {pool.workers_per_node} workers per node x {pool.max_nodes} nodes)")


def test_missing_data_path(capsys, tmp_path):
    missing = tmp_path / "no-data"
    code, err = run_main(fit.main, ["--config", CI, "--set", f"data_path={missing}",
                                    "--set", f"storage_path={tmp_path}"], capsys)
    assert code == 2
    assert one_line(err).startswith(f"error: data_path: '{missing}' is not a folder")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train.jsonl").write_text("")
    code, err = run_main(fit.main, ["--config", CI, "--set", f"data_path={tmp_path / 'half'}",
                                    "--set", f"storage_path={tmp_path}"], capsys)
    assert code == 2 and "lacks val.jsonl, heldout.jsonl" in one_line(err)


def test_mlflow_server_down_names_the_uri(capsys, tmp_path, dead_mlflow, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead_mlflow)
    code, err = run_main(fit.main, ["--config", CI, "--set", f"storage_path={tmp_path}"],
                         capsys)
    assert code == 2
    assert one_line(err).startswith(f"error: mlflow.tracking_uri: no MLflow server answers at "
                                    f"{dead_mlflow}")


def test_tune_refuses_a_bad_search_space(capsys, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"name: s\nbase: {CI}\nsearch: {{n_embd: [31]}}\n")
    code, err = run_main(tune.main, ["--config", str(sweep), "--set-base",
                                     f"storage_path={tmp_path}"], capsys)
    assert code == 2
    assert one_line(err) == ("error: search.n_embd: 31 is not a multiple of the base config's "
                             "model.n_head (2)")


def test_the_module_exits_2_with_one_line(tmp_path, dead_mlflow):
    env = {"PATH": "/usr/bin:/bin", "MLFLOW_TRACKING_URI": dead_mlflow, "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "train.fit", "--config", CI, "--set",
                           "lr=-1"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("ci.yaml: lr: -1: Input should be greater than 0")
    assert one_line(proc.stderr.strip())
