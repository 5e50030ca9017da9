"""Fixtures of the pipeline tests: PostgreSQL as the cloud tests get it (``pg_dsn`` from
``FOGPAY_TEST_PG_DSN`` or a throwaway cluster; skipped without one, failing under CI); ``pipe``,
a pipeline on a SQLite cloud store and the tests' amqtt broker (a module needing another
broker defines its own)."""

import gc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cloud.sqlitestore import SqliteStore
from tests.cloud.conftest import pg_dsn
from tests.conftest import BrokerEndpoint
from tests.pipeline.world import Pipeline

__all__ = ["pg_dsn"]


@pytest.fixture(autouse=True)
def collect_garbage() -> Iterator[None]:
    """A leaked socket or transport fails the test that leaked it (filterwarnings = error),
    not whichever test the garbage collector happens to run in."""
    yield
    gc.collect()


@pytest.fixture
async def pipe(tmp_path: Path, amqtt_broker: BrokerEndpoint) -> AsyncIterator[Pipeline]:
    store = await SqliteStore.open(str(tmp_path / "cloud.db"))
    yield Pipeline(store, amqtt_broker, tmp_path)
    await store.close()
