"""The integration tests' helpers: the session platform's fixtures live in
tests/support/platform.py (shared with tests/reliability); these names stay importable here."""

from tests.support.platform import REPO, drop_postgres_data, ray_job_submit, rayplane

__all__ = ["REPO", "drop_postgres_data", "ray_job_submit", "rayplane"]
