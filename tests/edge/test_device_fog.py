"""The device SDK against a real fog (B2's daemon, in-process, real broker, real SQLite)."""

import asyncio
from pathlib import Path

import nacl.signing
import pytest

from edge.device import Device, DeviceSession, PaymentDeclined, PaymentTimeout
from fogpay.provision import BrokerAddress
from protocol import topics
from protocol.messages import Receipt
from protocol.reasons import Reason
from protocol.signing import open_envelope, seal_signed
from tests.conftest import start_mosquitto
from tests.edge.fogtools import (
    DEV_PW,
    FOG_ID,
    TX_MAX_MICROS,
    client,
    embedded_fog,
    external_fog,
    fog_key,
    observing,
    provision,
)
from tests.integration.fogrun import running_fog, wait_counter

NO_FOG = bytes(nacl.signing.SigningKey.generate().verify_key)  # a fog that never answers


@pytest.fixture
def issuer() -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey.generate()


def device_broker(port: int) -> BrokerAddress:
    return BrokerAddress("127.0.0.1", port, "device", DEV_PW)


def open_device(tmp_path: Path, name: str = "dev", **kw: int) -> Device:
    return Device.open(tmp_path / name, fog_id=FOG_ID, fog_key=fog_key(tmp_path), **kw)


async def test_pay_decline_and_reboot_against_real_fog(
    tmp_path: Path, issuer: nacl.signing.SigningKey
) -> None:
    async with running_fog(embedded_fog(tmp_path, issuer)) as fog:
        broker = device_broker(fog.broker_port)
        device = open_device(tmp_path, seq_block=4)
        await provision(fog, broker, issuer, [device])
        async with client(broker) as c:
            first = await device.pay(c, "shop-1", 125_000, "EUR", memo=b"kwh-7", timeout_s=5)
            assert first.msg.ok and first.msg.log_index == 1
            assert first.signer == fog_key(tmp_path)
            with pytest.raises(PaymentDeclined) as declined:
                await device.pay(c, "shop-1", TX_MAX_MICROS + 1, "EUR", timeout_s=5)
            assert declined.value.reason is Reason.LIMIT_TX
            assert declined.value.receipt.msg.status == "declined"
            with pytest.raises(PaymentDeclined) as wrong:
                await device.pay(c, "shop-1", 1, "USD", timeout_s=5)
            assert wrong.value.reason is Reason.CURRENCY
            q_before = device.seq_last
            rebooted = open_device(tmp_path, seq_block=4)  # power cycle: memory lost
            again = await rebooted.pay(c, "shop-1", 1_000, "EUR", timeout_s=5)
        assert again.msg.ok and again.msg.seq > q_before and again.msg.log_index == 2
        assert [r.msg.intent_id for r in rebooted.receipts()] == [
            first.msg.intent_id,
            again.msg.intent_id,
        ]  # declined intents leave no receipt behind


async def test_lost_receipt_retransmission_gets_identical_bytes(
    tmp_path: Path, issuer: nacl.signing.SigningKey
) -> None:
    async with running_fog(embedded_fog(tmp_path, issuer)) as fog:
        broker = device_broker(fog.broker_port)
        device = open_device(tmp_path)
        await provision(fog, broker, issuer, [device])
        intent = device.new_intent("shop-1", 2_000, "EUR")
        receipts = topics.receipt_topic(FOG_ID, device.public_key)
        async with observing(broker, receipts) as obs, client(broker) as c:
            # first attempt: the fog answers, the device hears nothing (not listening yet)
            await c.publish(topics.intent_topic(FOG_ID, device.public_key), intent.raw, qos=1)
            await obs.wait_count(1)
            async with DeviceSession(c, fog_id=FOG_ID, fog_key=device.fog_key) as session:
                await session.attach(device)
                receipt = await session.send(device, intent, timeout_s=5)
        assert receipt.raw == obs.payloads[0]
        assert open_envelope(obs.payloads[0], Receipt).msg.ok
        await wait_counter(fog, "intent_authorized")
        assert fog.counters["intent_authorized"] == 1


async def test_many_devices_share_one_connection(
    tmp_path: Path, issuer: nacl.signing.SigningKey
) -> None:
    async with running_fog(embedded_fog(tmp_path, issuer)) as fog:
        broker = device_broker(fog.broker_port)
        devices = [open_device(tmp_path, f"d{i}") for i in range(6)]
        await provision(fog, broker, issuer, devices)
        async with (
            client(broker) as c,
            DeviceSession(c, fog_id=FOG_ID, fog_key=devices[0].fog_key, wildcard=True) as session,
        ):
            pays = [session.pay(d, "shop-1", 1_000 + i, "EUR") for i, d in enumerate(devices * 3)]
            receipts = await asyncio.gather(*pays)
        assert all(r.msg.ok for r in receipts)
        assert sorted(r.msg.log_index for r in receipts) == list(range(1, 19))
        for d in devices:
            mine = d.receipts()
            assert len(mine) == 3 and all(r.msg.device == d.public_key for r in mine)
            assert [r.msg.seq for r in mine] == [1, 2, 3]


def _forged(intent_raw: bytes, forger: nacl.signing.SigningKey) -> bytes:
    from protocol.messages import Intent

    intent = open_envelope(intent_raw, Intent)
    msg = Receipt(
        intent_id=intent.id,
        device=intent.msg.device,
        seq=intent.msg.seq,
        status="declined",
        reason=Reason.REVOKED,
        time_ms=intent.msg.time_ms,
    )
    return seal_signed(msg, forger).raw


@pytest.mark.mosquitto
async def test_retransmits_same_bytes_until_the_fog_answers_and_ignores_forgeries(
    tmp_path: Path, issuer: nacl.signing.SigningKey
) -> None:
    mosquitto = start_mosquitto(tmp_path)
    try:
        broker = BrokerAddress("127.0.0.1", mosquitto.endpoint.port)
        config = external_fog(tmp_path, issuer, mosquitto.endpoint.port)
        device = open_device(tmp_path)
        async with running_fog(config) as fog:
            await provision(fog, broker, issuer, [device])
        # the fog is down: the first attempts go nowhere, and a forger answers them
        intents = topics.intent_topic(FOG_ID, device.public_key)
        forger = nacl.signing.SigningKey.generate()
        async with (
            observing(broker, intents) as obs,
            client(broker) as c,
            DeviceSession(c, fog_id=FOG_ID, fog_key=device.fog_key) as session,
        ):
            await session.attach(device)
            pay = asyncio.create_task(
                session.pay(device, "shop-1", 3_000, "EUR", timeout_s=0.2, retries_max=100)
            )
            await obs.wait_count(1)
            receipt_topic = topics.receipt_topic(FOG_ID, device.public_key)
            await c.publish(receipt_topic, _forged(obs.payloads[0], forger), qos=1)
            await c.publish(receipt_topic, b"\x94not a receipt", qos=1)
            async with asyncio.timeout(10):
                while session.ignored < 2:  # noqa: ASYNC110 (a counter, no event)
                    await asyncio.sleep(0.01)
            assert not pay.done()
            async with running_fog(config) as fog:
                receipt = await pay
                assert fog.counters.get("intent_authorized", 0) <= 1
        assert receipt.msg.ok and receipt.signer == device.fog_key
        assert len(obs.payloads) >= 2 and len(set(obs.payloads)) == 1  # same bytes each time
        assert [r.raw for r in device.receipts()] == [receipt.raw]
    finally:
        mosquitto.stop()


@pytest.mark.mosquitto
async def test_timeout_after_the_retransmissions(tmp_path: Path) -> None:
    mosquitto = start_mosquitto(tmp_path)
    try:
        broker = BrokerAddress("127.0.0.1", mosquitto.endpoint.port)
        device = Device.open(tmp_path / "d", fog_id=FOG_ID, fog_key=NO_FOG)
        intents = topics.intent_topic(FOG_ID, device.public_key)
        async with observing(broker, intents) as obs, client(broker) as c:
            with pytest.raises(PaymentTimeout) as err:
                await device.pay(c, "shop-1", 1, "EUR", timeout_s=0.05, retries_max=2)
            assert err.value.attempts == 3
            await obs.wait_count(3)
        assert len(set(obs.payloads)) == 1
        assert device.receipts() == []
    finally:
        mosquitto.stop()


@pytest.mark.mosquitto
async def test_broker_loss_fails_the_payment_at_once(tmp_path: Path) -> None:
    import aiomqtt

    mosquitto = start_mosquitto(tmp_path)
    try:
        broker = BrokerAddress("127.0.0.1", mosquitto.endpoint.port)
        device = Device.open(tmp_path / "d", fog_id=FOG_ID, fog_key=NO_FOG)
        intents = topics.intent_topic(FOG_ID, device.public_key)
        async with observing(broker, intents) as obs:
            async with client(broker) as c:
                pay = asyncio.create_task(
                    device.pay(c, "shop-1", 1, "EUR", timeout_s=60, retries_max=0)
                )
                await obs.wait_count(1)  # in flight, no fog to answer
                mosquitto.stop()
                with pytest.raises(aiomqtt.MqttError):
                    async with asyncio.timeout(30):  # far below the 60 s receipt timeout
                        await pay
    finally:
        mosquitto.stop()


async def test_run_load_counts_statuses_and_reasons(
    tmp_path: Path, issuer: nacl.signing.SigningKey
) -> None:
    from edge.simulate import Payment, arrival_offsets_s, run_load

    async with running_fog(embedded_fog(tmp_path, issuer)) as fog:
        broker = device_broker(fog.broker_port)
        devices = [open_device(tmp_path, f"d{i}") for i in range(3)]
        await provision(fog, broker, issuer, devices)
        async with (
            client(broker) as c,
            DeviceSession(c, fog_id=FOG_ID, fog_key=devices[0].fog_key, wildcard=True) as session,
        ):
            loads = {}
            for amount in (1_000, TX_MAX_MICROS + 1):
                payment = Payment(
                    payee_id="shop-1", amount_micros=amount, currency="EUR", timeout_s=5,
                    retries_max=1,
                )  # fmt: skip
                offsets = arrival_offsets_s(200, count=9)
                loads[amount] = await run_load([session], devices, payment, offsets)
    ok, declined = loads[1_000].to_dict(), loads[TX_MAX_MICROS + 1].to_dict()
    assert (ok["status"], ok["reasons"]) == ({"ok": 9}, {})
    assert (declined["status"], declined["reasons"]) == ({"declined": 9}, {"limit_tx": 9})
    assert loads[1_000].histogram.total == 9 and ok["latency"]["max_ms"] > 0
    assert [len(d.receipts()) for d in devices] == [3, 3, 3]
