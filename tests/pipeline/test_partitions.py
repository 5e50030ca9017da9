"""Cloud ingest partitioned by fog (cloud/partition.py), as real processes over one real
PostgreSQL and a real Mosquitto: ``fogpay cloud run --partition I/P``.

- Two partitions, a process each; fogs of both partitions send their batches (a fog's
  go-back-N: resend what the retained ack does not cover). Partition 1's process is
  SIGKILLed once it has booked some of its fogs' batches and not all; partition 0's process
  takes partition 1 over and books the rest. Every batch booked once, every record once,
  the shared owner's account (its devices pay at fogs of both partitions) exactly the sum
  of its payments, the ledger balanced, ``fogpay cloud check`` ok.
- Two processes configured for the same partition: one books, the other books nothing
  until the first is killed, then it books the rest.
"""

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiomqtt
import nacl.signing
import pytest

from cloud import ledger
from cloud.partition import partition_of
from cloud.pgstore import PgStore
from cloud.store import Tx
from protocol import topics
from protocol.messages import Ack
from protocol.signing import open_envelope
from runtime.keyfile import write_key_file
from tests.cloud.conftest import drop_schema, pg_schema_store
from tests.cloud.world import World, count
from tests.conftest import BrokerEndpoint
from tests.integration.fogrun import wait_for
from tests.pipeline.test_restarts import EXIT_TIMEOUT_S, terminate

pytestmark = [pytest.mark.mosquitto, pytest.mark.postgres]

BATCHES_PER_FOG: Final = 6
RECORDS_PER_BATCH: Final = 20
FOGS_PER_PARTITION: Final = 2
WINDOW: Final = 2  # batches in flight per fog: ingest takes several rounds
RESEND_S: Final = 1.0
ROUND_S: Final = 0.1
READY_TIMEOUT_S: Final = 30.0
DONE_TIMEOUT_S: Final = 90.0
AMOUNT: Final = 1_000


@dataclass
class Fleet:
    """The fogs' batches, and what the books must say once they are all booked."""

    world: World
    schema: str
    batches: dict[str, list[bytes]] = field(default_factory=dict)
    paid: dict[str, int] = field(default_factory=dict)  # owner -> micros paid in all
    records: int = 0


def fog_ids(partitions: int, per_partition: int) -> list[str]:
    """Fog ids that fill each partition with ``per_partition`` fogs."""
    chosen: dict[int, list[str]] = {i: [] for i in range(partitions)}
    for k in range(10_000):
        fog_id = f"fog-{k}"
        bucket = chosen[partition_of(fog_id, partitions)]
        if len(bucket) < per_partition:
            bucket.append(fog_id)
        if all(len(b) == per_partition for b in chosen.values()):
            break
    return [f for b in chosen.values() for f in b]


async def build_fleet(store: PgStore, schema: str, fogs: list[str]) -> Fleet:
    world = World(store)
    fleet = Fleet(world, schema)
    owners = ("alice", "bob")  # alice's devices pay at every fog, of both partitions
    for owner in owners:
        await world.owner(owner, limit=10**12)
    devices: list[tuple[str, nacl.signing.SigningKey]] = []
    for owner in owners:
        for _ in range(2):
            devices.append((owner, await world.device(owner)))
    seqs = [0] * len(devices)
    for fog_id in fogs:
        log = await world.fog(fog_id)
        lease = {o: (await world.lease(o, fog_id, 10**9)).lease.lease_id for o in owners}
        wires = []
        for _ in range(BATCHES_PER_FOG):
            records = []
            for r in range(RECORDS_PER_BATCH):
                d = r % len(devices)
                owner, key = devices[d]
                seqs[d] += 1
                records.append(
                    log.authorize(key, seq=seqs[d], lease_id=lease[owner], amount=AMOUNT)
                )
                fleet.paid[owner] = fleet.paid.get(owner, 0) + AMOUNT
                fleet.records += 1
            wires.append(log.cut(records))
        fleet.batches[fog_id] = wires
    return fleet


@pytest.fixture
async def pg_store(pg_dsn: str) -> AsyncIterator[tuple[PgStore, str]]:
    store, schema = await pg_schema_store(pg_dsn)
    try:
        yield store, schema
    finally:
        await store.close()
        await drop_schema(pg_dsn, schema)


def write_config(
    directory: Path, world: World, dsn: str, schema: str, broker: BrokerEndpoint
) -> Path:
    key = directory / "issuer.key"
    write_key_file(key, world.issuer)
    sep = "&" if "?" in dsn else "?"
    path = directory / "cloud.toml"
    path.write_text(
        f'store = "{dsn}{sep}search_path={schema}"\nissuer_key = "{key}"\n'
        f'[service]\nbroker_url = "{broker.url}"\nverify_workers = 1\n'
        "stats_interval_s = 1.0\npartition_check_s = 0.2\n"
    )
    return path


def events(log: Path, name: str) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("event") == name:
                out.append(entry)
    return out


async def wait_log(
    log: Path, name: str, *, timeout_s: float = READY_TIMEOUT_S, **match: Any
) -> None:
    async with asyncio.timeout(timeout_s):
        while not any(all(e.get(k) == v for k, v in match.items()) for e in events(log, name)):  # noqa: ASYNC110 (a log file)
            await asyncio.sleep(0.1)


def spawn(args: list[str], log: Path) -> "subprocess.Popen[bytes]":
    """A cloud process in a session of its own (``kill`` takes its verify workers too)."""
    out = log.open("ab")
    try:
        return subprocess.Popen(
            [sys.executable, *args], stdout=out, stderr=out, start_new_session=True
        )
    finally:
        out.close()


def kill(proc: "subprocess.Popen[bytes]") -> None:
    """SIGKILL the process and everything it started, as when its machine dies."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=EXIT_TIMEOUT_S)


@contextlib.contextmanager
def processes() -> Iterator[list["subprocess.Popen[bytes]"]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                terminate(proc)
            with contextlib.suppress(ProcessLookupError):  # its workers, if any are left
                os.killpg(proc.pid, signal.SIGKILL)


class Fogs:
    """The fogs' uplink: each fog sends its next ``WINDOW`` unacked batches, again after
    ``RESEND_S`` of silence, and as soon as its retained ack moves."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.acked = {fog_id: 0 for fog_id in fleet.batches}
        self._sent: dict[str, tuple[int, float]] = {}

    def done(self, fogs: list[str] | None = None) -> bool:
        return all(self.acked[f] == BATCHES_PER_FOG for f in fogs or self.acked)

    async def run(self, broker: BrokerEndpoint, stop: asyncio.Event) -> None:
        async with aiomqtt.Client(
            broker.host, broker.port, username=broker.username, password=broker.password, timeout=10
        ) as client:
            await client.subscribe("fogpay/1/up/+/ack", qos=1)
            reader = asyncio.create_task(self._read(client))
            try:
                while not stop.is_set():
                    await self._send(client)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), ROUND_S)
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await reader

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            if not isinstance(payload, bytes) or not payload:
                continue
            ack = open_envelope(payload, Ack).msg
            if ack.fog_id in self.acked:
                self.acked[ack.fog_id] = max(self.acked[ack.fog_id], ack.number)

    async def _send(self, client: aiomqtt.Client) -> None:
        now = time.monotonic()
        for fog_id, wires in self.fleet.batches.items():
            acked = self.acked[fog_id]
            if acked == len(wires):
                continue
            last = self._sent.get(fog_id)
            if last is not None and last[0] == acked and now - last[1] < RESEND_S:
                continue
            self._sent[fog_id] = (acked, now)
            for wire in wires[acked : acked + WINDOW]:
                await client.publish(topics.batch_topic(fog_id), wire, qos=1, timeout=10)


async def check_books(fleet: Fleet, store: PgStore, config: Path) -> None:
    fogs = len(fleet.batches)
    assert await count(store, "batches") == fogs * BATCHES_PER_FOG
    assert await count(store, "records") == fleet.records
    assert await count(store, "transfers") == fleet.records  # intent_id is the key: once each

    async def chains(tx: Tx) -> dict[str, int]:
        return {r[0]: int(r[1]) for r in await tx.fetchall("SELECT fog_id, number FROM chains")}

    assert await store.transact(chains) == dict.fromkeys(fleet.batches, BATCHES_PER_FOG)
    check = await store.transact(ledger.check)
    assert check.ok, check
    for owner, paid in fleet.paid.items():  # updates from both partitions, none lost
        assert await store.transact(lambda tx, o=owner: ledger.balance(tx, o, "EUR")) == -paid
    cli = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "fogpay.cli", "cloud", "--config", str(config), "check"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(cli.communicate(), 60)
    assert cli.returncode == 0, out


def booked_fogs(log: Path) -> set[str]:
    return {e["fog_id"] for e in events(log, "batch_ingested") if e.get("status") == "booked"}


async def test_a_partition_killed_mid_ingest_is_taken_over_and_every_batch_booked_once(
    pg_store: tuple[PgStore, str], pg_dsn: str, mosquitto_broker: BrokerEndpoint, tmp_path: Path
) -> None:
    store, schema = pg_store
    fogs = fog_ids(2, FOGS_PER_PARTITION)
    fleet = await build_fleet(store, schema, fogs)
    config = write_config(tmp_path, fleet.world, pg_dsn, schema, mosquitto_broker)
    mine = {i: [f for f in fogs if partition_of(f, 2) == i] for i in (0, 1)}
    logs = [tmp_path / "p0.log", tmp_path / "p1.log"]
    base = ["-m", "fogpay.cli", "cloud", "--config", str(config), "run", "--partition"]
    uplink = Fogs(fleet)
    stop = asyncio.Event()
    with processes() as procs:
        for i in (0, 1):
            procs.append(spawn([*base, f"{i}/2"], logs[i]))
        for i in (0, 1):
            await wait_log(logs[i], "partition_acquired", partition=i)
        sender = asyncio.create_task(uplink.run(mosquitto_broker, stop))
        try:
            # some of partition 1 booked, not all
            await wait_for(
                lambda: any(uplink.acked[f] >= 1 for f in mine[1]), timeout_s=DONE_TIMEOUT_S
            )
            assert not uplink.done(mine[1])
            kill(procs[1])
            await wait_log(logs[0], "partition_acquired", partition=1, takeover=True)
            await wait_for(uplink.done, timeout_s=DONE_TIMEOUT_S)
        finally:
            stop.set()
            await sender
        # each process booked only its own partition's fogs until the takeover
        assert booked_fogs(logs[1]) <= set(mine[1])
        assert booked_fogs(logs[0]) >= set(mine[0])
        assert booked_fogs(logs[0]) & set(mine[1])  # the takeover booked partition 1's rest
    await check_books(fleet, store, config)


async def test_two_processes_for_one_partition_one_books_the_other_waits(
    pg_store: tuple[PgStore, str], pg_dsn: str, mosquitto_broker: BrokerEndpoint, tmp_path: Path
) -> None:
    store, schema = pg_store
    fogs = fog_ids(1, 3)
    fleet = await build_fleet(store, schema, fogs)
    config = write_config(tmp_path, fleet.world, pg_dsn, schema, mosquitto_broker)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    base = ["-m", "fogpay.cli", "cloud", "--config", str(config), "run", "--partition", "0/1"]
    uplink = Fogs(fleet)
    stop = asyncio.Event()
    with processes() as procs:
        procs.append(spawn(base, logs[0]))
        await wait_log(logs[0], "partition_acquired", partition=0)
        procs.append(spawn(base, logs[1]))
        await wait_log(logs[1], "cloud_stats")  # running, and not holding the partition
        sender = asyncio.create_task(uplink.run(mosquitto_broker, stop))
        try:
            await wait_for(
                lambda: sum(uplink.acked.values()) >= BATCHES_PER_FOG, timeout_s=DONE_TIMEOUT_S
            )
            assert not uplink.done()
            assert not events(logs[1], "partition_acquired")
            assert not booked_fogs(logs[1])  # the standby booked nothing
            kill(procs[0])
            await wait_log(logs[1], "partition_acquired", partition=0, takeover=False)
            await wait_for(uplink.done, timeout_s=DONE_TIMEOUT_S)
        finally:
            stop.set()
            await sender
        assert booked_fogs(logs[1])  # the standby booked the rest
    await check_books(fleet, store, config)


def test_fog_ids_fill_both_partitions() -> None:
    fogs = fog_ids(2, 2)
    assert sorted(partition_of(f, 2) for f in fogs) == [0, 0, 1, 1]
