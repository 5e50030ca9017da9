"""The cloud service's federation inputs on a real broker and a real SQLite store
(docs/protocol.md 17.7, 17.8): a device's held records are booked and answered with a hack
(not retained); another fog's relay of a batch is booked as the origin's batch and acked on
the origin's ack topic; the origin's own copy is then a duplicate."""

from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest

from cloud import ledger
from cloud.core import CloudCore
from cloud.leases import LeasePolicy
from cloud.service import CloudService
from cloud.sqlitestore import SqliteStore
from protocol import topics
from protocol.batch import decode_record
from protocol.held import HeldAck, encode_held
from protocol.messages import Ack, Intent
from protocol.signing import open_envelope, public_key
from tests.cloud.world import World, count
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


def service(w: World, broker: BrokerEndpoint) -> CloudService:
    core = CloudCore(store=w.store, issuer=w.issuer, clock=w.clock, policy=LeasePolicy(5_000))
    return CloudService(core=core, broker_host=broker.host, broker_port=broker.port, store=w.store)


def intent_id(record: bytes) -> bytes:
    return open_envelope(decode_record(record)[0], Intent).id


async def test_held_upload_and_relay_through_the_service(
    world: World, amqtt_broker: BrokerEndpoint
) -> None:
    w = world
    await w.owner("alice")
    fog = await w.fog("fog-a")
    await w.fog("fog-b")
    lease_id = (await w.lease("alice", "fog-a")).lease.lease_id
    device = await w.device("alice")
    d = public_key(device)
    r1, r2, r3 = (fog.authorize(device, seq=q, lease_id=lease_id) for q in (1, 2, 3))
    wire = fog.cut([r1, r2, r3])
    host, port = amqtt_broker.host, amqtt_broker.port
    hack_topic, ack_topic = topics.held_ack_topic(d), topics.ack_topic("fog-a")
    async with (
        running_service(service(w, amqtt_broker)) as svc,
        watcher(host, port, [hack_topic, ack_topic]) as seen,
    ):
        await publish(host, port, [(topics.held_topic(d), encode_held([r1, r2]))])
        await wait_for(lambda: seen.has(hack_topic))
        hack = open_envelope(seen.last[hack_topic], HeldAck, signer=public_key(w.issuer)).msg
        assert list(hack.booked) == [intent_id(r1), intent_id(r2)] and hack.faults == []
        # fog-b relays fog-a's batch: booked as fog-a's, acked on fog-a's topic
        await publish(host, port, [(topics.relay_topic("fog-b"), wire)])
        await wait_for(lambda: seen.has(ack_topic))
        assert open_envelope(seen.last[ack_topic], Ack).msg.number == 1
        # fog-a's own copy and a garbage upload later: a duplicate; refused
        await publish(
            host,
            port,
            [(topics.batch_topic("fog-a"), wire), (topics.held_topic(d), b"\x90")],
        )
        await wait_for(
            lambda: (
                svc.counters.get("batches_duplicate", 0) == 1
                and svc.counters.get("held_refused", 0) == 1
            )
        )
    c = svc.counters
    assert (c["batches_relayed"], c["batches_booked"], c["held_answered"]) == (1, 1, 1)
    assert (c["held_records_booked"], c["held_records_already"]) == (2, 0)
    assert await count(w.store, "transfers") == 3


async def test_closing_a_lost_fogs_leases_clears_them_on_the_broker(
    world: World, amqtt_broker: BrokerEndpoint
) -> None:
    """``fogpay cloud fog close-leases`` writes only the store; the running service's
    retained refresh publishes the clearing."""
    from cloud import leases

    w = world
    await w.owner("alice")
    await w.fog("fog-a")
    lease_id = (await w.lease("alice", "fog-a")).lease.lease_id
    topic = topics.lease_topic("fog-a", lease_id)
    host, port = amqtt_broker.host, amqtt_broker.port
    async with (
        running_service(service(w, amqtt_broker)),
        watcher(host, port, [topics.lease_filter("fog-a")]) as seen,
    ):
        await wait_for(lambda: seen.has(topic))
        closed = await w.tx(lambda tx: leases.close_fog_leases(tx, "fog-a"))
        assert [c.lease_id for c in closed] == [lease_id]
        await wait_for(lambda: seen.last.get(topic) == b"")


@pytest.mark.mosquitto
async def test_held_and_relay_through_mosquitto_with_the_shipped_acl(
    world: World, tmp_path: Path
) -> None:
    """deploy/mosquitto/fogpay.acl lets a device upload only on its own held topic and read
    only its own hack, a fog relay only on its own relay topic, and the cloud (``issuer``)
    read both and answer."""
    from edge.device import Device
    from tests.conftest import free_port, launch_mosquitto
    from tests.edge.test_held_upload import bind, pay
    from tests.integration.test_fog_mosquitto import deploy_conf, password_file

    w = world
    await w.owner("alice")
    await w.owner("shop", limit=0)
    fog = await w.fog("fog-a")
    await w.fog("fog-b")
    lease_id = (await w.lease("alice", "fog-a")).lease.lease_id
    device = Device.open(
        tmp_path / "dev", fog_id="fog-a", fog_key=public_key(fog.key), clock=w.clock
    )
    await bind(w, device)
    intents = [pay(device, fog, lease_id) for _ in range(2)]
    wire = fog.cut(device.held_records())
    d = device.key_hex
    accounts = {"issuer": "issuer-pw", "fog-b": "fog-pw", d: "device-pw", "0" * 64: "other-pw"}
    passwd = password_file(tmp_path, accounts)
    port = free_port()
    broker = launch_mosquitto(
        tmp_path, port, deploy_conf("fogpay-server.conf", tmp_path, port, passwd)
    )
    try:
        core = CloudCore(store=w.store, issuer=w.issuer, clock=w.clock, policy=LeasePolicy())
        svc = CloudService(
            core=core, broker_host="127.0.0.1", broker_port=port, username="issuer",
            password="issuer-pw", store=w.store,
        )  # fmt: skip
        async with running_service(svc):
            # another device's account may not publish on this device's held topic
            async with aiomqtt.Client(
                "127.0.0.1", port, username="0" * 64, password="other-pw", timeout=10
            ) as other:
                await other.publish(topics.held_topic(device.public_key), b"\x90", qos=1)
            async with aiomqtt.Client(
                "127.0.0.1", port, username=d, password="device-pw", timeout=10
            ) as client:
                result = await device.upload_held(
                    client, issuer_key=public_key(w.issuer), timeout_s=10
                )
            assert sorted(result.booked) == sorted(i.id for i in intents)
            async with aiomqtt.Client(
                "127.0.0.1", port, username="fog-b", password="fog-pw", timeout=10
            ) as fog_b:
                await fog_b.publish(topics.relay_topic("fog-b"), wire, qos=1)
            await wait_for(lambda: svc.counters.get("batches_relayed", 0) == 1)
        assert svc.counters.get("held_refused", 0) == 0  # the other account's was not delivered
        assert svc.counters["held_answered"] == 1
        assert await count(w.store, "transfers") == 2
    finally:
        broker.stop()
