"""Cloud ingest partitioned by fog: which process books which fogs, over one PostgreSQL.

A region outgrows one ingest process by splitting its fogs into ``P`` partitions
(``partition_of``: the first 8 bytes of SHA-256 of the fog id, mod ``P``; the same in every
process and every run), each booked by one process at a time (``[service] partitions = P``,
``partition = i``; ``fogpay cloud run --partition i/P``). Every process subscribes to the same
filters and skips, in the reader, before anything is decoded, the batches of fogs outside
the partitions it holds. The process holding partition 0 is also the *control*: it alone
takes lease requests, lease reports, peer transfers and devices' held uploads, and publishes
the retained state other than the acks (each fog's ack is published by whoever holds its
fog's partition, so one process orders each retained ack topic). Those messages are few
(one per lease, not per payment) and touch owners across every partition, so they stay on
one process.

Who holds a partition: ``Claims`` holds PostgreSQL session-level advisory locks on one
dedicated connection (not the store's pool), keyed by the store's schema:

- ``(ns, 2i)``: partition ``i``. A process takes it with ``pg_try_advisory_lock``; it is
  released when the process releases it, closes the connection or dies (PostgreSQL ends a
  killed client's session and frees its locks).
- ``(ns, 2i + 1)``, held *shared*: "a live process has ``i`` as its home partition". Every
  process holds it for its home partition from start to stop.

Every ``partition_check_s`` a process tries to take its home partition if it does not hold
it (a second process configured for the same partition is a standby: it waits until the
first is gone); with ``takeover`` on, it takes any other partition whose lock has been free
and unwanted (no live home process) for ``TAKEOVER_CHECKS`` checks in a row, and hands a
partition it took over back as soon as its home process is alive again (it sees the shared
lock). What changes hands is only who books: the fogs resend what was not acked, and the new
holder publishes the acks of its new fogs (a full retained refresh).

The lock is for liveness and throughput, not for correctness: booking is correct whatever
the locks say. Every ingest transaction is SERIALIZABLE, a batch is booked once by the
``batches`` primary key ``(fog_id, number)`` and an intent once by ``transfers``' primary
key, and the owners' account and lease rows shared across partitions are updated by
``x = x + delta`` statements inside those transactions, which PostgreSQL serializes (the
loser of a conflict is rolled back and re-run by ``PgStore.transact``). So two processes that
both think they hold a partition (for at most one check, after a lock connection broke)
book nothing twice; ``tests/cloud/test_partition.py`` races two of them on one fog.
"""

import hashlib
import zlib
from dataclasses import dataclass, field
from typing import Any, Final

import structlog

log = structlog.get_logger()

TAKEOVER_CHECKS: Final = 3  # a foreign partition free this many checks in a row is taken
CONNECT_TIMEOUT_S: Final = 10.0
COMMAND_TIMEOUT_S: Final = 10.0
CONTROL: Final = 0  # the partition whose holder takes leases, transfers and held uploads


def partition_of(fog_id: str, partitions: int) -> int:
    """The partition of ``fog_id`` among ``partitions`` (stable across processes and runs)."""
    if partitions == 1:
        return 0
    digest = hashlib.sha256(fog_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % partitions


def namespace(schema: str) -> int:
    """The advisory locks' first key for a schema: two clouds in two schemas of one
    database (the tests do that) never share a lock."""
    return zlib.crc32(f"fogpay-partition:{schema}".encode()) & 0x7FFF_FFFF


@dataclass(slots=True)
class Changes:
    gained: set[int] = field(default_factory=set)
    release: set[int] = field(default_factory=set)  # to release (call ``release`` under lock)
    lost: bool = False  # the lock connection broke: nothing is held any more


class Claims:
    """The partition locks of one process (see the module docstring). ``poll()`` takes what
    it should and says what to hand back; the caller releases under its own lock (between
    two messages) with ``release``."""

    def __init__(self, dsn: str, *, partitions: int, home: int | None, takeover: bool) -> None:
        self.partitions, self.home, self.takeover = partitions, home, takeover
        self._dsn = dsn
        self._conn: Any = None
        self._ns = 0
        self.held: set[int] = set()
        self._free_for: dict[int, int] = {}  # foreign partition -> checks seen free in a row

    async def _connect(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(
            self._dsn, timeout=CONNECT_TIMEOUT_S, command_timeout=COMMAND_TIMEOUT_S
        )
        try:
            schema = await conn.fetchval("SELECT current_schema()")
            self._ns = namespace(str(schema))
            if self.home is not None:  # "a live process has this home": held shared
                await conn.execute(
                    "SELECT pg_advisory_lock_shared($1::int, $2::int)", self._ns, 2 * self.home + 1
                )
        except BaseException:
            await conn.close()
            raise
        self._conn = conn

    async def _others(self) -> set[int]:
        """The second keys of this namespace's advisory locks held by other sessions."""
        rows = await self._conn.fetch(
            "SELECT objid::bigint FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 "
            "AND granted AND classid::bigint = $1 AND pid <> pg_backend_pid() AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())",
            self._ns,
        )
        return {int(r[0]) for r in rows}

    async def _try(self, partition: int) -> bool:
        got: bool = await self._conn.fetchval(
            "SELECT pg_try_advisory_lock($1::int, $2::int)", self._ns, 2 * partition
        )
        return got

    async def poll(self) -> Changes:
        """One check: take the home partition if free, take over free unwanted ones, name
        the taken-over ones whose home process is back. A broken connection loses all."""
        changes = Changes()
        try:
            if self._conn is None or self._conn.is_closed():
                if self._conn is not None:
                    self._conn = None
                    changes.lost = bool(self.held)
                    self.held.clear()
                await self._connect()
            others = await self._others()
            if self.home is not None and self.home not in self.held and await self._try(self.home):
                self.held.add(self.home)
                changes.gained.add(self.home)
            for i in range(self.partitions):
                if i == self.home:
                    continue
                wanted = (2 * i + 1) in others
                if i in self.held:
                    if wanted:
                        changes.release.add(i)
                    continue
                if not self.takeover or wanted or (2 * i) in others:
                    self._free_for.pop(i, None)
                    continue
                self._free_for[i] = self._free_for.get(i, 0) + 1
                if self._free_for[i] >= TAKEOVER_CHECKS and await self._try(i):
                    self._free_for.pop(i, None)
                    self.held.add(i)
                    changes.gained.add(i)
        except Exception as exc:  # the seam: the database away; book nothing until it is back
            log.warning("partition_check_failed", error=type(exc).__name__)
            changes.lost = bool(self.held) or changes.lost
            changes.gained.clear()
            changes.release.clear()
            self.held.clear()
            await self.close()
        return changes

    async def release(self, partition: int) -> None:
        if partition not in self.held:
            return
        self.held.discard(partition)
        if self._conn is None or self._conn.is_closed():
            return
        try:
            await self._conn.fetchval(
                "SELECT pg_advisory_unlock($1::int, $2::int)", self._ns, 2 * partition
            )
        except Exception as exc:  # the seam: closing the session releases it all the same
            log.warning("partition_check_failed", error=type(exc).__name__)
            await self.close()

    async def close(self) -> None:
        """Release everything (closing the session frees its advisory locks)."""
        self.held.clear()
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close(timeout=COMMAND_TIMEOUT_S)
            except Exception:
                conn.terminate()
