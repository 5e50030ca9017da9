"""The fog end to end, each test through the embedded amqtt broker and through a Mosquitto
subprocess (``broker.url``): real brokers, real SQLite, real keys. The store runs in its own
process and the embedded broker in another (the defaults), and once more with both inside the
daemon's process (``store_process = false``, ``broker.process = false``, on amqtt), and with
the broker on the daemon's loop handing intents straight to it (``broker.handoff``)."""

import asyncio
import contextlib
import hashlib
import os
import signal
import sqlite3
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from fog.broker import BrokerLostError, BrokerProcess
from fog.config import load_config
from fog.daemon import FogDaemon
from fog.storeproc import CoreProcess, StoreProcessError
from protocol import topics
from protocol.messages import Receipt
from protocol.reasons import Reason
from protocol.signing import open_envelope
from tests.conftest import start_mosquitto
from tests.integration.devices import (
    Device,
    Issuer,
    intent_id,
    now_ms,
    publish_retained,
    wallet,
    write_fog_files,
)
from tests.integration.fogrun import running_fog, wait_counter, wait_for

FOG = "fog-a"
FOG_PW = "fog-secret"
DEV_PW = "device-secret"
EMBEDDED = f'port = 0\npassword = "{FOG_PW}"\ndevice_password = "{DEV_PW}"\n'


class Clock:
    """The fog's clock, frozen unless moved: rate buckets never refill by themselves."""

    def __init__(self) -> None:
        self.ms = now_ms()

    def __call__(self) -> int:
        return self.ms


@pytest.fixture
def issuer() -> Issuer:
    return Issuer()


@dataclass(frozen=True)
class Transport:
    name: str
    broker_toml: str  # the fog config's [broker] table
    creds: dict[str, Any]  # what devices connect with
    top: str = ""  # top-level config lines
    trust_creds: dict[str, Any] | None = None  # the issuer's (trust, leases); None: ``creds``

    @property
    def issuer_creds(self) -> dict[str, Any]:
        return self.trust_creds or self.creds


# on the embedded broker the shared device account may not publish trust: the fog's may
OPERATOR = {"username": "fog", "password": FOG_PW}
AMQTT = Transport(  # the embedded broker and the store in child processes of their own
    "amqtt",
    EMBEDDED + "process = true\n",
    {"username": "device", "password": DEV_PW},
    "store_process = true\n",
    OPERATOR,
)
AMQTT_IN_PROCESS = Transport(  # broker and store in the daemon's own process, no hand-off
    "amqtt-in-process",
    EMBEDDED + "process = false\nhandoff = false\n",
    {"username": "device", "password": DEV_PW},
    "store_process = false\n",
    OPERATOR,
)
AMQTT_HANDOFF = Transport(  # the broker on the daemon's loop hands intents over; store apart
    "amqtt-handoff",
    EMBEDDED + "process = false\nhandoff = true\n",
    {"username": "device", "password": DEV_PW},
    "store_process = true\n",
    OPERATOR,
)
AMQTT_DEFAULT = Transport(  # the embedded broker's defaults: one process, with the hand-off
    "amqtt-default", EMBEDDED, {"username": "device", "password": DEV_PW}, "", OPERATOR
)
EMBEDDED_TRANSPORTS = {t.name: t for t in (AMQTT, AMQTT_IN_PROCESS, AMQTT_HANDOFF, AMQTT_DEFAULT)}


@pytest.fixture(
    params=[*EMBEDDED_TRANSPORTS, pytest.param("mosquitto", marks=pytest.mark.mosquitto)]
)
def transport(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Transport]:
    if request.param in EMBEDDED_TRANSPORTS:
        yield EMBEDDED_TRANSPORTS[request.param]
        return
    broker = start_mosquitto(tmp_path)
    try:
        yield Transport("mosquitto", f'url = "{broker.endpoint.url}"', {})
    finally:
        broker.stop()


def fog_config(tmp_path: Path, issuer: Issuer, transport: Transport, extra: str = "") -> Path:
    return write_fog_files(
        tmp_path,
        fog_id=FOG,
        issuer_key=issuer.public,
        broker=transport.broker_toml,
        extra=transport.top + extra,
    )


async def provision(
    daemon: Any, t: Transport, issuer: Issuer, devices: list[Device], lease_micros: int
) -> None:
    items = [issuer.owner_credential()]
    items += [issuer.binding(d.public) for d in devices]
    items.append(issuer.lease(FOG, lease_micros))
    await publish_retained("127.0.0.1", daemon.broker_port, items, **t.issuer_creds)
    await wait_counter(daemon, "owner_accepted")
    await wait_counter(daemon, "bind_accepted", len(devices))
    await wait_counter(daemon, "lease_accepted")


async def test_pay_then_retransmit_gets_same_receipt_and_one_log_record(
    tmp_path: Path, issuer: Issuer, transport: Transport
) -> None:
    device = Device(FOG)
    async with running_fog(fog_config(tmp_path, issuer, transport)) as fog:
        await provision(fog, transport, issuer, [device], 1_000_000)
        async with wallet("127.0.0.1", fog.broker_port, FOG, **transport.creds) as w:
            intent = device.intent(250_000)
            first = await w.pay(device, intent)
            again = await w.pay(device, intent)
            assert first.ok and first.log_index == 1
            raw = w.raw_for(first.intent_id)
            assert len(raw) == 2 and raw[0] == raw[1]  # byte for byte
            assert again == first
            assert fog.counters["intent_authorized"] == 1
            assert fog.counters["intent_replayed"] == 1
    assert not _wal_left(tmp_path)  # a clean stop closes the store (last checkpoint)
    rows = _log_rows(tmp_path / "fog.sqlite")  # (before this opens the file again)
    assert rows == 1


def _log_rows(db: Path) -> int:
    con = sqlite3.connect(db)
    try:
        tables = [r[0] for r in con.execute("select name from sqlite_master where type='table'")]
        assert "log" in tables, tables
        return int(con.execute("select count(*) from log").fetchone()[0])
    finally:
        con.close()


async def test_every_decline_code_is_answered_signed_and_changes_nothing(
    tmp_path: Path, issuer: Issuer, transport: Transport
) -> None:
    clock = Clock()
    t0 = clock.ms
    config = fog_config(tmp_path, issuer, transport, "[policy]\nrate_per_s = 1\nrate_burst = 3\n")
    from protocol.signing import public_key
    from runtime.keyfile import load_key_file

    fog_pub = public_key(load_key_file(tmp_path / "fog.key"))
    poor = Issuer(key=issuer.key, owner_id="poor")
    d = {
        name: Device(FOG)
        for name in (
            "ok",
            "other",
            "unbound",
            "revoked",
            "expired",
            "conflict",
            "stale",
            "rate",
            "currency",
            "payee",
            "tx",
            "day",
            "budget",
        )
    }
    async with running_fog(config, clock=clock) as fog:
        items = [issuer.owner_credential(), poor.owner_credential()]
        plain = ("ok", "other", "revoked", "conflict", "stale", "rate", "currency", "tx")
        items += [issuer.binding(d[n].public) for n in plain]
        items.append(issuer.binding(d["expired"].public, not_after_ms=t0 + 60_000))
        items.append(issuer.binding(d["payee"].public, payees=("shop",)))
        items.append(issuer.binding(d["day"].public, tx_max_micros=100, day_max_micros=150))
        items.append(poor.binding(d["budget"].public))
        items += [issuer.lease(FOG, 1_000_000), poor.lease(FOG, 10)]
        items.append(issuer.revocation(d["revoked"].public))
        await publish_retained("127.0.0.1", fog.broker_port, items, **transport.issuer_creds)
        await wait_counter(fog, "bind_accepted", 12)
        await wait_counter(fog, "lease_accepted", 2)
        await wait_counter(fog, "revoke_accepted", 1)
        await wait_counter(fog, "owner_accepted", 2)

        async with wallet("127.0.0.1", fog.broker_port, FOG, **transport.creds) as w:

            async def expect(
                reason: Reason | None, topic: str, payload: bytes, iid: bytes
            ) -> Receipt:
                raw = await w.send_raw(topic, payload, iid)
                receipt = open_envelope(raw, Receipt, signer=fog_pub).msg
                assert receipt.reason == reason, (reason, receipt)
                return receipt

            ok = d["ok"]
            garbage = b"\x94\x00garbage"
            r = await expect(
                Reason.MALFORMED, ok.intent_topic, garbage, hashlib.sha256(garbage).digest()
            )
            assert r.device == bytes(32) and r.seq == 0
            huge = bytes(2000)
            await expect(Reason.MALFORMED, ok.intent_topic, huge, hashlib.sha256(huge).digest())
            good = ok.intent(100)
            forged = good[:-1] + bytes([good[-1] ^ 1])
            await expect(Reason.BAD_SIGNATURE, ok.intent_topic, forged, intent_id(forged))
            await expect(Reason.TOPIC_MISMATCH, d["other"].intent_topic, good, intent_id(good))
            p = ok.intent(100, fog_id="fog-b")
            await expect(Reason.WRONG_FOG, ok.intent_topic, p, intent_id(p))
            for name, reason in (("unbound", Reason.UNKNOWN_DEVICE), ("revoked", Reason.REVOKED)):
                p = d[name].intent(100)
                await expect(reason, d[name].intent_topic, p, intent_id(p))
            c = d["conflict"]
            p = c.intent(100)
            assert (await expect(None, c.intent_topic, p, intent_id(p))).ok
            p = c.intent(200, seq=c.seq)
            await expect(Reason.SEQ_CONFLICT, c.intent_topic, p, intent_id(p))
            s = d["stale"]
            s.seq = 5
            p = s.intent(100, seq=5)
            await expect(None, s.intent_topic, p, intent_id(p))
            p = s.intent(100, seq=3)
            await expect(Reason.STALE, s.intent_topic, p, intent_id(p))
            p = s.intent(100, seq=6, time_ms=t0 - 600_000)
            await expect(Reason.STALE, s.intent_topic, p, intent_id(p))
            rate = d["rate"]
            for _ in range(3):
                p = rate.intent(1)
                await expect(None, rate.intent_topic, p, intent_id(p))
            p = rate.intent(1)
            await expect(Reason.RATE_LIMITED, rate.intent_topic, p, intent_id(p))
            cases = (
                ("currency", {"currency": "USD"}, Reason.CURRENCY),
                ("payee", {"payee_id": "bar"}, Reason.PAYEE_NOT_ALLOWED),
                ("tx", {"amount_micros": 1_000_001}, Reason.LIMIT_TX),
            )
            for name, overrides, reason in cases:
                amount = overrides.pop("amount_micros", 100)
                p = d[name].intent(amount, **overrides)
                await expect(reason, d[name].intent_topic, p, intent_id(p))
            day = d["day"]
            p = day.intent(100)
            await expect(None, day.intent_topic, p, intent_id(p))
            p = day.intent(100)
            await expect(Reason.LIMIT_DAY, day.intent_topic, p, intent_id(p))
            b = d["budget"]
            short_of_budget = b.intent(11)
            await expect(
                Reason.INSUFFICIENT_BUDGET,
                b.intent_topic,
                short_of_budget,
                intent_id(short_of_budget),
            )

            # declined intents changed nothing: a new lease, and the same bytes now pass
            await publish_retained(
                "127.0.0.1",
                fog.broker_port,
                [poor.lease(FOG, 100)],
                **transport.issuer_creds,
            )
            await wait_counter(fog, "lease_accepted", 3)
            r = await expect(None, b.intent_topic, short_of_budget, intent_id(short_of_budget))
            assert r.ok and r.seq == 1

            # a binding that was valid when loaded expires with the fog's clock
            clock.ms = t0 + 120_000
            p = d["expired"].intent(100)
            await expect(Reason.EXPIRED, d["expired"].intent_topic, p, intent_id(p))

            # a topic whose device level is not a key: dropped, logged, counted, no answer
            with structlog.testing.capture_logs() as logs:
                await w.client.publish(f"fogpay/1/{FOG}/intent/not-a-key", good, qos=1)
                await wait_counter(fog, "topic_dropped")
            assert any(e["event"] == "message_dropped" for e in logs)
            assert all(good.hex() not in str(e) for e in logs)
        authorized = fog.counters["intent_authorized"]
    assert authorized == 1 + 1 + 3 + 1 + 1  # conflict, stale, rate, day, budget
    assert _log_rows(tmp_path / "fog.sqlite") == authorized


async def test_fifty_devices_of_one_owner_exhaust_a_lease_exactly(
    tmp_path: Path, issuer: Issuer, transport: Transport
) -> None:
    devices = [Device(FOG) for _ in range(50)]
    lease_micros = 10_000  # 100 payments of 100; 150 are attempted
    async with running_fog(fog_config(tmp_path, issuer, transport)) as fog:
        await provision(fog, transport, issuer, devices, lease_micros)
        async with wallet("127.0.0.1", fog.broker_port, FOG, **transport.creds) as w:

            async def spend(device: Device) -> list[Receipt]:
                return [await w.pay(device, device.intent(100)) for _ in range(3)]

            results = await asyncio.gather(*(spend(d) for d in devices))
    receipts = [r for rs in results for r in rs]
    ok = [r for r in receipts if r.ok]
    assert len(ok) == 100
    assert {r.reason for r in receipts if not r.ok} == {Reason.INSUFFICIENT_BUDGET}
    assert sorted(r.log_index for r in ok) == list(range(1, 101))
    con = sqlite3.connect(tmp_path / "fog.sqlite")
    try:
        (total,) = con.execute("select sum(amount_micros) from log").fetchone()
    finally:
        con.close()
    assert total == lease_micros


async def test_revocation_takes_effect_while_running(
    tmp_path: Path, issuer: Issuer, transport: Transport
) -> None:
    device = Device(FOG)
    async with running_fog(fog_config(tmp_path, issuer, transport)) as fog:
        await provision(fog, transport, issuer, [device], 1_000_000)
        async with wallet("127.0.0.1", fog.broker_port, FOG, **transport.creds) as w:
            assert (await w.pay(device, device.intent(100))).ok
            await publish_retained(
                "127.0.0.1",
                fog.broker_port,
                [issuer.revocation(device.public)],
                **transport.issuer_creds,
            )
            await wait_counter(fog, "revoke_accepted")
            receipt = await w.pay(device, device.intent(100))
            assert receipt.reason == Reason.REVOKED
            # revoking the owner revokes its devices too
            other = Device(FOG)
            await publish_retained(
                "127.0.0.1",
                fog.broker_port,
                [issuer.binding(other.public)],
                **transport.issuer_creds,
            )
            await wait_counter(fog, "bind_accepted", 2)
            assert (await w.pay(other, other.intent(100))).ok
            owner_revocation = issuer.revocation(bytes(issuer.owner_key.verify_key))
            await publish_retained(
                "127.0.0.1", fog.broker_port, [owner_revocation], **transport.issuer_creds
            )
            await wait_counter(fog, "revoke_accepted", 2)
            assert (await w.pay(other, other.intent(100))).reason == Reason.REVOKED


async def test_restart_authorizes_from_its_database_and_republishes_trust(
    tmp_path: Path, issuer: Issuer
) -> None:
    """The embedded broker keeps nothing across restarts (Mosquitto would): amqtt only."""
    transport = AMQTT
    device = Device(FOG)
    config = fog_config(tmp_path, issuer, transport)
    async with running_fog(config) as fog:
        await provision(fog, transport, issuer, [device], 1_000)
        async with wallet("127.0.0.1", fog.broker_port, FOG, **transport.creds) as w:
            first = await w.pay(device, device.intent(400))
    # a new embedded broker: amqtt kept nothing; the fog's database did
    async with running_fog(config) as fog:
        async with wallet("127.0.0.1", fog.broker_port, FOG, **transport.creds) as w:
            second = await w.pay(device, device.intent(400))
            third = await w.pay(device, device.intent(400))
            retained = await _retained_trust(fog.broker_port)
        assert fog.counters.get("trust_accepted", 0) == 0  # republished copies are duplicates
    assert first.ok and second.ok and second.log_index == 2
    assert third.reason == Reason.INSUFFICIENT_BUDGET  # 800 of 1,000 drawn; the lease survived
    assert topics.bind_topic(device.public) in retained
    assert topics.owner_topic(issuer.owner_id) in retained


async def _retained_trust(port: int) -> set[str]:
    """Topics of retained trust material a fresh subscriber receives."""
    import aiomqtt

    seen: set[str] = set()
    async with aiomqtt.Client("127.0.0.1", port, **AMQTT.creds, timeout=5) as client:
        await client.subscribe(topics.TRUST_FILTER, qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                async for message in client.messages:
                    seen.add(str(message.topic))
                    if len(seen) >= 2:
                        break
    return seen


async def test_bad_trust_material_is_refused_counted_and_changes_nothing(
    tmp_path: Path, issuer: Issuer, transport: Transport
) -> None:
    device = Device(FOG)
    stranger = Issuer(owner_id="acme")  # same owner_id, keys the fog does not trust
    async with running_fog(fog_config(tmp_path, issuer, transport)) as fog:
        bind_topic, _ = issuer.binding(device.public)
        bad = [
            (bind_topic, b"\x94junk"),  # malformed
            stranger.owner_credential(),  # not signed by the issuer
            stranger.binding(device.public),  # signed by an owner key nobody vouched for
            (topics.owner_topic("acme"), bytes(2000)),  # too large: dropped unread
        ]
        await publish_retained("127.0.0.1", fog.broker_port, bad, **transport.issuer_creds)
        await wait_counter(fog, "trust_dropped")
        await wait_counter(fog, "bind_refused")
        await wait_counter(fog, "owner_refused")
        await publish_retained(
            "127.0.0.1", fog.broker_port, [issuer.lease(FOG, 1_000)], **transport.issuer_creds
        )
        await wait_counter(fog, "lease_accepted")
        async with wallet("127.0.0.1", fog.broker_port, FOG, **transport.creds) as w:
            receipt = await w.pay(device, device.intent(100))
    assert receipt.reason == Reason.UNKNOWN_DEVICE
    assert fog.counters.get("owner_accepted", 0) == 0


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path, issuer: Issuer
) -> AsyncIterator[tuple[FogDaemon, "asyncio.Task[None]"]]:
    """A daemon with its store and embedded broker in processes of their own, until ready."""
    daemon = FogDaemon(load_config(fog_config(tmp_path, issuer, AMQTT)))
    ready = asyncio.Event()
    task = asyncio.create_task(daemon.run(ready=ready))
    try:
        async with asyncio.timeout(15):
            await ready.wait()
        yield daemon, task
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def kill_child(
    daemon: FogDaemon, task: "asyncio.Task[None]", pid: int, error: type[Exception], event: str
) -> None:
    """SIGKILL a child of the daemon: run() raises ``error``, ``event`` is logged and counted."""
    with structlog.testing.capture_logs() as logs:
        os.kill(pid, signal.SIGKILL)
        async with asyncio.timeout(15):  # noticed at the next store call or at once
            with pytest.raises(error):
                await task
    assert any(e["event"] == event for e in logs)
    assert daemon.counters[event] == 1


async def test_a_dead_store_process_stops_the_fog_with_its_error(
    tmp_path: Path, issuer: Issuer
) -> None:
    """Killed or crashed, the store process takes nothing down silently: the daemon logs
    store_process_lost, stops, and run() raises (the CLI exits 1; systemd restarts it)."""
    async with serving(tmp_path, issuer) as (daemon, task):
        core = daemon._core
        assert isinstance(core, CoreProcess)
        await kill_child(daemon, task, core.pid, StoreProcessError, "store_process_lost")


async def test_a_dead_broker_process_stops_the_fog_with_its_error(
    tmp_path: Path, issuer: Issuer
) -> None:
    """The embedded broker's process gone, devices have nowhere to connect: the daemon logs
    broker_process_lost and run() raises, instead of reconnecting for an hour."""
    async with serving(tmp_path, issuer) as (daemon, task):
        broker = daemon._broker
        assert isinstance(broker, BrokerProcess) and broker.pid is not None
        await kill_child(daemon, task, broker.pid, BrokerLostError, "broker_process_lost")
    assert not _wal_left(tmp_path)  # the store was closed cleanly all the same


def _wal_left(tmp_path: Path) -> bool:
    """A -wal file left behind means the store was not closed (SQLite checkpoints and removes
    it at the last connection's clean close)."""
    return (tmp_path / "fog.sqlite-wal").exists()


async def test_fog_stats_time_every_answer_and_every_store_call(
    tmp_path: Path, issuer: Issuer
) -> None:
    """Each receipt published is one answer_ms sample and each group one store_ms sample, over
    the fog_stats lines; an answer includes its group's store call, so the slowest answer is
    at least the slowest store call."""
    devices = [Device(FOG) for _ in range(4)]
    config = fog_config(tmp_path, issuer, AMQTT)  # fog_stats every 0.5 s
    with structlog.testing.capture_logs() as logs:
        async with running_fog(config) as fog:
            await provision(fog, AMQTT, issuer, devices, 10**9)
            async with wallet("127.0.0.1", fog.broker_port, FOG, **AMQTT.creds) as w:

                async def pay_three(d: Device) -> list[bytes]:
                    paid = [d.intent(100) for _ in range(3)]
                    for p in paid:  # one at a time, as a device does
                        assert (await w.pay(d, p)).ok
                    return paid

                paid = await asyncio.gather(*(pay_three(d) for d in devices))
                await w.pay(devices[0], paid[0][0])  # a replay is answered (and timed) too
            answers = 3 * len(devices) + 1
            await wait_for(lambda: _summed(logs, "answer_ms_n") >= answers)
            received = fog.counters["intent_received"]
    stats = [e for e in logs if e["event"] == "fog_stats"]
    assert received == answers
    assert _summed(logs, "answer_ms_n") == answers
    assert 1 <= _summed(logs, "store_ms_n") <= answers  # a group holds one intent or more
    timed = [e for e in stats if e["answer_ms_n"]]
    for e in timed:
        assert 0 < e["answer_ms_p50"] <= e["answer_ms_p99"] <= e["answer_ms_max"]
    slowest_store = max(e["store_ms_max"] for e in stats if e["store_ms_n"])
    assert max(e["answer_ms_max"] for e in timed) >= slowest_store


def _summed(logs: list[dict[str, Any]], key: str) -> int:
    return sum(int(e.get(key, 0)) for e in logs if e["event"] == "fog_stats")
