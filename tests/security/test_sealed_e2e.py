"""The sealing extension end to end (docs/protocol.md section 16).

- The fog's core: a receipt to an intent that asked (``sr``) is published sealed to the
  device's key and opens to the envelope the log keeps; the receipts a fog gives before it has
  read a trustworthy intent (malformed, bad_signature, topic_mismatch) stay plain.
- Over a real broker, with a real fog daemon and the real cloud service: a sealing device and
  a plain one pay; a third client subscribed to ``#`` never sees a sealing device's memo nor
  its receipts on its receipt topic; the plain device is unaffected; the cloud books every
  record (the intents carry sealed memos) and its proofs verify.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import nacl.signing
import pytest

from cloud.sqlitestore import SqliteStore
from edge.device import DEVICE_SOCKET_OPTIONS, Device, DeviceSession, PaymentDeclined
from fog.core import CoreConfig, FogCore, Intents
from fog.core import Receipt as ReceiptOut
from fog.store import Arrival
from protocol import sealed, topics
from protocol.errors import Declined
from protocol.messages import Intent, Receipt
from protocol.reasons import Reason
from protocol.signing import open_envelope, public_key, seal
from runtime.keyfile import write_key_file
from tests.conftest import BrokerEndpoint
from tests.fog.world import NOW, World
from tests.integration.fogrun import running_fog, wait_counter
from tests.pipeline.mqtt import running_service
from tests.pipeline.world import Pipeline, wait_until

MEMOS = [f"secret-memo-{i:04d}-kwh".encode() for i in range(4)]
PLAIN_MEMO = b"plain-memo-visible"
CLIENT_TIMEOUT_S = 10.0


# ---- the fog's core --------------------------------------------------------------------------


def sealing_intent(w: World, dev: nacl.signing.SigningKey, seq: int, **over: object) -> bytes:
    fields: dict[str, object] = {
        "device": public_key(dev),
        "fog_id": w.fog_id,
        "seq": seq,
        "payee_id": "shop",
        "amount_micros": 1_000,
        "currency": "EUR",
        "time_ms": NOW,
        "seal_receipts": sealed.SCHEME,
    }
    return seal(Intent(**(fields | over)), dev)  # type: ignore[arg-type]


def test_the_core_seals_what_was_asked_for_and_the_log_keeps_it_plain(tmp_path: Path) -> None:
    w = World(tmp_path / "fog.sqlite")
    owner = w.owner()
    dev, other = w.device(owner), w.device(owner)
    w.lease()
    w.store.close()
    core = FogCore.open(
        w.path,
        config=CoreConfig(fog_id=w.fog_id, issuer_key=public_key(w.issuer)),
        fog_key=w.fog_key,
    )
    dev_x = sealed.x25519_private(dev)
    ok = sealing_intent(w, dev, 1)
    declined = sealing_intent(w, dev, 2, currency="USD")
    mismatch = sealing_intent(w, dev, 3)
    bad_sig = ok[:-1] + bytes([ok[-1] ^ 1])
    unsealed = w.intent(dev, 4, 1_000)
    arrivals = (
        Arrival(public_key(dev), ok),
        Arrival(public_key(dev), declined),
        Arrival(public_key(other), mismatch),  # on another device's topic
        Arrival(public_key(dev), b"\xc1"),  # malformed
        Arrival(public_key(dev), bad_sig),
        Arrival(public_key(dev), unsealed),  # not opted in
        Arrival(public_key(dev), ok),  # a retransmission: the stored receipt, sealed afresh
    )
    out = [
        o for o in core.handle(Intents(arrivals=arrivals, now_ms=NOW)) if isinstance(o, ReceiptOut)
    ]
    assert [o.outcome.sealed for o in out] == [True, True, False, False, False, False, True]
    fog_pub = public_key(w.fog_key)
    for o in out:
        payload = o.payload
        if o.outcome.sealed:
            assert sealed.is_sealed_payload(payload) and payload != o.payload  # randomized
            assert sealed.open_receipt(payload, dev_x) == o.outcome.receipt
            with pytest.raises(Exception):  # noqa: B017 (Declined: sealed to dev only)
                sealed.open_receipt(payload, sealed.x25519_private(other))
        else:
            assert payload == o.outcome.receipt
            open_envelope(payload, Receipt, signer=fog_pub)
    assert len({len(o.payload) for o in out if o.outcome.sealed}) == 1  # ok, decline: padded
    assert out[0].outcome.status == "ok" and out[6].outcome.replay
    assert out[6].outcome.receipt == out[0].outcome.receipt
    assert [o.outcome.reason for o in out[1:5]] == [
        Reason.CURRENCY,
        Reason.TOPIC_MISMATCH,
        Reason.MALFORMED,
        Reason.BAD_SIGNATURE,
    ]
    sealed_batches = core.store.seal_due(now_ms=NOW + 60_000, records_max=100, age_ms=0)
    records = [r for b in sealed_batches for r in b.records]
    assert len(records) == 2  # ok and the unsealed one
    assert out[0].outcome.receipt in records[0]  # the plain envelope, as signed


# ---- end to end ------------------------------------------------------------------------------


def sdk_device(
    directory: Path, key: nacl.signing.SigningKey, fog_pub: bytes, *, sealing: bool = False
) -> Device:
    directory.mkdir(mode=0o700)
    write_key_file(directory / "device.key", key)
    return Device.open(directory, fog_id="fog-a", fog_key=fog_pub, seq_block=4, sealing=sealing)


def mqtt(edge: BrokerEndpoint) -> aiomqtt.Client:
    return aiomqtt.Client(
        edge.host,
        edge.port,
        username=edge.username,
        password=edge.password,
        timeout=CLIENT_TIMEOUT_S,
        socket_options=DEVICE_SOCKET_OPTIONS,
    )


@contextlib.asynccontextmanager
async def watching(edge: BrokerEndpoint) -> AsyncIterator[list[tuple[str, bytes]]]:
    """Every (topic, payload) a client subscribed to ``#`` receives: a curious broker's view."""
    seen: list[tuple[str, bytes]] = []
    async with mqtt(edge) as c:
        await c.subscribe("#", qos=1)

        async def read() -> None:
            async for m in c.messages:
                if isinstance(m.payload, bytes):
                    seen.append((str(m.topic), m.payload))

        task = asyncio.create_task(read(), name="test.curious")
        try:
            yield seen
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task


async def test_sealing_device_pays_the_broker_learns_nothing_the_cloud_books(
    tmp_path: Path, amqtt_broker: BrokerEndpoint
) -> None:
    store = await SqliteStore.open(str(tmp_path / "cloud.db"))
    try:
        await _flow(Pipeline(store, amqtt_broker, tmp_path), tmp_path)
    finally:
        await store.close()


async def _flow(p: Pipeline, tmp_path: Path) -> None:
    await p.owner("alice", limit=1_000_000)
    config = await p.fog("fog-a")
    fog_pub = public_key(p.fog_keys["fog-a"])
    sealing = sdk_device(
        tmp_path / "sealing", (await p.device("alice", "fog-a")).key, fog_pub, sealing=True
    )
    plain = sdk_device(tmp_path / "plain", (await p.device("alice", "fog-a")).key, fog_pub)
    async with (
        running_service(p.service()) as cloud,
        running_fog(config) as fog,
        watching(p.edge) as seen,
        mqtt(p.edge) as c,
    ):
        await wait_counter(fog, "bind_accepted", 2)
        async with DeviceSession(c, fog_id="fog-a", fog_key=fog_pub) as s:
            await s.attach(sealing)
            await s.attach(plain)
            first = sealing.new_intent("shop", 1_000, "EUR", memo=MEMOS[0])
            with pytest.raises(PaymentDeclined) as no_budget:  # no lease yet: a sealed decline
                await s.send(sealing, first, timeout_s=5)
            assert no_budget.value.reason is Reason.INSUFFICIENT_BUDGET
            await wait_counter(fog, "lease_request_answered")
            ok = [await s.send(sealing, first, timeout_s=5)]
            for memo in MEMOS[1:]:
                ok.append(await s.pay(sealing, "shop", 100, "EUR", memo=memo, timeout_s=5))
            again = await s.send(sealing, first, timeout_s=5)  # retransmission: stored receipt
            assert again.raw == ok[0].raw
            plain_ok = await s.pay(plain, "shop", 100, "EUR", memo=PLAIN_MEMO, timeout_s=5)
        ids = [r.msg.intent_id for r in [*ok, plain_ok]]

        async def all_booked() -> bool:
            return all(n == 1 for n in (await p.booked(ids)).values())

        await wait_until(all_booked)
        assert cloud.counters.get("batches_refused", 0) == 0
        assert cloud.counters.get("records_rejected", 0) == 0
        assert cloud.counters.get("records_booked", 0) == len(ids)
    await p.check_books(ids)  # balances, each once, proofs of sealed-memo intents verify
    assert all(r.msg.ok for r in ok) and plain_ok.msg.ok
    assert sealing.read_memo(first) == MEMOS[0]
    assert [r.msg.intent_id for r in sealing.receipts()] == [r.msg.intent_id for r in ok]

    # the curious client's view
    assert seen, "the observer saw nothing"
    everything = b"".join(payload for _, payload in seen)
    for memo in MEMOS:
        assert memo not in everything  # nowhere: not on the intent topic, not in batches
    assert PLAIN_MEMO in everything  # the observer does see what is not sealed
    sealing_topic = topics.receipt_topic("fog-a", sealing.public_key)
    on_topic = [payload for topic, payload in seen if topic == sealing_topic]
    assert len(on_topic) >= len(ok) + 2  # the decline and the retransmission too
    assert all(sealed.is_sealed_payload(x) for x in on_topic)
    for r in [*ok, no_budget.value.receipt]:
        # no receipt body of the sealing device on any device-facing topic
        assert not any(r.raw in x for t, x in seen if not t.startswith("fogpay/1/up/"))
        assert not any(r.body in x for t, x in seen if not t.startswith("fogpay/1/up/"))
    opened = {sealing.open_receipt(x).raw for x in on_topic}
    assert opened == {r.raw for r in [*ok, no_budget.value.receipt]}
    plain_topic = topics.receipt_topic("fog-a", plain.public_key)
    assert [x for t, x in seen if t == plain_topic] == [plain_ok.raw]  # unaffected


# ---- the device's rules (16.5) ---------------------------------------------------------------


def test_a_sealing_device_takes_plain_receipts_only_for_early_declines(tmp_path: Path) -> None:
    fog = nacl.signing.SigningKey.generate()
    fog_pub = public_key(fog)
    dev = Device.open(tmp_path / "s", fog_id="fog-a", fog_key=fog_pub, sealing=True)
    old = Device.open(tmp_path / "p", fog_id="fog-a", fog_key=fog_pub)
    intent = dev.new_intent("shop", 5, "EUR", memo=b"m-1")
    assert intent.msg.memo is None and intent.msg.seal_receipts == sealed.SCHEME
    assert dev.read_memo(intent) == b"m-1"
    with pytest.raises(Declined):
        old.read_memo(intent)  # sealed to dev: another device's key does not open it
    base: dict[str, Any] = {
        "intent_id": intent.id,
        "device": dev.public_key,
        "seq": intent.msg.seq,
        "time_ms": 1,
    }
    ok = seal(Receipt(**base, status="ok", log_index=1, lease_id=bytes(16)), fog)
    bad_sig = seal(Receipt(**base, status="declined", reason=Reason.BAD_SIGNATURE), fog)
    assert dev.open_receipt(sealed.seal_receipt(ok, dev.public_key)).raw == ok
    assert dev.check_receipt(sealed.seal_receipt(ok, dev.public_key), intent) is not None
    with pytest.raises(Declined):
        dev.open_receipt(ok)  # plain ok: the fog did not keep the bargain
    assert dev.check_receipt(ok, intent) is None
    assert dev.open_receipt(bad_sig).raw == bad_sig
    with pytest.raises(Declined):
        dev.open_receipt(sealed.seal_receipt(ok, old.public_key))  # sealed to another device
    assert old.open_receipt(ok).raw == ok  # a device that did not opt in: as before
    plain = old.new_intent("shop", 5, "EUR", memo=b"m-2")
    assert plain.msg.memo == b"m-2" and plain.msg.sealed_memo is None
    assert plain.msg.seal_receipts is None
