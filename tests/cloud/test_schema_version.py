"""The cloud database records its schema version and refuses one written by a newer fogpay,
on SQLite (a real file, reopened) and on a real PostgreSQL server (a schema, reopened)."""

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from cloud import ledger
from cloud.pgstore import PgStore
from cloud.schema import SCHEMA_VERSION, VERSION_KEY, SchemaError
from cloud.sqlitestore import SqliteStore
from cloud.store import Store, Tx
from tests.cloud.conftest import drop_schema, pg_schema_store
from tests.cloud.world import World


@dataclass
class Database:
    """One database, opened again through the store each time ``open`` is called, or read
    with a plain connection of its dialect (past the store's checks)."""

    open: Callable[[], Awaitable[Store]]
    read: Callable[[str], Awaitable[list[tuple[Any, ...]]]]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        path = str(tmp_path / "cloud.db")

        async def open_sqlite() -> Store:
            return await SqliteStore.open(path)

        async def read_sqlite(sql: str) -> list[tuple[Any, ...]]:
            conn = sqlite3.connect(path)
            try:
                return [tuple(r) for r in conn.execute(sql).fetchall()]
            finally:
                conn.close()

        yield Database(open_sqlite, read_sqlite)
        return
    dsn = request.getfixturevalue("pg_dsn")
    first, schema = await pg_schema_store(dsn)
    await first.close()

    async def open_pg() -> Store:
        return await PgStore.open(dsn, schema=schema)

    async def read_pg(sql: str) -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(dsn, timeout=10, server_settings={"search_path": schema})
        try:
            return [tuple(r) for r in await conn.fetch(sql)]
        finally:
            await conn.close()

    yield Database(open_pg, read_pg)
    await drop_schema(dsn, schema)


async def set_version(store: Store, value: str | None) -> None:
    async def w(tx: Tx) -> None:
        await tx.execute("DELETE FROM meta WHERE k = ?", (VERSION_KEY,))
        if value is not None:
            await tx.execute("INSERT INTO meta (k, v) VALUES (?, ?)", (VERSION_KEY, value))

    await store.transact(w)


VERSION_SQL = f"SELECT v FROM meta WHERE k = '{VERSION_KEY}'"


async def test_a_new_database_records_the_version_once(db: Database) -> None:
    store = await db.open()
    await store.close()
    assert await db.read(VERSION_SQL) == [(str(SCHEMA_VERSION),)]
    store = await db.open()  # reopening changes nothing
    await store.close()
    assert await db.read(VERSION_SQL) == [(str(SCHEMA_VERSION),)]


async def test_a_database_from_before_the_version_row_gets_it(db: Database) -> None:
    store = await db.open()
    await World(store).owner("alice")
    await set_version(store, None)  # as a fogpay wrote it before the row existed
    await store.close()
    assert await db.read(VERSION_SQL) == []
    store = await db.open()
    try:
        assert (await store.transact(ledger.check)).ok
    finally:
        await store.close()
    assert await db.read(VERSION_SQL) == [(str(SCHEMA_VERSION),)]
    assert await db.read("SELECT owner_id FROM owners") == [("alice",)]


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (str(SCHEMA_VERSION + 1), f"schema version {SCHEMA_VERSION + 1}; this fogpay knows"),
        ("0", "not a schema version"),
        ("two", "not a schema version"),
        ("\u00b2", "not a schema version"),  # a digit to str.isdigit, not to int()
    ],
)
async def test_an_unknown_version_is_refused_and_nothing_is_written(
    db: Database, value: str, words: str
) -> None:
    store = await db.open()
    await set_version(store, value)
    # a newer schema might have dropped a table this fogpay creates: it must stay dropped
    await store.transact(lambda tx: tx.execute("DROP TABLE settlement_lines"))
    await store.close()
    with pytest.raises(SchemaError, match=words):
        await db.open()
    assert await db.read(VERSION_SQL) == [(value,)]
    with pytest.raises((sqlite3.OperationalError, asyncpg.UndefinedTableError)):
        await db.read("SELECT COUNT(*) FROM settlement_lines")
