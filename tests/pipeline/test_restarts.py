"""Crashes in the pipeline: a fog SIGKILLed while its batches are in flight, and a cloud
SIGKILLed mid-ingest, each restarted: every receipt a device holds is booked exactly once,
the ledger sums to zero, and every batch ends up acked. Both run as real processes
(``python -m fog``, ``python -m fogpay.cli cloud run``); devices retransmit as the protocol
asks."""

import asyncio
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Final

import pytest

from cloud.sqlitestore import SqliteStore
from protocol.messages import Receipt
from protocol.signing import open_envelope
from runtime.keyfile import write_key_file
from tests.conftest import BrokerEndpoint, start_mosquitto
from tests.integration.devices import Device, Wallet, wallet
from tests.integration.fogrun import running_fog, wait_counter
from tests.pipeline.mqtt import running_service
from tests.pipeline.test_end_to_end import first_payment, trusted
from tests.pipeline.world import Pipeline, wait_until

DEVICES: Final = 5
INTENTS_PER_DEVICE: Final = 24
KILL_AFTER_RECEIPTS: Final = 50
RETRANSMIT_S: Final = 0.5
TRANSIENT_RETRY_S: Final = 0.1
ATTEMPTS_MAX: Final = 100
EXIT_TIMEOUT_S: Final = 20.0
BOOKED_TIMEOUT_S: Final = 40.0


def spawn(args: list[str], log: Path) -> "subprocess.Popen[bytes]":
    out = log.open("ab")
    try:
        return subprocess.Popen([sys.executable, *args], stdout=out, stderr=out)
    finally:
        out.close()


def kill(proc: "subprocess.Popen[bytes]") -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=EXIT_TIMEOUT_S)


def terminate(proc: "subprocess.Popen[bytes]") -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=EXIT_TIMEOUT_S)


async def pay(w: Wallet, device: Device, held: list[bytes]) -> None:
    """One intent at a time; the same bytes again on silence or on a transient decline (the
    fog is loading trust, or waiting for the cloud's lease)."""
    for _ in range(INTENTS_PER_DEVICE):
        intent = device.intent(100)
        for _ in range(ATTEMPTS_MAX):
            raw = await w.pay_until_answered(
                device, intent, timeout_s=RETRANSMIT_S, attempts_max=ATTEMPTS_MAX
            )
            reason = open_envelope(raw, Receipt).msg.reason
            if reason is None or not reason.transient:
                break
            await asyncio.sleep(TRANSIENT_RETRY_S)
        receipt = open_envelope(raw, Receipt).msg
        assert receipt.ok, receipt.reason
        held.append(receipt.intent_id)


async def wait_held(held: list[bytes], count: int) -> None:
    async with asyncio.timeout(60):
        while len(held) < count:  # noqa: ASYNC110 (receipts arrive on other tasks)
            await asyncio.sleep(0.01)


async def wait_booked(p: Pipeline, held: list[bytes]) -> None:
    async def done() -> bool:
        return all(n >= 1 for n in (await p.booked(held)).values())

    await wait_until(done, timeout_s=BOOKED_TIMEOUT_S)


def unacked(fog_db: Path) -> int:
    with sqlite3.connect(fog_db) as conn:
        n: int = conn.execute("SELECT COUNT(*) FROM batches WHERE acked = 0").fetchone()[0]
        return n


async def wait_all_acked(fog_db: Path) -> None:
    async def done() -> bool:
        return unacked(fog_db) == 0

    await wait_until(done, timeout_s=BOOKED_TIMEOUT_S)


@pytest.fixture
async def pipe(tmp_path: Path, mosquitto_broker: BrokerEndpoint) -> AsyncIterator[Pipeline]:
    """On Mosquitto: amqtt leaks the transport of a client that was SIGKILLed."""
    store = await SqliteStore.open(str(tmp_path / "cloud.db"))
    yield Pipeline(store, mosquitto_broker, tmp_path)
    await store.close()


@pytest.mark.mosquitto
async def test_a_fog_killed_with_batches_in_flight_loses_and_doubles_nothing(
    pipe: Pipeline,
) -> None:
    p = pipe
    await p.owner("alice", limit=10_000_000)
    config = await p.fog("fog-a")
    devices = [await p.device("alice", "fog-a") for _ in range(DEVICES)]
    log = p.directory / "fog.log"
    held: list[bytes] = []
    async with (
        running_service(p.service()) as cloud,
        wallet(p.edge.host, p.edge.port, "fog-a") as w,
    ):
        fog = spawn(["-m", "fog", "--config", str(config)], log)
        payers = asyncio.gather(*(pay(w, d, held) for d in devices))
        await wait_held(held, KILL_AFTER_RECEIPTS)
        kill(fog)
        fog = spawn(["-m", "fog", "--config", str(config)], log)
        try:
            async with asyncio.timeout(90):
                await payers
            await wait_booked(p, held)
            await wait_all_acked(p.directory / "fog-a" / "fog.sqlite")
        finally:
            assert terminate(fog) == 0
        assert cloud.counters.get("batches_fork", 0) == 0
        assert cloud.counters.get("batches_refused", 0) == 0
    assert len(held) == DEVICES * INTENTS_PER_DEVICE
    await p.check_books(held)


def cloud_config(p: Pipeline) -> Path:
    key = p.directory / "issuer.key"
    write_key_file(key, p.world.issuer)
    path = p.directory / "cloud.toml"
    path.write_text(
        f'store = "sqlite://{p.directory / "cloud.db"}"\nissuer_key = "{key}"\n'
        "[lease]\ninitial_micros = 20000\nrequest_micros_max = 100000\n"
        f'[service]\nbroker_url = "{p.broker.url}"\nverify_workers = 0\n'
        "stats_interval_s = 1.0\n"
    )
    return path


@pytest.mark.mosquitto
async def test_a_cloud_killed_mid_ingest_books_everything_once_after_restart(
    pipe: Pipeline,
) -> None:
    p = pipe
    await p.owner("alice", limit=10_000_000)
    config = await p.fog("fog-a")
    devices = [await p.device("alice", "fog-a") for _ in range(DEVICES)]
    cloud_args = ["-m", "fogpay.cli", "cloud", "--config", str(cloud_config(p)), "run"]
    log = p.directory / "cloud.log"
    held: list[bytes] = []
    cloud = spawn(cloud_args, log)
    try:
        async with (
            running_fog(config) as fog,
            wallet(p.edge.host, p.edge.port, "fog-a") as w,
        ):
            payers = asyncio.gather(*(pay(w, d, held) for d in devices))
            await wait_held(held, KILL_AFTER_RECEIPTS)
            kill(cloud)
            cloud = spawn(cloud_args, log)
            async with asyncio.timeout(90):
                await payers
            await wait_booked(p, held)
            await wait_all_acked(p.directory / "fog-a" / "fog.sqlite")
            assert fog.counters.get("batch_sent", 0) >= 1
    finally:
        assert terminate(cloud) == 0
    assert b'"event": "cloud_stopped"' in log.read_bytes()
    await p.check_books(held)


@pytest.mark.mosquitto
async def test_a_broker_restart_loses_nothing(tmp_path: Path) -> None:
    """Mosquitto (no persistence) restarted mid-flow on the same port: the fog and the cloud
    reconnect; the cloud publishes its retained state again; the fog resends what is unacked."""
    broker = start_mosquitto(tmp_path)
    store = await SqliteStore.open(str(tmp_path / "cloud.db"))
    p = Pipeline(store, broker.endpoint, tmp_path)
    try:
        await p.owner("alice", limit=10_000_000)
        config = await p.fog("fog-a")
        device = await p.device("alice", "fog-a")
        held: list[bytes] = []
        async with running_service(p.service()) as cloud, running_fog(config) as fog:
            async with wallet(p.edge.host, p.edge.port, "fog-a") as w:
                await trusted(fog)
                held.append((await first_payment(fog, w, device)).intent_id)
                held += [(await w.pay(device, device.intent(100))).intent_id for _ in range(20)]
            broker.stop()
            broker = start_mosquitto(tmp_path, port=broker.endpoint.port)
            await wait_counter(fog, "broker_connected", 2)
            await wait_until(_async(lambda: cloud.counters.get("broker_connected", 0) >= 2))
            async with wallet(p.edge.host, p.edge.port, "fog-a") as w:
                held += [(await w.pay(device, device.intent(100))).intent_id for _ in range(20)]
            await wait_booked(p, held)
            await wait_all_acked(p.directory / "fog-a" / "fog.sqlite")
        await p.check_books(held)
    finally:
        await store.close()
        broker.stop()


def _async(predicate: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        return predicate()

    return probe
