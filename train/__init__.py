"""rayplane's training layer: Ray Train / Tune entrypoints for the platform's own model.

``python -m train.fit --config train/configs/demo.yaml`` trains, evaluates and registers;
``python -m train.tune --config train/configs/tune-ci.yaml`` sweeps; ``rayplane models``
manages the registry. Teams running their own ``train_func`` use ``preflight``,
``trainer``/``run_config``/``scaling_config`` and ``rank0_metrics`` (docs/training.md).
"""

from train.config import (
    DataSpec,
    EvalSpec,
    MLflowSpec,
    ModelSize,
    TrainConfig,
    WandbSpec,
    scaling_config,
    use_gpu,
    worker_resources,
)
from train.platform import (
    Placement,
    preflight,
    rank0_metrics,
    run_config,
    start_mlflow_run,
    trainer,
)

__all__ = [
    "DataSpec",
    "EvalSpec",
    "MLflowSpec",
    "ModelSize",
    "Placement",
    "TrainConfig",
    "WandbSpec",
    "preflight",
    "rank0_metrics",
    "run_config",
    "scaling_config",
    "start_mlflow_run",
    "trainer",
    "use_gpu",
    "worker_resources",
]
