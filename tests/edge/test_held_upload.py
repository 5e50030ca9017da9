"""Receipts held by a device (edge/device.py, docs/protocol.md 17.7): kept durably with their
intents until a hack lists them, and handed to a real cloud service over a real broker, by
the SDK and by ``fogpay edge upload`` in a second process. The fog is played by protocol
functions with a key the cloud registered (tests/cloud/world.py)."""

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest

from cloud import ledger, registry
from cloud.core import CloudCore
from cloud.leases import LeasePolicy
from cloud.service import CloudService
from cloud.sqlitestore import SqliteStore
from edge.device import HELD_FILE, Device
from protocol.batch import decode_record
from protocol.held import HeldAck
from protocol.messages import Binding, Intent, Receipt
from protocol.signing import Signed, open_envelope, public_key, seal, seal_signed
from tests.cloud.world import FogLog, World, count
from tests.conftest import BrokerEndpoint
from tests.pipeline.mqtt import running_service, wait_for

FOGPAY = [sys.executable, "-m", "fogpay.cli"]


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


async def bind(w: World, device: Device) -> None:
    """Register the SDK device's key under owner alice, with its own possession proof."""
    env = w.binding("alice", w.owners["alice"], device=device.public_key)
    proof = device.prove_possession(open_envelope(env, Binding).body)
    await w.tx(lambda tx: registry.bind_device(tx, env, proof, now_ms=w.now))


def pay(device: Device, fog: FogLog, lease_id: bytes, amount: int = 1_000) -> Signed[Intent]:
    """One payment the way the SDK keeps it: the fog's ok receipt stored with its intent."""
    intent = device.new_intent("shop", amount, "EUR")
    receipt = seal_signed(
        Receipt(
            intent_id=intent.id,
            device=device.public_key,
            seq=intent.msg.seq,
            status="ok",
            log_index=fog.next_index,
            lease_id=lease_id,
            time_ms=intent.msg.time_ms,
        ),
        fog.key,
    )
    fog.next_index += 1
    device.store_receipt(receipt, intent)
    return intent


async def setup(w: World, tmp_path: Path) -> tuple[Device, FogLog, bytes]:
    await w.owner("alice")
    await w.owner("shop", limit=0)
    fog = await w.fog("fog-a")
    lease_id = (await w.lease("alice", "fog-a")).lease.lease_id
    device = Device.open(
        tmp_path / "dev", fog_id="fog-a", fog_key=public_key(fog.key), clock=w.clock
    )
    await bind(w, device)
    return device, fog, lease_id


async def test_the_sdk_uploads_what_it_holds_and_forgets_what_the_cloud_listed(
    world: World, tmp_path: Path, amqtt_broker: BrokerEndpoint
) -> None:
    w = world
    device, fog, lease_id = await setup(w, tmp_path)
    intents = [pay(device, fog, lease_id) for _ in range(20)]  # two payloads: 16 + 4
    stray = pay(device, fog, bytes(16))  # a lease the cloud never granted: refused
    assert len(device.held_records()) == 21
    issuer = public_key(w.issuer)
    async with (
        running_service(service(w, amqtt_broker)) as svc,
        aiomqtt.Client(amqtt_broker.host, amqtt_broker.port, timeout=10) as client,
    ):
        result = await device.upload_held(client, issuer_key=issuer, timeout_s=10)
        assert sorted(result.booked) == sorted(i.id for i in intents)
        assert result.refused == [(stray.id, "unknown_lease")]
        assert (result.unanswered, result.held) == (0, 0)
        assert await count(w.store, "transfers") == 20
        # what the cloud listed is gone, durably: a reboot holds nothing
        reopened = Device.open(tmp_path / "dev", fog_id="fog-a", fog_key=public_key(fog.key))
        assert reopened.held_records() == []
        # a new payment, uploaded twice: booked once, then listed as booked again
        again = pay(device, fog, lease_id)
        record = device.held_records()
        assert (await device.upload_held(client, issuer_key=issuer)).booked == [again.id]
        assert device.held_records() == []
        device._held[again.id] = record[0]  # as if the first hack had been lost
        assert (await device.upload_held(client, issuer_key=issuer)).booked == [again.id]
        await wait_for(lambda: svc.counters.get("held_answered", 0) == 4)
    assert svc.counters["held_records_booked"] == 21 and svc.counters["held_records_already"] == 1
    assert await count(w.store, "transfers") == 21


async def test_no_cloud_no_loss(world: World, tmp_path: Path, amqtt_broker: BrokerEndpoint) -> None:
    """Nobody answers: the records stay held, on disk, for the next upload."""
    w = world
    device, fog, lease_id = await setup(w, tmp_path)
    pay(device, fog, lease_id)
    async with aiomqtt.Client(amqtt_broker.host, amqtt_broker.port, timeout=10) as client:
        result = await device.upload_held(
            client, issuer_key=public_key(w.issuer), timeout_s=0.2, retries_max=1
        )
    assert (result.booked, result.unanswered, result.held) == ([], 1, 1)
    reopened = Device.open(tmp_path / "dev", fog_id="fog-a", fog_key=public_key(fog.key))
    assert len(reopened.held_records()) == 1


def test_held_is_bounded_and_survives_a_torn_line(tmp_path: Path) -> None:
    from tests.cloud.world import new_key

    fog = FogLog("fog-a", new_key())
    device = Device.open(tmp_path / "d", fog_id="fog-a", fog_key=public_key(fog.key), held_max=3)
    intents = [pay(device, fog, bytes(16)) for _ in range(5)]
    held = device.held_records()
    # full at the 4th: the oldest eighth (at least one) went, then the 4th went in: 2 left;
    # the 5th makes 3
    assert len(held) == 3
    assert [decode_record(r)[0] for r in held] == [i.raw for i in intents[2:]]
    with open(tmp_path / "d" / HELD_FILE, "a") as f:
        f.write('{"i": "00')  # a crash in the middle of an append
    reopened = Device.open(tmp_path / "d", fog_id="fog-a", fog_key=public_key(fog.key))
    assert reopened.held_records() == held
    # a hack forged by anyone but the issuer changes nothing
    issuer, forger = new_key(), new_key()
    forged = seal(
        HeldAck(device=device.public_key, booked=(intents[-1].id,), refused=(), time_ms=1), forger
    )
    assert reopened.apply_hack(forged, public_key(issuer)) is None
    genuine = seal(
        HeldAck(device=device.public_key, booked=(intents[-1].id,), refused=(), time_ms=1), issuer
    )
    assert reopened.apply_hack(genuine, public_key(issuer)) is not None
    assert reopened.held_records() == held[:2]


async def test_fogpay_edge_upload_in_a_second_process(
    world: World, tmp_path: Path, amqtt_broker: BrokerEndpoint
) -> None:
    w = world
    device, fog, lease_id = await setup(w, tmp_path)
    intents = [pay(device, fog, lease_id) for _ in range(3)]
    argv = [
        *FOGPAY, "edge", "upload", "--state", str(tmp_path / "dev"),
        "--broker", f"mqtt://{amqtt_broker.host}:{amqtt_broker.port}",
        "--fog-id", "fog-a", "--fog-key", public_key(fog.key).hex(),
        "--issuer", public_key(w.issuer).hex(), "--timeout", "10",
    ]  # fmt: skip
    async with running_service(service(w, amqtt_broker)):
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    result = json.loads(out)
    assert (result["sent"], result["booked"], result["held"]) == (3, 3, 0), result
    assert await count(w.store, "transfers") == 3
    reopened = Device.open(tmp_path / "dev", fog_id="fog-a", fog_key=public_key(fog.key))
    assert reopened.held_records() == []
    assert len(intents) == 3
