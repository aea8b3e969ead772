"""Fixtures of the serve unit tests: one tiny trained model folder per machine."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from tests.support.tiny_model import cached_tiny_model

    return cached_tiny_model("1")
