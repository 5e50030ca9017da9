"""Arrival order and paths do not matter: any order, duplicates, two connections, a process
pool: every intent is booked once and the books balance."""

import asyncio
import random
from concurrent.futures import ProcessPoolExecutor

import pytest

from cloud import ledger
from cloud.ingest import Status
from cloud.sqlitestore import SqliteStore
from cloud.store import Tx
from cloud.verify import CheckedBatch, check_batch
from protocol.messages import Ack
from protocol.signing import open_envelope
from tests.cloud.world import World, count

BATCHES = 8


async def scenario(w: World) -> list[bytes]:
    await w.owner("alice")
    await w.owner("shop")
    fog = await w.fog("fog-a")
    devices = [await w.device("alice") for _ in range(3)]
    lease_id = (await w.lease("alice", "fog-a", 10**9)).lease.lease_id
    seqs = [0, 0, 0]
    wires = []
    for b in range(BATCHES):
        records = []
        for i in range(1 + b % 3):
            d = (b + i) % 3
            seqs[d] += 1
            records.append(
                fog.authorize(
                    devices[d], seq=seqs[d], lease_id=lease_id, amount=1 + b, payee="shop"
                )
            )
        wires.append(fog.cut(records))
    return wires


async def totals(w: World) -> tuple[int, int]:
    check: ledger.LedgerCheck = await w.tx(ledger.check)
    assert check.ok
    return check.transfers, check.volume_micros.get("EUR", 0)


EXPECTED = (
    sum(1 + b % 3 for b in range(BATCHES)),
    sum((1 + b % 3) * (1 + b) for b in range(BATCHES)),
)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_any_order_with_duplicates_books_each_intent_once(world: World, seed: int) -> None:
    w = world
    wires = await scenario(w)
    rng = random.Random(seed)
    arrivals = wires + rng.sample(wires, 4)
    rng.shuffle(arrivals)
    ingestor = w.ingestor()
    last = None
    for wire in arrivals:
        out = await ingestor.ingest_batch(wire)
        assert out.status in (Status.BOOKED, Status.HELD, Status.DUPLICATE)
        last = out.ack or last
    assert await totals(w) == EXPECTED
    assert await count(w.store, "held") == 0
    assert last is not None and open_envelope(last, Ack).msg.number == BATCHES


async def test_two_sqlite_connections_book_once(tmp_path: object) -> None:
    path = f"{tmp_path}/cloud.db"
    a = await SqliteStore.open(path)
    b = await SqliteStore.open(path)
    try:
        w = World(a)
        wires = await scenario(w)
        wb = World(b, issuer=w.issuer)
        jobs = [w.ingestor().ingest_batch(x) for x in wires] + [
            wb.ingestor().ingest_batch(x) for x in wires
        ]
        await asyncio.gather(*jobs)
        assert await totals(w) == EXPECTED

        async def ids(tx: Tx) -> int:
            row = await tx.fetchone("SELECT COUNT(DISTINCT intent_id) FROM transfers")
            assert row is not None
            return int(row[0])

        assert await a.transact(ids) == EXPECTED[0]
    finally:
        await a.close()
        await b.close()


async def test_verification_in_a_process_pool(tmp_path: object) -> None:
    store = await SqliteStore.open(f"{tmp_path}/cloud.db")
    try:
        w = World(store)
        wires = await scenario(w)
        loop = asyncio.get_running_loop()
        with ProcessPoolExecutor(max_workers=2) as pool:

            async def verifier(wire: bytes) -> CheckedBatch:
                return await loop.run_in_executor(pool, check_batch, wire)

            ingestor = w.ingestor(verifier=verifier)
            for wire in wires:
                assert (await ingestor.ingest_batch(wire)).status is Status.BOOKED
        assert await totals(w) == EXPECTED
    finally:
        await store.close()
