"""Fixtures: every store test runs against SQLite and against a real PostgreSQL server.

PostgreSQL comes from ``FOGPAY_TEST_PG_DSN`` (``.ci/run`` starts a cluster and sets it) or,
locally, from a throwaway cluster this session starts when ``initdb``/``pg_ctl`` exist.
Without either, PostgreSQL tests skip (one reason: how to install it), except under CI
(``CI=true``), where they fail.
"""

import os
import secrets
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from cloud import ledger, pgcluster
from cloud.pgstore import PgStore
from cloud.sqlitestore import SqliteStore
from cloud.store import Store
from tests.cloud.world import World
from tests.conftest import POSTGRES_MISSING, missing_service

PG_DSN_ENV = "FOGPAY_TEST_PG_DSN"


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    dsn = os.environ.get(PG_DSN_ENV)
    if dsn:
        yield dsn
        return
    if not pgcluster.available():
        missing_service(POSTGRES_MISSING)
    cluster = pgcluster.start_cluster()
    try:
        yield cluster.dsn
    finally:
        cluster.stop()


async def pg_schema_store(dsn: str) -> tuple[PgStore, str]:
    """A PgStore in a fresh schema of its own (tests never share tables)."""
    schema = f"t_{secrets.token_hex(6)}"
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
    finally:
        await conn.close()
    return await PgStore.open(dsn, schema=schema), schema


async def drop_schema(dsn: str, schema: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request: pytest.FixtureRequest, tmp_path: object) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        s: Store = await SqliteStore.open(str(tmp_path) + "/cloud.db")
        yield s
        await s.close()
        return
    dsn = request.getfixturevalue("pg_dsn")
    pg, schema = await pg_schema_store(dsn)
    yield pg
    await pg.close()
    await drop_schema(dsn, schema)


@pytest.fixture
async def world(store: Store) -> AsyncIterator[World]:
    """A world on a fresh store; after the test, the books must still balance."""
    w = World(store)
    yield w
    check = await store.transact(ledger.check)
    assert check.ok, f"ledger out of balance after the test: {check}"
