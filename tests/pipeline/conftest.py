"""Fixtures of the pipeline tests: PostgreSQL as the cloud tests get it (``pg_dsn`` from
``FOGPAY_TEST_PG_DSN`` or a throwaway cluster; skipped without one, failing under CI)."""

from tests.cloud.conftest import pg_dsn

__all__ = ["pg_dsn"]
