"""Fixtures of the pipeline tests: PostgreSQL as the cloud tests get it (``pg_dsn`` from
``FOGPAY_TEST_PG_DSN`` or a throwaway cluster; skipped without one, failing under CI)."""

import gc
from collections.abc import Iterator

import pytest

from tests.cloud.conftest import pg_dsn

__all__ = ["pg_dsn"]


@pytest.fixture(autouse=True)
def collect_garbage() -> Iterator[None]:
    """A leaked socket or transport fails the test that leaked it (filterwarnings = error),
    not whichever test the garbage collector happens to run in."""
    yield
    gc.collect()
