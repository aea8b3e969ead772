"""tests/reliability: faults and hostile input against the session's platform (the fixtures of
tests/support/platform.py). The log scan reads what every other test made the platform
write, so it runs last in the session."""

from __future__ import annotations

import pytest

LAST = "test_no_secrets_in_logs.py"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A hook in a sub-folder's conftest receives the whole session's items: this also puts the
    # scan after tests/integration and tests/unit when they run in the same session.
    last = [i for i in items if i.path.name == LAST]
    items[:] = [i for i in items if i.path.name != LAST] + last
