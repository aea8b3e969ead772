"""The platform's feature store (Feast, issue 17): a feature repository describing the
platform's own jobs and pools, its offline store on Ray, its online store in PostgreSQL.

- :mod:`features.data`: the seeded generator of the platform's history (nothing downloaded);
- :mod:`features.repo`: the Feast objects (entities, feature views, the feature service);
- :mod:`features.store`: the ``feature_store.yaml`` locally and on EKS, ``feature_store()``;
- :mod:`features.training`: point-in-time training data as a ``ray.data.Dataset``;
- :mod:`features.online`: online features for serving and the agents' tools;
- :mod:`features.jobs`: the Ray-job entrypoint of ``rayplane features apply|materialize``.

The names here are the public surface; Feast is imported only when a store is used.
"""

from features.data import PlatformHistory, generate, write
from features.repo import FEATURE_SERVICE, FEATURE_VIEWS, POOLS, feature_objects
from features.store import feature_store, repo_config_yaml
from features.training import FEATURE_COLUMNS, LABEL_COLUMNS, training_dataset

__all__ = ["FEATURE_COLUMNS", "FEATURE_SERVICE", "FEATURE_VIEWS", "LABEL_COLUMNS", "POOLS",
           "PlatformHistory", "feature_objects", "feature_store", "generate",
           "repo_config_yaml", "training_dataset", "write"]
