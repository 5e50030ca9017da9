"""End to end over a real broker: devices pay through a real fog daemon whose trust material
and leases come from the real cloud service; the fog's batches reach the cloud, are booked
once and acked; the ledger balances; every receipt a device holds is in the ledger exactly
once; inclusion proofs verify offline. Run on amqtt, and a subset on Mosquitto."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cloud.sqlitestore import SqliteStore
from fog.daemon import FogDaemon
from protocol.messages import Receipt
from protocol.reasons import Reason
from tests.cloud.conftest import drop_schema, pg_schema_store
from tests.conftest import BrokerEndpoint
from tests.integration.devices import Device, Wallet, intent_id, wallet
from tests.integration.fogrun import running_fog, wait_counter
from tests.pipeline.mqtt import running_service
from tests.pipeline.world import FOG_EXTRA, Pipeline, wait_until


@pytest.fixture
async def pipe_amqtt(tmp_path: Path, amqtt_broker: BrokerEndpoint) -> AsyncIterator[Pipeline]:
    store = await SqliteStore.open(str(tmp_path / "cloud.db"))
    yield Pipeline(store, amqtt_broker, tmp_path)
    await store.close()


@pytest.fixture
async def pipe_mosquitto(
    tmp_path: Path, mosquitto_broker: BrokerEndpoint
) -> AsyncIterator[Pipeline]:
    store = await SqliteStore.open(str(tmp_path / "cloud.db"))
    yield Pipeline(store, mosquitto_broker, tmp_path)
    await store.close()


async def trusted(fog: FogDaemon, devices: int = 1) -> None:
    """The fog holds the owner credential and the bindings (they arrive in any order)."""
    await wait_counter(fog, "owner_accepted")
    await wait_counter(fog, "bind_accepted", devices)


async def first_payment(fog: FogDaemon, w: Wallet, device: Device) -> Receipt:
    """The first intent of an owner no lease covers: declined insufficient_budget; the fog
    asks the cloud (lreq), the lease arrives, the device's retry of the same bytes is ok."""
    payload = device.intent(1_000)
    first = await w.pay(device, payload)
    assert first.reason == Reason.INSUFFICIENT_BUDGET
    await wait_counter(fog, "lease_request_answered")
    again = await w.pay(device, payload)
    assert again.ok and again.intent_id == intent_id(payload)
    return again


async def pay_all(w: Wallet, devices: list[Device], rounds: int) -> list[bytes]:
    ids = []
    for _ in range(rounds):
        for d in devices:
            payload = d.intent(100)
            receipt = await w.pay(d, payload)
            assert receipt.ok, receipt.reason
            ids.append(receipt.intent_id)
    return ids


async def run_flow(p: Pipeline, *, rounds: int) -> None:
    await p.owner("alice", limit=1_000_000)
    config = await p.fog("fog-a")
    devices = [await p.device("alice", "fog-a") for _ in range(3)]
    async with (
        running_service(p.service()) as cloud,
        running_fog(config) as fog,
        wallet(p.edge.host, p.edge.port, "fog-a") as w,
    ):
        await trusted(fog, 3)
        ids = [(await first_payment(fog, w, devices[0])).intent_id]
        ids += await pay_all(w, devices, rounds)

        async def all_booked() -> bool:
            return all(n == 1 for n in (await p.booked(ids)).values())

        await wait_until(all_booked)
        await wait_counter(fog, "batch_acked")
        assert cloud.counters.get("batches_refused", 0) == 0
        assert cloud.counters.get("batches_fork", 0) == 0
    held = [r.intent_id for r in w.ok_receipts()]
    assert set(held) == set(ids)
    await p.check_books(ids)


async def test_devices_pay_through_a_fog_and_the_cloud_books_every_receipt_once(
    pipe_amqtt: Pipeline,
) -> None:
    await run_flow(pipe_amqtt, rounds=10)


@pytest.mark.mosquitto
async def test_the_same_flow_through_mosquitto(pipe_mosquitto: Pipeline) -> None:
    await run_flow(pipe_mosquitto, rounds=5)


@pytest.mark.postgres
async def test_the_same_flow_with_the_cloud_on_postgresql(
    tmp_path: Path, amqtt_broker: BrokerEndpoint, pg_dsn: str
) -> None:
    store, schema = await pg_schema_store(pg_dsn)
    try:
        await run_flow(Pipeline(store, amqtt_broker, tmp_path), rounds=3)
    finally:
        await store.close()
        await drop_schema(pg_dsn, schema)


async def test_a_fog_with_the_uplink_off_sends_nothing_up(pipe_amqtt: Pipeline) -> None:
    p = pipe_amqtt
    await p.owner("alice", limit=1_000_000)
    extra = FOG_EXTRA.replace("[uplink]\n", "[uplink]\nenabled = false\n")
    config = await p.fog("fog-a", extra=extra)
    device = await p.device("alice", "fog-a")
    await p.world.lease("alice", "fog-a", 10_000)  # by hand: this fog asks for nothing
    async with (
        running_service(p.service()) as cloud,
        running_fog(config) as fog,
        wallet(p.edge.host, p.edge.port, "fog-a") as w,
    ):
        await trusted(fog)
        await wait_counter(fog, "lease_accepted")
        assert (await w.pay(device, device.intent(100))).ok
        await wait_counter(fog, "batch_sealed")
        assert (await w.pay(device, device.intent(10**6))).reason == Reason.INSUFFICIENT_BUDGET
    assert "batch_sent" not in fog.counters and "lease_requested" not in fog.counters
    assert cloud.counters.get("lreq_received", 0) == 0
    assert await p.booked([]) == {} and (await p.query("SELECT COUNT(*) FROM batches")) == [(0,)]
