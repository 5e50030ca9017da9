"""PostgreSQL store (production), over asyncpg.

Each unit of work runs SERIALIZABLE and is re-run, a bounded number of times, when
PostgreSQL reports a serialization failure, a deadlock or a unique violation caused by a
concurrent writer: that is what makes concurrent ingest of the same batch book each intent
once. SQL arrives with ``?`` placeholders and is translated to ``$n`` once per statement.
"""

import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

import asyncpg

from cloud.schema import create as create_schema
from cloud.store import Row, StoreConflict

T = TypeVar("T")
TX_ATTEMPTS_MAX: Final = 8
POOL_CONNECTIONS_MAX: Final = 4
COMMAND_TIMEOUT_S: Final = 30.0
CONNECT_TIMEOUT_S: Final = 10.0
ACQUIRE_TIMEOUT_S: Final = 30.0
_RETRY = (
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
    asyncpg.UniqueViolationError,
)
_QMARK: Final = re.compile(r"\?")
_sql_cache: dict[str, str] = {}


def to_dollar(sql: str) -> str:
    out = _sql_cache.get(sql)
    if out is None:
        counter = iter(range(1, 1_000_000))
        out = _QMARK.sub(lambda _: f"${next(counter)}", sql)
        _sql_cache[sql] = out
    return out


class PgTx:
    dialect = "postgresql"

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        status: str = await self._conn.execute(to_dollar(sql), *params)
        last = status.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else 0

    async def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        if rows:
            await self._conn.executemany(to_dollar(sql), [tuple(r) for r in rows])

    async def insert_rows(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[object]]
    ) -> None:
        if rows:
            await self._conn.copy_records_to_table(table, columns=list(columns), records=rows)

    async def fetchone(self, sql: str, params: Sequence[object] = ()) -> Row | None:
        row: Row | None = await self._conn.fetchrow(to_dollar(sql), *params)
        return row

    async def fetchall(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        return list(await self._conn.fetch(to_dollar(sql), *params))


class PgStore:
    dialect = "postgresql"

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, dsn: str, *, schema: str | None = None) -> "PgStore":
        settings = {"search_path": schema} if schema else {}
        pool = await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=POOL_CONNECTIONS_MAX,
            command_timeout=COMMAND_TIMEOUT_S,
            timeout=CONNECT_TIMEOUT_S,
            server_settings=settings,
        )
        store = cls(pool)
        try:
            await store.transact(_create)
        except BaseException:
            await store.close()
            raise
        return store

    async def transact(self, fn: Callable[[PgTx], Awaitable[T]]) -> T:
        for _ in range(TX_ATTEMPTS_MAX):
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
                try:
                    async with conn.transaction(isolation="serializable"):
                        return await fn(PgTx(conn))
                except _RETRY:
                    continue
        raise StoreConflict(f"transaction conflicted {TX_ATTEMPTS_MAX} times")

    async def close(self) -> None:
        await self._pool.close()


async def _create(tx: PgTx) -> None:
    # Concurrent CREATE TABLE IF NOT EXISTS can still collide in the catalog: serialize it.
    await tx.execute("SELECT pg_advisory_xact_lock(8461)")
    await create_schema(tx, blob="BYTEA", integer="BIGINT")
