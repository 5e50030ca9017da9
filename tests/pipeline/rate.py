"""Measure (not a test): records/s through CloudService over MQTT (Mosquitto on loopback,
SQLite store, verification in a process pool) against ``CloudCore.ingest_batch`` called
directly on the same batches.

    .venv/bin/python -m tests.pipeline.rate [BATCHES] [RECORDS] [WORKERS] [plain|prefetch]

Times from the first publish to the arrival of the retained ack naming the last batch.
"""

import asyncio
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import aiomqtt

from cloud.core import CloudCore
from cloud.leases import LeasePolicy
from cloud.service import CloudService, PrefetchVerifier, pool_verifier
from cloud.sqlitestore import SqliteStore
from protocol import topics
from protocol.messages import Ack
from protocol.signing import open_envelope
from tests.cloud.world import World
from tests.conftest import BrokerEndpoint, start_mosquitto

DEVICES = 16


async def world(path: str, batches: int, records: int) -> tuple[World, list[bytes]]:
    store = await SqliteStore.open(path)
    w = World(store)
    await w.owner("alice", limit=10**15)
    fog = await w.fog("fog-a")
    lease = await w.lease("alice", "fog-a", 10**14)
    devices = [await w.device("alice") for _ in range(DEVICES)]
    seqs = [0] * DEVICES
    wires = []
    for _ in range(batches):
        recs = []
        for k in range(records):
            seqs[k % DEVICES] += 1
            recs.append(
                fog.authorize(
                    devices[k % DEVICES], seq=seqs[k % DEVICES], lease_id=lease.lease.lease_id
                )
            )
        wires.append(fog.cut(recs))
    return w, wires


async def via_service(
    path: str, broker: BrokerEndpoint, batches: int, records: int, workers: int, prefetch: bool
) -> float:
    w, wires = await world(path, batches, records)
    with ProcessPoolExecutor(workers) as pool:
        verifier = PrefetchVerifier(pool) if prefetch else pool_verifier(pool)
        core = CloudCore(
            store=w.store, issuer=w.issuer, clock=w.clock, policy=LeasePolicy(), verifier=verifier
        )
        svc = CloudService(
            core=core,
            broker_host=broker.host,
            broker_port=broker.port,
            store=w.store,
            stats_s=3600,
            prefetch=verifier if isinstance(verifier, PrefetchVerifier) else None,
        )
        ready = asyncio.Event()
        task = asyncio.create_task(svc.run(ready=ready))
        await ready.wait()
        async with aiomqtt.Client(broker.host, broker.port, max_inflight_messages=100) as c:
            await c.subscribe(topics.ack_topic("fog-a"), qos=1)
            t0 = time.perf_counter()
            for wire in wires:
                await c.publish(topics.batch_topic("fog-a"), wire, qos=1)
            async with asyncio.timeout(600):
                async for m in c.messages:
                    if open_envelope(bytes(m.payload), Ack).msg.number == batches:  # type: ignore[arg-type]
                        break
            elapsed = time.perf_counter() - t0
        await svc.stop()
        await task
    await w.store.close()
    return elapsed


async def direct(path: str, batches: int, records: int, workers: int) -> float:
    w, wires = await world(path, batches, records)
    with ProcessPoolExecutor(workers) as pool:
        core = CloudCore(
            store=w.store,
            issuer=w.issuer,
            clock=w.clock,
            policy=LeasePolicy(),
            verifier=pool_verifier(pool),
        )
        await core.ingest_batch(wires[0])  # starts the pool
        t0 = time.perf_counter()
        for wire in wires[1:]:
            await core.ingest_batch(wire)
        elapsed = time.perf_counter() - t0
    await w.store.close()
    return elapsed * batches / (batches - 1)


async def main(batches: int, records: int, workers: int, prefetch: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        broker = start_mosquitto(Path(tmp))
        try:
            s = await via_service(
                f"{tmp}/svc.db", broker.endpoint, batches, records, workers, prefetch
            )
            d = await direct(f"{tmp}/direct.db", batches, records, workers)
        finally:
            broker.stop()
    n = batches * records
    print(f"{batches} batches x {records} records, {workers} verify workers, prefetch={prefetch}")
    print(f"service over MQTT: {s:.2f} s, {n / s:,.0f} records/s")
    print(f"core direct:       {d:.2f} s, {n / d:,.0f} records/s")


if __name__ == "__main__":
    from runtime.logs import configure

    configure(json=True, level="warning", stream=sys.stderr)
    args = sys.argv[1:]
    asyncio.run(
        main(
            int(args[0]) if args else 40,
            int(args[1]) if len(args) > 1 else 256,
            int(args[2]) if len(args) > 2 else 2,
            (args[3] if len(args) > 3 else "prefetch") == "prefetch",
        )
    )
