"""The Keras train function of ``train.duration``: one Ray Train worker's side.

Each worker runs ``tf.distribute.MultiWorkerMirroredStrategy`` (Ray's TensorflowTrainer sets
``TF_CONFIG`` for the group), reads its shard of the training rows from
``ray.train.get_dataset_shard("train")`` each epoch, and takes synchronous steps: gradients
are all-reduced across workers, so every replica holds the same weights.

Why a custom step and not ``model.fit``: Keras 3 (3.15 here) cannot ``fit`` under
``MultiWorkerMirroredStrategy``; its ``_maybe_symbolic_build`` reduces the first
distributed batch with ``axis=None``, which the collective all-reduce refuses ("Attempt to
convert a value (PerReplica...)", keras-team/keras#20585, open). The model, its layers, the
optimizer and the ``.keras`` file are Keras 3; the step is ``strategy.run`` +
``GradientTape`` + ``optimizer.apply_gradients``, which the strategy supports. ``import
keras``, never ``tf.keras``: Ray sets ``TF_USE_LEGACY_KERAS=1`` in its TF workers, which makes
``tf.keras`` look for the separate Keras 2 package.

Every epoch rank 0 writes ``model.keras`` (weights and optimizer state), ``features.json``
and ``state.json`` (epoch, metrics, restarts) into a ``ray.train.Checkpoint``; a restarted
worker group (``FailureConfig``) or a re-submission of the same run name resumes from
``ray.train.get_checkpoint()`` at the next epoch.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from train.duration_model import (
    FEATURES_FILE,
    MODEL_FILE,
    NUMERIC_INPUT,
    POOL_INPUT,
    FeatureSpec,
    decode,
    encode,
    encode_targets,
)
from train.tracking import PENDING_METRICS, read_pending

STATE_FILE = "state.json"


def checkpoint_name(epoch: int) -> str:
    """The checkpoint folder of ``epoch`` in the run's storage (sorts by epoch)."""
    return f"checkpoint_epoch_{epoch:04d}"


def say(msg: str) -> None:
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def build_model(spec: FeatureSpec, mean: list[float], variance: list[float],
                hidden: list[int], lr: float, seed: int):
    """The regressor: raw numeric features -> Normalization (the train split's mean and
    variance, computed once by the driver so every replica starts identical) -> concat with
    the pool one-hot -> Dense stack -> one log1p output per target."""
    import keras

    keras.utils.set_random_seed(seed)
    numeric = keras.Input((len(spec.columns),), name=NUMERIC_INPUT)
    pool = keras.Input((len(spec.pools),), name=POOL_INPUT)
    x = keras.layers.Normalization(mean=mean, variance=variance, name="normalize")(numeric)
    x = keras.layers.Concatenate()([x, pool])
    for i, units in enumerate(hidden):
        x = keras.layers.Dense(units, activation="relu", name=f"hidden_{i}")(x)
    outputs = {t: keras.layers.Dense(1, name=t)(x) for t in spec.targets}
    model = keras.Model({NUMERIC_INPUT: numeric, POOL_INPUT: pool}, outputs,
                        name="job_duration")
    # compile() only attaches the optimizer, so model.keras carries its state for resume.
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


def resume_state(config: dict[str, Any]) -> tuple[dict[str, Any], Path | None]:
    """What the last checkpoint says (epoch 0 when there is none) and its folder, with the
    restart/resubmission counts advanced: the same submission seeing a checkpoint means Ray
    restarted the worker group; another submission means the run name was submitted again."""
    import ray.train

    state = {"epoch": 0, "restarts": 0, "resubmissions": 0, "submission": config["submission"]}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return state, None
    folder = Path(tempfile.mkdtemp(prefix="rayplane-duration-resume-"))
    with checkpoint.as_directory() as src:
        for name in (MODEL_FILE, STATE_FILE, FEATURES_FILE, PENDING_METRICS):
            if name == PENDING_METRICS and not (Path(src) / name).is_file():
                continue  # written only while MLflow was not answering
            (folder / name).write_bytes((Path(src) / name).read_bytes())
    saved = json.loads((folder / STATE_FILE).read_text())
    same = saved.get("submission") == config["submission"]
    state.update(epoch=int(saved["epoch"]),
                 restarts=int(saved.get("restarts", 0)) + (1 if same else 0),
                 resubmissions=int(saved.get("resubmissions", 0)) + (0 if same else 1))
    return state, folder


def shard_batches(shard, spec: FeatureSpec, batch_size: int, seed: int):
    """This worker's shard as (inputs, targets) batches of exactly ``batch_size`` rows.
    Ray splits the rows equally (DataConfig's streaming_split(equal=True)) and the remainder
    is dropped, so every worker takes the same number of steps, as collectives require."""
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy",
                                    drop_last=True, local_shuffle_buffer_size=4 * batch_size,
                                    local_shuffle_seed=seed):
        yield encode(batch, spec), encode_targets(batch, spec)


def load_validation(dataset, spec: FeatureSpec) -> dict[str, Any]:
    """The validation rows as arrays, read once: they are few, and a Ray Data pass per
    epoch would cost more than the evaluation itself."""
    parts = [(encode(b, spec), encode_targets(b, spec),
              np.stack([np.asarray(b[t], dtype=np.float64) for t in spec.targets], 1))
             for b in dataset.iter_batches(batch_size=4096, batch_format="numpy")]
    return {"inputs": {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]},
            "targets": np.concatenate([p[1] for p in parts]),
            "seconds": np.concatenate([p[2] for p in parts])}


def evaluate(model, val: dict[str, Any], spec: FeatureSpec,
             baseline: dict[str, float]) -> dict[str, float]:
    """Validation metrics: log-space MSE (``val_loss``) and MAE in seconds per target, with
    the mean baseline's MAE and the relative improvement over it."""
    # A plain call: predict() under the strategy all-gathers across workers, and only
    # rank 0 evaluates (the others would never join the collective).
    out = {t: np.asarray(v) for t, v in model(val["inputs"], training=False).items()}
    logs = np.concatenate([out[t].reshape(-1, 1) for t in spec.targets], 1)
    errors = np.abs(decode(out, spec) - val["seconds"]).mean(axis=0)
    means = np.array([baseline[f"train_mean_{t}"] for t in spec.targets])
    base = np.abs(means - val["seconds"]).mean(axis=0)
    metrics = {"val_loss": float(np.mean((logs - val["targets"]) ** 2)),
               "val_rows": float(len(logs))}
    for i, t in enumerate(spec.targets):
        metrics[f"val_mae_{t}"] = float(errors[i])
        metrics[f"baseline_mae_{t}"] = float(base[i])
        metrics[f"improvement_{t}"] = float(1.0 - errors[i] / base[i]) if base[i] else 0.0
    return metrics


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train function; ``config``: cfg (DurationConfig.to_dict()), spec (FeatureSpec
    fields), mean/variance (numeric columns, train split), baseline, submission,
    tracking_uri, mlflow_run_id."""
    import ray.train

    cfg = config["cfg"]
    threads = int(cfg["threads_per_worker"])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    # The pools' workers share a node's cores: one TF thread pool per worker, sized by config.
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    spec = FeatureSpec(tuple(config["spec"]["columns"]), tuple(config["spec"]["pools"]))
    state, folder = resume_state(config)
    resumed_from = state["epoch"] if folder is not None else None
    with strategy.scope():
        if folder is not None:
            model = keras.saving.load_model(folder / MODEL_FILE)
        else:
            model = build_model(spec, config["mean"], config["variance"], cfg["hidden"],
                                cfg["lr"], cfg["seed"])
    optimizer = model.optimizer
    global_batch = cfg["batch_size"] * world

    def replica_step(inputs, targets):
        with tf.GradientTape() as tape:
            out = model(inputs, training=True)
            pred = tf.concat([out[t] for t in spec.targets], axis=1)
            per_row = tf.reduce_mean(tf.square(pred - targets), axis=1)
            loss = tf.nn.compute_average_loss(per_row, global_batch_size=global_batch)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    @tf.function
    def step(inputs, targets):
        return strategy.reduce("SUM", strategy.run(replica_step, args=(inputs, targets)),
                               axis=None)

    from train.platform import rank0_metrics

    sink = rank0_metrics(config)
    if folder is not None:
        sink.restore(read_pending(folder))  # what rank 0 could not send before the restart
    if folder is not None and state["restarts"]:
        say(f"[rank {rank}] worker restart {state['restarts']}: resuming from checkpoint "
            f"epoch {state['epoch']}")
    elif folder is not None:
        say(f"[rank {rank}] run {cfg['name']!r} re-submitted: continuing from checkpoint "
            f"epoch {state['epoch']}")
    if state["epoch"] and rank == 0:
        sink.log({"resumed_from_epoch": state["epoch"], "restarts": state["restarts"],
                  "resubmissions": state["resubmissions"]}, step=state["epoch"])
    if rank == 0:
        say(f"[rank 0] epochs {state['epoch'] + 1}..{cfg['epochs']} on {world} workers, "
            f"global batch {global_batch}")
    shard = ray.train.get_dataset_shard("train")
    val = load_validation(ray.train.get_dataset_shard("validation"), spec) if rank == 0 else None
    for epoch in range(state["epoch"] + 1, cfg["epochs"] + 1):
        started = time.perf_counter()
        losses = [float(step(x, y)) for x, y in shard_batches(
            shard, spec, cfg["batch_size"], cfg["seed"] * 100003 + epoch)]
        metrics = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else 0.0,
                   "steps": len(losses), "epoch_seconds": time.perf_counter() - started,
                   "restarts": state["restarts"], "resubmissions": state["resubmissions"]}
        if rank != 0:
            ray.train.report(metrics)
            continue
        # Rank 0 evaluates the full validation split (not split across workers).
        metrics.update(evaluate(model, val, spec, config["baseline"]))
        sink.log({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
        sink.flush()
        evaluated = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="rayplane-duration-ckpt-") as tmp:
            model.save(Path(tmp) / MODEL_FILE)
            (Path(tmp) / FEATURES_FILE).write_text(spec.to_json())
            (Path(tmp) / STATE_FILE).write_text(json.dumps({
                **metrics, "submission": state["submission"], "time": time.time(),
                "resumed_from_epoch": resumed_from}))
            sink.write_pending(tmp)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=checkpoint_name(epoch))
        say(f"[rank 0] epoch {epoch}/{cfg['epochs']}: train_loss {metrics['train_loss']:.4f} "
            f"val_loss {metrics['val_loss']:.4f} val MAE wait "
            f"{metrics['val_mae_queue_wait_s']:.0f}s duration "
            f"{metrics['val_mae_duration_s']:.0f}s (train {metrics['epoch_seconds']:.1f}s, "
            f"checkpoint + report {time.perf_counter() - evaluated:.1f}s)")
    sink.close()
