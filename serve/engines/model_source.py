"""Fetch a served model's folder from where its config says: the MLflow registry
(``models:/NAME/VERSION`` or ``@alias``), a run's artifacts (``runs:/``), S3 (``s3://``, through
MLflow's S3 artifact repository, so ``MLFLOW_S3_ENDPOINT_URL`` and the pod's IAM role apply), or
a local folder (used in place). Both engines load from here: the CPU model deployment at
replica start, the vLLM download callback on the node before vLLM starts."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from serve.config import SourceKind, source_kind
from serve.engines.base import EngineError

logger = logging.getLogger(__name__)


def fetch_model(source: str, *, tracking_uri: str | None = None,
                cache_dir: str | Path | None = None) -> Path:
    """A local folder holding the model of ``source`` (downloaded into a fresh folder under
    ``cache_dir``, so concurrent replicas never write the same files)."""
    kind = source_kind(source)
    if kind is SourceKind.folder:
        path = Path(source).expanduser()
        if not (path / "config.json").is_file():
            raise EngineError(f"model folder {source!r} has no config.json", status=500,
                              type="server_error", code="model_not_loadable")
        return path
    import mlflow.artifacts

    root = Path(cache_dir or os.environ.get("RAYPLANE_MODEL_CACHE",
                                            Path(tempfile.gettempdir()) / "rayplane-models"))
    root.mkdir(parents=True, exist_ok=True)
    dest = tempfile.mkdtemp(prefix="model-", dir=root)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    logger.info("downloading %s into %s (tracking %s)", source, dest, uri)
    local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=dest,
                                                tracking_uri=uri)
    path = Path(local)
    # A registered model's artifact may hold the folder one level down (an MLflow model
    # logged with its files under a sub-path): the model folder is the one with config.json.
    if not (path / "config.json").is_file():
        found = sorted(p.parent for p in path.rglob("config.json"))
        if not found:
            raise EngineError(f"{source!r} holds no Hugging Face model folder (no config.json)",
                              status=500, type="server_error", code="model_not_loadable")
        path = found[0]
    return path


__all__ = ["fetch_model"]
