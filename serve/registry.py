"""A serve config's model sources checked against where they live, before a deploy.

:func:`pin_versions` turns ``models:/NAME@alias`` into the version the alias points at now
(``models:/NAME/VERSION``), so that promoting a new version and redeploying changes the config
and Serve rolls the replicas; :func:`check_sources` refuses a local folder that is no model
folder. Both raise a :class:`~raycluster.spec.SpecError` naming the field.
"""

from __future__ import annotations

from pathlib import Path

from raycluster.spec import SpecError, did_you_mean
from serve.config import EngineKind, ServeAppConfig, SourceKind, parse_registry_ref


def pin_versions(config: ServeAppConfig, tracking_uri: str | None = None) -> ServeAppConfig:
    """A copy of ``config`` whose ``models:/NAME@alias`` sources name the version the alias
    points at now, read from the MLflow server at ``tracking_uri`` (default: the config's
    ``mlflow_tracking_uri``, then MLflow's own ``MLFLOW_TRACKING_URI``). A missing model or
    alias is a SpecError naming the field, the models or aliases there are."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri or config.mlflow_tracking_uri)
    pinned = config.model_copy(deep=True)
    for i, m in enumerate(pinned.models):
        if m.source_kind is not SourceKind.registry:
            continue
        name, alias, version = parse_registry_ref(m.source)
        field = f"models[{i}].source"
        try:
            if alias:
                version = client.get_model_version_by_alias(name, alias).version
            else:
                client.get_model_version(name, version)
        except MlflowException as err:
            raise SpecError(_registry_error(client, field, m.source, name, alias, err),
                            field=field) from None
        m.source = f"models:/{name}/{version}"
    return pinned


def check_sources(config: ServeAppConfig) -> None:
    """Refuse a local folder that is not a model folder before anything is deployed. An
    openai-upstream model's source is only its card's ``root``: its server has the weights."""
    for i, m in enumerate(config.models):
        if m.source_kind is SourceKind.folder and m.engine is not EngineKind.openai_upstream:
            path = Path(m.source)
            if not (path / "config.json").is_file():
                raise SpecError(f"models[{i}].source: {m.source!r} is not a Hugging Face "
                                "model folder (no config.json)", field=f"models[{i}].source")


def _registry_error(client, field: str, source: str, name: str, alias: str | None,
                    err: Exception) -> str:
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException:
        try:
            names = sorted(r.name for r in client.search_registered_models(max_results=50))
        except MlflowException:
            names = []
        return (f"{field}: {source!r}: no registered model {name!r}{did_you_mean(name, names)}"
                f"; registered: {', '.join(names) or 'none'}")
    if alias:
        aliases = sorted(getattr(model, "aliases", {}) or {})
        return (f"{field}: {source!r}: model {name!r} has no alias {alias!r}; aliases: "
                f"{', '.join(aliases) or 'none'}")
    return f"{field}: {source!r}: {err.message if hasattr(err, 'message') else err}"


__all__ = ["check_sources", "pin_versions"]
