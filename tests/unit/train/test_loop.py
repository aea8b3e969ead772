"""The pieces of the worker loop that decide what a resumed run trains on."""

from __future__ import annotations

import pytest

from train.config import TrainConfig
from train.loop import IGNORE, batch_indices, collate, lr_at


def cfg(**over):
    base = {"name": "t", "model": {"n_layer": 1, "n_head": 1, "n_embd": 8}, "steps": 100,
            "lr": 1e-2, "warmup_steps": 10, "batch_size": 4, "checkpoint_every": 10,
            "storage_path": "/tmp/r"}
    return TrainConfig.parse({**base, **over})


def test_batches_depend_on_step_and_rank_only():
    a = batch_indices(1000, 8, seed=0, step=5, rank=0)
    assert list(a) == list(batch_indices(1000, 8, seed=0, step=5, rank=0))
    assert list(a) != list(batch_indices(1000, 8, seed=0, step=6, rank=0))
    assert list(a) != list(batch_indices(1000, 8, seed=0, step=5, rank=1))
    assert len(set(a)) == 8
    assert len(batch_indices(3, 8, 0, 1, 0)) == 3


def test_schedule_warms_up_then_decays_to_the_floor():
    c = cfg()
    assert lr_at(c, 1) == pytest.approx(1e-3)
    assert lr_at(c, 10) == pytest.approx(1e-2)
    assert lr_at(c, 55) < lr_at(c, 20)
    assert lr_at(c, 100) == pytest.approx(1e-2 * c.min_lr_ratio)


def test_collate_pads_and_masks_labels():
    x, a, y = collate([[5, 6, 7], [8]], [[0, 1, 1], [1]], pad_id=0)
    assert x.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert a.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert y.tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
