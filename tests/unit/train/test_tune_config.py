"""The sweep spec: what train.tune varies and how a trial's training config is made."""

from __future__ import annotations

from pathlib import Path

import pytest

from raycluster.spec import SpecError
from train.tune import SweepConfig, report_steps, trial_config

REPO = Path(__file__).resolve().parents[3]
SWEEP = REPO / "train" / "configs" / "tune-ci.yaml"


def test_shipped_sweep_loads_and_resolves_its_base():
    sw = SweepConfig.load(SWEEP)
    assert Path(sw.base) == REPO / "train" / "configs" / "ci.yaml"
    cfg = sw.base_config(["storage_path=/tmp/s"])
    assert (cfg.steps, cfg.checkpoint_every) == (60, 20)
    assert report_steps(cfg) == 3
    assert sw.num_samples >= 4 and sw.points_to_evaluate


def test_trial_config_takes_the_proposal_and_a_core_share():
    cfg = SweepConfig.load(SWEEP).base_config(["storage_path=/tmp/s"])
    t = trial_config(cfg.to_dict(), {"lr": 0.002, "n_embd": 32, "n_layer": 1,
                                     "batch_size": 16}, "sweep-t1", threads=1)
    assert (t.name, t.lr, t.model.n_embd, t.model.n_layer, t.batch_size) == (
        "sweep-t1", 0.002, 32, 1, 16)
    assert t.threads_per_worker == 1 and t.mlflow.register_on_pass is False
    assert t.model.n_head == cfg.model.n_head and t.steps == cfg.steps


def test_bad_sweeps_name_the_field(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\nbase: {SWEEP.parent / 'ci.yaml'}\nsearch: {{lr: [0.1, 0.01]}}\n")
    with pytest.raises(SpecError, match=r"search\.lr: \(0\.1, 0\.01\) must be an increasing"):
        SweepConfig.load(path)
    path.write_text(f"name: s\nbase: {SWEEP.parent / 'ci.yaml'}\n"
                    "points_to_evaluate: [{lr: 0.01}]\n")
    with pytest.raises(SpecError, match=r"points_to_evaluate\[0\]: .* must give exactly "
                                        r"batch_size, lr, n_embd, n_layer"):
        SweepConfig.load(path)
    path.write_text("name: s\nbase: nowhere.yaml\n")
    with pytest.raises(SpecError, match=r"base: 'nowhere.yaml' is not a file"):
        SweepConfig.load(path)
    path.write_text(f"name: s\nbase: {SWEEP.parent / 'ci.yaml'}\nreduction_factr: 3\n")
    with pytest.raises(SpecError, match=r"did you mean 'reduction_factor'"):
        SweepConfig.load(path)
