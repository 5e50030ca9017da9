"""CloudService on a real broker and a real SQLite store: batches published as raw wire
bytes, twice and out of order, are booked once and acked; lease messages are answered;
registry changes reach the broker; bad input is counted and changes nothing."""

import contextlib
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from cloud import ledger, registry
from cloud.core import CloudCore
from cloud.ingest import verify_inline
from cloud.leases import LeasePolicy
from cloud.service import CloudService, PrefetchVerifier
from cloud.sqlitestore import SqliteStore
from cloud.store import Tx
from protocol import topics
from protocol.leasing import LeaseReport, LeaseRequest, lease_report_topic, lease_request_topic
from protocol.messages import Ack, Lease
from protocol.signing import open_envelope, public_key, seal
from tests.cloud.world import FogLog, World, count, new_key, snapshot
from tests.conftest import BrokerEndpoint
from tests.pipeline.mqtt import publish, running_service, wait_for, watcher


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    store = await SqliteStore.open(str(tmp_path / "cloud.db"))
    w = World(store)
    yield w
    check = await store.transact(ledger.check)
    await store.close()
    assert check.ok, f"ledger out of balance: {check}"


def service(
    w: World, broker: BrokerEndpoint, *, prefetch: PrefetchVerifier | None = None
) -> CloudService:
    """A service over the world's store; with ``prefetch``, the core verifies through it."""
    core = CloudCore(
        store=w.store,
        issuer=w.issuer,
        clock=w.clock,
        policy=LeasePolicy(5_000),
        verifier=prefetch or verify_inline,
    )
    return CloudService(
        core=core,
        broker_host=broker.host,
        broker_port=broker.port,
        store=w.store,
        prefetch=prefetch,
    )


async def batches(w: World, n: int) -> tuple[FogLog, list[bytes]]:
    await w.owner("alice")
    fog = await w.fog("fog-a")
    lease = await w.lease("alice", "fog-a")
    device = await w.device("alice")
    wires = []
    for b in range(n):
        recs = [
            fog.authorize(device, seq=b * 10 + k + 1, lease_id=lease.lease.lease_id)
            for k in range(3)
        ]
        wires.append(fog.cut(recs))
    return fog, wires


@pytest.mark.parametrize("pool", [False, True], ids=["inline", "prefetch-pool"])
async def test_batches_twice_and_out_of_order_are_booked_once(
    world: World, amqtt_broker: BrokerEndpoint, pool: bool
) -> None:
    with ProcessPoolExecutor(1) if pool else contextlib.nullcontext() as executor:
        await twice_and_out_of_order(world, amqtt_broker, executor)


async def twice_and_out_of_order(
    world: World, amqtt_broker: BrokerEndpoint, executor: ProcessPoolExecutor | None
) -> None:
    fog, wires = await batches(world, 3)
    ack_topic = topics.ack_topic("fog-a")
    b1, b2, b3 = wires
    topic = topics.batch_topic("fog-a")
    prefetch = PrefetchVerifier(executor) if executor is not None else None
    async with (
        running_service(service(world, amqtt_broker, prefetch=prefetch)) as svc,
        watcher(amqtt_broker.host, amqtt_broker.port, [ack_topic]) as acks,
    ):
        await publish(amqtt_broker.host, amqtt_broker.port, [(topic, w) for w in (b2, b1, b1)])
        await publish(amqtt_broker.host, amqtt_broker.port, [(topic, w) for w in (b3, b2)])
        await wait_for(
            lambda: (
                sum(svc.counters.get(f"batches_{s}", 0) for s in ("booked", "held", "duplicate"))
                >= 5
            )
        )
        await wait_for(lambda: acks.has(ack_topic) and _ack_number(acks.last[ack_topic]) == 3)
    c = svc.counters
    assert (c["batches_held"], c["batches_booked"], c["batches_duplicate"]) == (1, 2, 2)
    assert await count(world.store, "transfers") == 9
    ack = open_envelope(acks.last[ack_topic], Ack, signer=public_key(world.issuer)).msg
    assert ack.header_id == fog.prev_id


def _ack_number(payload: bytes) -> int:
    return open_envelope(payload, Ack).msg.number


async def test_bad_input_is_counted_and_changes_nothing_but_an_alarm(
    world: World, amqtt_broker: BrokerEndpoint
) -> None:
    _, wires = await batches(world, 1)
    before = await snapshot(world.store)
    forged = FogLog("fog-a", new_key())  # not the registered fog key
    forged_wire = forged.cut([forged.authorize(new_key(), seq=1, lease_id=bytes(16))])
    junk = [
        (topics.batch_topic("fog-a"), b"\x00garbage"),
        (topics.batch_topic("fog-a"), b""),
        (topics.batch_topic("fog-a"), forged_wire),
        (topics.batch_topic("fog-b"), wires[0]),  # fog-a's batch on fog-b's topic
        (lease_request_topic("fog-a"), b"\x94" * 2000),  # over the 1 KiB limit
        (lease_report_topic("fog-a"), b"\x94"),
        ("fogpay/1/up/fog-a/other", b"x"),
    ]
    with ProcessPoolExecutor(1) as executor:  # verification prefetched, then discarded
        prefetch = PrefetchVerifier(executor)
        async with running_service(service(world, amqtt_broker, prefetch=prefetch)) as svc:
            await publish(amqtt_broker.host, amqtt_broker.port, junk)
            await wait_for(  # every item judged: a loaded machine finishes them in any order
                lambda: (
                    svc.counters.get("lrep_received", 0) == 1
                    and svc.counters.get("batches_refused", 0) == 2
                    and svc.counters.get("batch_dropped", 0) == 2
                    and svc.counters.get("lease_dropped", 0) == 1
                )
            )
        assert prefetch._started == {}  # every prefetched verification was used or discarded
    c = svc.counters
    assert c["batch_dropped"] == 2  # the empty one and the topic mismatch
    assert c["lease_dropped"] == 1
    assert c["batch_refused_malformed"] == 1 and c["batch_refused_bad_signature"] == 1
    assert c["lrep_refused_malformed"] == 1
    after = await snapshot(world.store)
    # the forged batch is signed validly by a key that is not fog-a's: refused, nothing
    # booked, and an alarm (a fog paying under a credential the registry never registered
    # looks exactly like it, docs/protocol.md 15.2); nothing else changed
    [alarm] = after.pop("alarms")
    assert alarm[:3] == (
        "unregistered_fog_key",
        f"fog-a:{public_key(forged.key).hex()[:16]}",
        "fog-a",
    )
    assert before.pop("alarms") == []
    assert after == before


async def test_lease_request_is_answered_with_a_retained_lease_and_a_report_clears_it(
    world: World, amqtt_broker: BrokerEndpoint
) -> None:
    await world.owner("alice", limit=20_000)
    fog = await world.fog("fog-a")
    req = seal(LeaseRequest(fog_id="fog-a", owner_id="alice", currency="EUR", time_ms=1), fog.key)
    lease_filter = topics.lease_filter("fog-a")
    host, port = amqtt_broker.host, amqtt_broker.port
    async with (
        running_service(service(world, amqtt_broker)) as svc,
        watcher(host, port, [lease_filter]) as leases,
    ):
        await publish(host, port, [(lease_request_topic("fog-a"), req)])
        await wait_for(lambda: any(leases.last.values()))
        [(topic, raw)] = [(t, p) for t, p in leases.last.items() if p]
        lease = open_envelope(raw, Lease, signer=public_key(world.issuer)).msg
        assert lease.amount_micros == 5_000  # the policy's initial lease
        rep = LeaseReport(
            lease_id=lease.lease_id, fog_id="fog-a", drawn_micros=0, last_batch=0, time_ms=2
        )
        await publish(host, port, [(lease_report_topic("fog-a"), seal(rep, fog.key))])
        await wait_for(lambda: leases.last[topic] == b"")
        # the same report again (its clear was lost, say): the clear is published again
        leases.seen.clear()
        await publish(host, port, [(lease_report_topic("fog-a"), seal(rep, fog.key))])
        await wait_for(lambda: svc.counters.get("lrep_received", 0) == 2)
        await wait_for(lambda: (topic, b"") in leases.seen)
    assert svc.counters["leases_granted"] == 1 and svc.counters["leases_closed"] >= 1


async def test_registry_changes_reach_the_broker_within_seconds(
    world: World, amqtt_broker: BrokerEndpoint
) -> None:
    await world.owner("alice")
    host, port = amqtt_broker.host, amqtt_broker.port
    async with running_service(service(world, amqtt_broker)):
        async with watcher(host, port, [topics.TRUST_FILTER]) as trust:
            await wait_for(lambda: trust.has(topics.owner_topic("alice")))
            await world.owner("bob")  # as `fogpay cloud owner add` would, in another process
            await wait_for(lambda: trust.has(topics.owner_topic("bob")))

            async def drop(tx: Tx) -> None:  # as if revoked and withdrawn by an operator
                await tx.execute(
                    "DELETE FROM retained WHERE topic = ?", (topics.owner_topic("bob"),)
                )

            await world.store.transact(drop)
            await wait_for(lambda: trust.last.get(topics.owner_topic("bob")) == b"")
    assert registry  # imported for the reader: the registry writes the retained table


async def test_a_store_failure_drops_the_message_and_the_service_lives_on(
    world: World, amqtt_broker: BrokerEndpoint, tmp_path: Path
) -> None:
    _, wires = await batches(world, 2)
    second = await SqliteStore.open(str(tmp_path / "cloud.db"))  # the service's own connection
    core = CloudCore(store=second, issuer=world.issuer, clock=world.clock, policy=LeasePolicy())
    svc = CloudService(core=core, broker_host=amqtt_broker.host, broker_port=amqtt_broker.port)
    topic = topics.batch_topic("fog-a")
    async with running_service(svc):
        await second.close()  # the disk went away, say
        await publish(amqtt_broker.host, amqtt_broker.port, [(topic, wires[0])])
        await wait_for(lambda: svc.counters.get("handler_failed", 0) == 1)
        await publish(amqtt_broker.host, amqtt_broker.port, [(topic, wires[1])])
        await wait_for(lambda: svc.counters.get("handler_failed", 0) == 2)
    assert await count(world.store, "transfers") == 0
