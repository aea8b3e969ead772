"""Fixtures the unit tests of several packages share: the seed pool catalog and the production
environment, loaded once per test module (a test may not change them; copy first)."""

from __future__ import annotations

import pytest

from raycluster.catalog import Catalog, load_catalog
from raycluster.environments import Environment, load_environment


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


@pytest.fixture(scope="module")
def env() -> Environment:
    return load_environment("production")
