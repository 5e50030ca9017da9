"""Partitioned ingest's pieces (cloud/partition.py) on a real PostgreSQL: the partition
function, the advisory-lock claims (home, standby, takeover, hand-back, death), the
configuration, and the database refusing a double booking when two processes race on one
fog's batches with no lock at all (the locks are for liveness; the database is the safety).
"""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import nacl.signing
import pytest

from cloud import ledger
from cloud.config import ConfigError, ServiceConfig
from cloud.events import Status
from cloud.ingest import Ingestor
from cloud.partition import Claims, partition_of
from cloud.pgstore import PgStore
from runtime.keyfile import write_key_file
from tests.cloud.conftest import drop_schema, pg_schema_store
from tests.cloud.world import World, count

pytestmark = pytest.mark.postgres

BATCHES = 8
RECORDS = 25


@pytest.fixture
async def schema_dsn(pg_dsn: str) -> AsyncIterator[tuple[str, PgStore, str]]:
    store, schema = await pg_schema_store(pg_dsn)
    sep = "&" if "?" in pg_dsn else "?"
    try:
        yield f"{pg_dsn}{sep}search_path={schema}", store, schema
    finally:
        await store.close()
        await drop_schema(pg_dsn, schema)


@pytest.mark.parametrize("partitions", [1, 2, 3, 7])
def test_partition_of_is_stable_and_in_range(partitions: int) -> None:
    fogs = [f"fog-{k}" for k in range(200)]
    got = [partition_of(f, partitions) for f in fogs]
    assert got == [partition_of(f, partitions) for f in fogs]
    assert set(got) == set(range(partitions))  # 200 fogs reach every partition


def test_the_partition_keys_are_checked() -> None:
    assert ServiceConfig(partitions=2, partition=1).partitioned
    assert ServiceConfig(partitions=2, partition=-1).partitioned  # a standby for any
    assert ServiceConfig(partitions=1).partitioned  # one partition: one books, others wait
    assert not ServiceConfig().partitioned
    for bad in (
        {"partitions": -1},
        {"partitions": 2, "partition": 2},
        {"partition": -2},
        {"partitions": 2, "partition": -1, "takeover": False},
        {"partition_check_s": 0.0},
        {"takeover": "yes"},
    ):
        with pytest.raises(ConfigError):
            ServiceConfig(**bad)  # type: ignore[arg-type]


async def poll_until(claims: Claims, want: set[int], polls: int = 10) -> None:
    for _ in range(polls):
        changes = await claims.poll()
        for partition in changes.release:
            await claims.release(partition)
        if claims.held == want:
            return
    raise AssertionError(f"held {claims.held}, wanted {want}")


async def test_home_standby_takeover_and_hand_back(
    schema_dsn: tuple[str, PgStore, str],
) -> None:
    dsn = schema_dsn[0]
    a = Claims(dsn, partitions=2, home=0, takeover=True)
    standby = Claims(dsn, partitions=2, home=0, takeover=False)
    b = Claims(dsn, partitions=2, home=1, takeover=True)
    try:
        await poll_until(a, {0})
        await poll_until(b, {1})
        for _ in range(5):  # partition 0 is held: the standby waits, b does not take it
            assert not (await standby.poll()).gained
            assert 0 not in (await b.poll()).gained
        await a.close()  # a is gone: its home's standby takes 0, b still does not
        await poll_until(standby, {0})
        await standby.close()  # no live home process for 0: b takes it over
        await poll_until(b, {0, 1})
        a = Claims(dsn, partitions=2, home=0, takeover=True)  # a is back: b hands 0 back
        assert not (await a.poll()).gained
        await poll_until(b, {1})
        await poll_until(a, {0})
    finally:
        for claims in (a, standby, b):
            await claims.close()


async def test_another_schema_is_another_cloud(
    schema_dsn: tuple[str, PgStore, str], pg_dsn: str
) -> None:
    other, schema = await pg_schema_store(pg_dsn)
    sep = "&" if "?" in pg_dsn else "?"
    a = Claims(schema_dsn[0], partitions=1, home=0, takeover=False)
    b = Claims(f"{pg_dsn}{sep}search_path={schema}", partitions=1, home=0, takeover=False)
    try:
        await poll_until(a, {0})
        await poll_until(b, {0})
    finally:
        await a.close()
        await b.close()
        await other.close()
        await drop_schema(pg_dsn, schema)


async def test_two_processes_racing_on_one_fog_book_each_batch_once(
    schema_dsn: tuple[str, PgStore, str],
) -> None:
    """No lock: two stores (two pools, as two processes) ingest the same batches of one fog
    at once, in opposite orders; the owner's account and lease rows are shared. Every batch
    is booked by exactly one of them, every record once, nothing lost."""
    dsn, store, _ = schema_dsn
    world = World(store)
    await world.owner("alice", limit=10**12)
    devices: list[nacl.signing.SigningKey] = [await world.device("alice") for _ in range(5)]
    log = await world.fog("fog-race")
    lease = (await world.lease("alice", "fog-race", 10**9)).lease.lease_id
    wires = []
    seq = 0
    for _ in range(BATCHES):
        records = []
        for r in range(RECORDS):
            seq += 1
            records.append(log.authorize(devices[r % 5], seq=seq, lease_id=lease, amount=1_000))
        wires.append(log.cut(records))
    other = await PgStore.open(dsn)
    try:
        one = Ingestor(store=store, issuer=world.issuer, clock=world.clock)
        two = Ingestor(store=other, issuer=world.issuer, clock=world.clock)

        async def run(ingestor: Ingestor, order: list[bytes]) -> list[Status]:
            return [(await ingestor.ingest_batch(w)).status for w in order]

        first, second = await asyncio.gather(run(one, wires), run(two, wires[::-1]))
    finally:
        await other.close()
    booked = [s for s in first + second if s is Status.BOOKED]
    # a batch booked by one side is a duplicate (or was held) on the other; a held batch
    # is booked when its gap fills, in the transaction of the batch that filled it
    assert len(booked) <= BATCHES
    assert await count(store, "batches") == BATCHES
    assert await count(store, "transfers") == BATCHES * RECORDS
    assert await store.transact(lambda tx: ledger.balance(tx, "alice", "EUR")) == (
        -BATCHES * RECORDS * 1_000
    )

    async def drawn(tx: object) -> int:
        row = await tx.fetchone(  # type: ignore[attr-defined]
            "SELECT drawn_micros FROM leases WHERE lease_id = ?", (lease,)
        )
        return int(row[0])

    assert await store.transact(drawn) == BATCHES * RECORDS * 1_000  # no lost update
    check = await store.transact(ledger.check)
    assert check.ok and check.transfers == BATCHES * RECORDS


def test_the_partition_option_is_parsed() -> None:
    from cloud.cli_commands import parse_partition

    assert parse_partition("1/2") == (1, 2)
    assert parse_partition("-/3") == (-1, 3)  # a standby for any of 3
    for bad in ("1", "a/2", "1/b", "/2", "1/"):
        with pytest.raises(SystemExit):
            parse_partition(bad)


async def test_partitions_need_postgresql(tmp_path: Path) -> None:
    from cloud.config import CloudConfig
    from cloud.service import open_service

    key = tmp_path / "issuer.key"
    write_key_file(key, nacl.signing.SigningKey.generate())
    config = CloudConfig(
        store=f"sqlite://{tmp_path}/cloud.db",
        issuer_key=key,
        service=ServiceConfig(partitions=2, partition=0),
    )
    with pytest.raises(ConfigError, match="postgresql"):
        async with open_service(config):
            pass
    assert not (tmp_path / "cloud.db").exists()  # refused before anything was opened
