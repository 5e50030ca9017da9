"""Partitions and losses between real processes: a cloud (``fogpay cloud run``) and fogs
(``python -m fog``), each on its own Mosquitto on 127.0.0.1, the fogs' brokers joined to the
cloud's by the shipped bridge (``deploy/mosquitto/fogpay-bridge.conf``); a fog's bridge goes
through a TCP proxy the test controls (``tcpproxy.py``). The fogs name each other in
``[federation] peers``: replicas, ``seen`` and revocations cross the same bridges
(docs/protocol.md 17.10). Figures with ``-s``; docs/reliability.md "Federation" quotes them.

- A cut: under load fog-a's proxy is cut; fog-a keeps authorizing on the leases it holds
  while its batches wait; then it heals, and everything reconciles: every receipt a device
  holds is booked exactly once, every batch of both fogs is acked, the ledger balances, and
  fog-b holds replicas of fog-a's batches sealed while it was cut off.
- A lost database: fog-a is SIGKILLed and its files deleted mid-run, ``fogpay fog restore``
  rebuilds it from fog-b, ``fogpay cloud fog close-leases`` closes its old lease, it runs on,
  and the devices (the SDK) upload the receipts only they hold: booked once, no fork.
- A revocation reaches a fog cut from the cloud through its peer (bench/revocation.py's
  set-up, one round).
"""

import asyncio
import contextlib
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import aiomqtt
import nacl.signing
import pytest

from bench import revocation
from cloud import ledger
from cloud.sqlitestore import SqliteStore
from edge.device import KEY_FILE, DeviceSession, PaymentDeclined, PaymentTimeout
from edge.device import Device as Sdk
from protocol import topics
from protocol.batch import decode_record
from protocol.signing import public_key
from runtime.keyfile import write_key_file
from tests.conftest import MosquittoProcess, start_mosquitto
from tests.integration.devices import intent_id, wallet
from tests.integration.tcpproxy import TcpProxy, tcp_proxy
from tests.pipeline.test_bridge import BRIDGE, bridge_for
from tests.pipeline.test_restarts import (
    cloud_config,
    kill,
    pay,
    spawn,
    terminate,
    wait_all_acked,
    wait_booked,
    wait_held,
)
from tests.pipeline.world import FOG_EXTRA, Pipeline, wait_until

pytestmark = pytest.mark.mosquitto

FOGS: Final = ("fog-a", "fog-b")
DEVICES_PER_FOG: Final = 4
CUT_AFTER: Final = 30  # receipts at fog-a before the cut
HEAL_AFTER: Final = 40  # more receipts at fog-a, all authorized while cut off
CUT_MIN_S: Final = 3.0
PAYMENTS_TIMEOUT_S: Final = 60.0


class World:
    def __init__(self, p: Pipeline, brokers: dict[str, MosquittoProcess], proxy: TcpProxy):
        self.p, self.brokers, self.proxy = p, brokers, proxy


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    cloud_dir = tmp_path / "cloud-broker"
    cloud_dir.mkdir()
    cloud = start_mosquitto(cloud_dir)
    brokers = {"cloud": cloud}
    store = await SqliteStore.open(str(tmp_path / "cloud.db"))
    try:
        async with tcp_proxy("127.0.0.1", cloud.endpoint.port) as proxy:
            for fog_id in FOGS:
                d = tmp_path / f"{fog_id}-broker"
                d.mkdir()
                port = proxy.port if fog_id == "fog-a" else cloud.endpoint.port
                bridge = bridge_for(BRIDGE, fog_id, f"127.0.0.1:{port}", "unused")
                brokers[fog_id] = start_mosquitto(d, extra=bridge)
            yield World(Pipeline(store, cloud.endpoint, tmp_path), brokers, proxy)
    finally:
        await store.close()
        for b in reversed(list(brokers.values())):
            b.stop()


def replicas_of(db: Path, origin: str) -> int | None:
    """Replicas of ``origin``'s batches in the fog store ``db``; None without a replica table
    (a fog without replication)."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'replicas'").fetchone():
            return None
        row = conn.execute("SELECT COUNT(*) FROM replicas WHERE origin = ?", (origin,))
        return int(row.fetchone()[0])


async def fog_config(w: World, fog_id: str) -> Path:
    peers = ", ".join(f'"{f}"' for f in FOGS if f != fog_id)
    path = await w.p.fog(fog_id, extra=FOG_EXTRA + f"\n[federation]\npeers = [{peers}]\n")
    own = w.brokers[fog_id].endpoint
    path.write_text(path.read_text().replace(w.p.broker.url, own.url))
    return path


async def test_a_fog_cut_from_the_cloud_keeps_paying_and_reconciles(world: World) -> None:
    w, p = world, world.p
    await p.owner("alice", limit=10_000_000)
    configs = {f: await fog_config(w, f) for f in FOGS}
    devices = {f: [await p.device("alice", f) for _ in range(DEVICES_PER_FOG)] for f in FOGS}
    held: dict[str, list[bytes]] = {f: [] for f in FOGS}
    procs = [
        spawn(
            ["-m", "fogpay.cli", "cloud", "--config", str(cloud_config(p)), "run"],
            p.directory / "cloud.log",
        )
    ]
    procs += [
        spawn(["-m", "fog", "--config", str(configs[f])], p.directory / f"{f}.log") for f in FOGS
    ]
    try:
        async with (
            wallet("127.0.0.1", w.brokers["fog-a"].endpoint.port, "fog-a") as wa,
            wallet("127.0.0.1", w.brokers["fog-b"].endpoint.port, "fog-b") as wb,
        ):
            payers = asyncio.gather(
                *(pay(wa, d, held["fog-a"]) for d in devices["fog-a"]),
                *(pay(wb, d, held["fog-b"]) for d in devices["fog-b"]),
            )
            await wait_held(held["fog-a"], CUT_AFTER)
            w.proxy.cut()
            cut_at, at_cut = time.monotonic(), len(held["fog-a"])
            await wait_held(held["fog-a"], at_cut + HEAL_AFTER)  # authorized while cut off
            # and cut long enough for the bridge to retry (and be refused) a few times
            await asyncio.sleep(max(0.0, CUT_MIN_S - (time.monotonic() - cut_at)))
            during = len(held["fog-a"]) - at_cut
            booked_during = await p.booked(held["fog-a"][at_cut:])
            w.proxy.heal()
            healed = time.monotonic()
            async with asyncio.timeout(PAYMENTS_TIMEOUT_S):
                await payers
        everything = held["fog-a"] + held["fog-b"]
        await wait_booked(p, everything)
        reconciled_s = time.monotonic() - healed
        for f in FOGS:
            await wait_all_acked(p.directory / f / "fog.sqlite")
    finally:
        for proc in reversed(procs):
            assert terminate(proc) == 0
    assert during >= HEAL_AFTER
    # nothing fog-a authorized while cut off reached the cloud before the heal: of the
    # receipts that came after the cut, only those authorized before it (one in flight per
    # device at most) can have been booked by then
    assert sum(booked_during.values()) <= DEVICES_PER_FOG
    assert w.proxy.accepted >= 2  # the bridge connected, and again after the heal
    assert w.proxy.refused >= 1  # it tried while cut off
    await p.check_books(everything)
    # with replication (docs/protocol.md 17.2) in the fog, gossip crossed the same bridges:
    # fog-a's batches reached fog-b through the cloud's broker (the ones sealed while cut
    # off waited in fog-a's bridge, as its batches to the cloud did)
    held_by_b = replicas_of(p.directory / "fog-b" / "fog.sqlite", "fog-a")
    assert held_by_b is None or held_by_b >= 1
    print(  # the figures, with -s (docs/protocol.md 17.10)
        f"partition: {during} payments authorized by fog-a while cut off, "
        f"{sum(booked_during.values())} of them booked before the heal; "
        f"{len(everything)} receipts booked once {reconciled_s:.1f} s after the heal; "
        f"records at risk at fog-a at most "
        f"{logged_max(p.directory / 'fog-a.log', 'fog_stats', 'records_at_risk')} "
        "(its peer is behind the same cut)"
    )


# --- a fog that loses its database mid-run (docs/protocol.md 17.2, 17.3, 17.7, 17.8) -------

LOSE_AFTER: Final = 40  # receipts at fog-a before its disk dies
SDK_PAYMENTS: Final = 24  # per device, before, during and after the loss
SDK_RETRANSMIT_S: Final = 0.5
SDK_ATTEMPTS_MAX: Final = 120  # 60 s of retransmissions at most
TRANSIENT_RETRY_S: Final = 0.1
RESTORE_WAIT_S: Final = 3
CLI_TIMEOUT_S: Final = 60.0
UPLOAD_TIMEOUT_S: Final = 5.0


async def federated_config(w: World, fog_id: str) -> Path:
    """As ``fog_config``, with k = 1 (the only peer holds every batch) so "safe" is "on
    fog-b" (or acked by the cloud)."""
    path = await fog_config(w, fog_id)
    path.write_text(path.read_text().replace("[federation]\n", "[federation]\nreplicas = 1\n"))
    return path


def sdk_device(directory: Path, key: nacl.signing.SigningKey, fog_id: str, fog_key: bytes) -> Sdk:
    """The SDK's device (edge/device.py) with the key the cloud bound: it keeps every ok
    receipt with its intent (held.jsonl) until a hack lists it."""
    state = directory / public_key(key).hex()[:16]
    state.mkdir(parents=True)
    write_key_file(state / KEY_FILE, key)
    return Sdk.open(state, fog_id=fog_id, fog_key=fog_key)


async def pay_sdk(session: DeviceSession, device: Sdk, held: list[bytes]) -> None:
    """``SDK_PAYMENTS`` payments, one at a time; the same intent again on silence (the fog is
    dead, or restoring) or on a transient decline (no lease yet)."""
    for _ in range(SDK_PAYMENTS):
        intent = device.new_intent("shop", 100, "EUR")
        for _ in range(SDK_ATTEMPTS_MAX):
            try:
                await session.send(device, intent, timeout_s=SDK_RETRANSMIT_S, retries_max=0)
                break
            except PaymentTimeout:
                continue
            except PaymentDeclined as exc:
                if not exc.reason.transient:
                    raise
                await asyncio.sleep(TRANSIENT_RETRY_S)
        else:
            raise AssertionError(f"no receipt after {SDK_ATTEMPTS_MAX} attempts")
        held.append(intent.id)


@dataclass(frozen=True)
class FogFile:
    """What a fog's database held: log intent ids by index, batches, peers' raccs, at risk."""

    log: dict[int, bytes]
    batches: dict[int, tuple[int, int]]  # number -> (first_index, count)
    raccd: set[int]
    at_risk: int

    def records_of(self, numbers: set[int]) -> set[bytes]:
        out = set()
        for b in numbers:
            first, count = self.batches[b]
            out |= {self.log[n] for n in range(first, first + count)}
        return out


def read_fog_file(db: Path) -> FogFile:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        log = {int(n): bytes(i) for n, i in conn.execute("SELECT n, intent_id FROM log")}
        rows = conn.execute("SELECT number, first_index, count, acked FROM batches").fetchall()
        batches = {int(b): (int(f), int(c)) for b, f, c, _ in rows}
        has_raccs = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'replica_acks'")
        raccd = (
            {int(b) for (b,) in conn.execute("SELECT DISTINCT number FROM replica_acks")}
            if has_raccs.fetchone()
            else set()  # a restored database, before its first racc
        )
    # records_at_risk (fog/replicas.py, k = 1): in no batch, or in a batch neither the cloud
    # nor the peer acked
    sealed = sum(c for _, c in batches.values())
    unsafe = sum(c for b, _, c, acked in rows if not acked and int(b) not in raccd)
    return FogFile(log, batches, raccd, len(log) - sealed + unsafe)


def logged_max(log: Path, event: str, key: str) -> int:
    """The largest ``key`` of the JSON log lines ``event`` in ``log`` (0 if none)."""
    best = 0
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("event") == event:
                best = max(best, int(entry.get(key, 0)))
    return best


def cli(*args: str) -> tuple[int, str, str]:
    done = subprocess.run(
        [sys.executable, "-m", "fogpay.cli", *args],
        capture_output=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def test_a_fog_that_loses_its_database_mid_run_loses_nothing_replicated(
    world: World,
) -> None:
    """Devices (the SDK) pay at both fogs; fog-a is SIGKILLed and its database deleted mid-run;
    ``fogpay fog restore`` rebuilds it from fog-b's replicas over the bridges; the cloud closes
    the old leases (``fogpay cloud fog close-leases``); fog-a starts again and the devices go
    on paying; then the devices hand in what they hold through fog-a's broker and its bridge
    (one with ``fogpay edge upload``, the others with ``Device.upload_held``). Every receipt a
    device holds is booked exactly once, everything fog-b acked is restored, the chain
    continues without a fork (``fogpay cloud check``)."""
    w, p = world, world.p
    await p.owner("alice", limit=10_000_000)
    configs = {f: await federated_config(w, f) for f in FOGS}
    cloud_cfg = cloud_config(p)
    fog_keys = {f: public_key(p.fog_keys[f]) for f in FOGS}
    devices = {
        f: [
            sdk_device(p.directory / "devices", (await p.device("alice", f)).key, f, fog_keys[f])
            for _ in range(DEVICES_PER_FOG)
        ]
        for f in FOGS
    }
    held: dict[str, list[bytes]] = {f: [] for f in FOGS}
    db_a, db_b = (p.directory / f / "fog.sqlite" for f in FOGS)
    log_a = p.directory / "fog-a.log"
    procs = {
        "cloud": spawn(["-m", "fogpay.cli", "cloud", "--config", str(cloud_cfg), "run"],
                       p.directory / "cloud.log"),
    }  # fmt: skip
    for f in FOGS:
        procs[f] = spawn(["-m", "fog", "--config", str(configs[f])], p.directory / f"{f}.log")
    try:
        async with contextlib.AsyncExitStack() as stack:
            sessions = {}
            for f in FOGS:
                port = w.brokers[f].endpoint.port
                client = await stack.enter_async_context(
                    aiomqtt.Client("127.0.0.1", port, timeout=10, max_inflight_messages=100)
                )
                sessions[f] = await stack.enter_async_context(
                    DeviceSession(client, fog_id=f, fog_key=fog_keys[f])
                )
                for d in devices[f]:
                    await sessions[f].attach(d)
            payers = asyncio.gather(
                *(pay_sdk(sessions[f], d, held[f]) for f in FOGS for d in devices[f])
            )
            stack.callback(payers.cancel)  # a failed step stops the devices first
            await wait_held(held["fog-a"], LOSE_AFTER)
            kill(procs["fog-a"])  # the disk dies with the fog
            lost_at = time.monotonic()
            at_risk_logged = logged_max(log_a, "fog_stats", "records_at_risk")
            await asyncio.sleep(0.5)  # the store's child finishes its transaction and exits
            old = read_fog_file(db_a)
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db_a}{suffix}").unlink(missing_ok=True)  # noqa: ASYNC240 (a test's step)

            restore_started = time.monotonic()
            code, out, err = await asyncio.to_thread(
                cli, "fog", "restore", "--config", str(configs["fog-a"]),
                "--wait-s", str(RESTORE_WAIT_S), "--json",
            )  # fmt: skip
            restore_s = time.monotonic() - restore_started
            assert code == 0, err
            restored = json.loads(out)
            from_b = read_fog_file(db_a)  # what the restore wrote: fog-b's replicas, verified
            code, out, err = await asyncio.to_thread(
                cli, "cloud", "--config", str(cloud_cfg), "fog", "close-leases", "fog-a", "--yes"
            )
            assert code == 0, err
            closed = json.loads(out)
            at_restart = len(held["fog-a"])
            procs["fog-a"] = spawn(["-m", "fog", "--config", str(configs["fog-a"])], log_a)
            await wait_held(held["fog-a"], at_restart + 1)
            serving_s = time.monotonic() - lost_at
            async with asyncio.timeout(PAYMENTS_TIMEOUT_S):
                await payers

        # what the restored fog does not hold, only the devices do
        final_a = read_fog_file(db_a)
        only_devices = [i for i in held["fog-a"] if i not in set(final_a.log.values())]
        uploaded = booked_by_upload = 0
        broker_a = w.brokers["fog-a"].endpoint
        first, *rest = devices["fog-a"]
        # one device hands in its receipts with the command (a process of its own)...
        ids = [intent_id(decode_record(r)[0]) for r in first.held_records()]
        code, out, err = await asyncio.to_thread(
            cli, "edge", "upload", "--state", str(first.state_dir), "--broker", broker_a.url,
            "--fog-id", "fog-a", "--fog-key", fog_keys["fog-a"].hex(),
            "--issuer", p.issuer.hex(), "--timeout", str(UPLOAD_TIMEOUT_S),
        )  # fmt: skip
        assert code == 0, err
        summary = json.loads(out)
        assert (summary["sent"], summary["booked"], summary["held"]) == (len(ids), len(ids), 0)
        uploaded += len(ids)
        booked_by_upload += sum(1 for i in ids if i in only_devices)
        # ... the others with the SDK's call
        async with aiomqtt.Client("127.0.0.1", broker_a.port, timeout=10) as client:
            for d in rest:
                uploaded += len(d.held_records())
                result = await d.upload_held(
                    client, issuer_key=p.issuer, timeout_s=UPLOAD_TIMEOUT_S
                )
                assert (result.refused, result.unanswered, result.held) == ([], 0, 0), result
                booked_by_upload += sum(1 for i in result.booked if i in only_devices)
        everything = held["fog-a"] + held["fog-b"]
        await wait_booked(p, everything)
        for db in (db_a, db_b):
            await wait_all_acked(db)
    finally:
        codes = [terminate(proc) for proc in reversed(procs.values()) if proc.poll() is None]
    assert codes == [0, 0, 0]
    lost_from_fog = set(old.log.values()) - set(from_b.log.values())
    # nothing that reached fog-b is lost: every batch fog-b acked was restored
    assert old.records_of(old.raccd) <= set(from_b.log.values())
    assert set(from_b.log.values()) <= set(old.log.values())  # and nothing else came back
    assert restored["records"] == len(from_b.log) and restored["leases_retired"] >= 1
    # fog-a lost at most what was at risk when its disk died; the devices held the rest
    assert len(lost_from_fog) <= old.at_risk
    assert set(only_devices) <= lost_from_fog
    assert booked_by_upload == len(only_devices)
    assert closed["closed"] and closed["leases"]
    await check_booked_once(p, everything)
    code, out, err = cli("cloud", "--config", str(cloud_cfg), "check")
    assert code == 0, out + err  # the ledger balances and no alarm: no chain_fork
    print(  # the figures, with -s (docs/reliability.md, "Federation")
        f"lost database: {old.at_risk} records at risk when fog-a's disk died "
        f"(max {at_risk_logged} in its fog_stats before), {len(lost_from_fog)} lost from the "
        f"fog; {restored['records']} records in {restored['batches']} batches restored from "
        f"fog-b in {restore_s:.1f} s (serving again {serving_s:.1f} s after the loss); "
        f"{len(closed['leases'])} old leases closed; devices uploaded {uploaded} receipts, "
        f"{booked_by_upload} of them booked only from the upload; "
        f"{len(everything)} receipts booked once"
    )


async def check_booked_once(p: Pipeline, intent_ids: list[bytes]) -> None:
    """The ledger balances, each receipt is booked exactly once, and nothing else is."""
    check = await p.store.transact(ledger.check)
    assert check.ok, check
    booked = await p.booked(intent_ids)
    assert all(n == 1 for n in booked.values()), {k.hex()[:8]: n for k, n in booked.items()}
    total = await p.query("SELECT COUNT(*) FROM transfers")
    assert total[0][0] == len(intent_ids)


# --- a revocation reaches a fog cut from the cloud through its peer (17.5, 17.10) ----------


async def test_a_revocation_reaches_a_fog_cut_from_the_cloud_through_its_peer(
    tmp_path: Path,
) -> None:
    """bench/revocation.py's federation, one round: three fogs, fog-c's uplink cut, fog-c
    joined to fog-b by a direct bridge. The issuer revokes a device (``fogpay cloud device
    revoke``); every fog declines it ``revoked``, fog-c too, although the cloud's retained
    revocation never reached fog-c's broker: fog-b forwarded it (``gossip/fog-c/revoke``)."""
    async with revocation.federation(tmp_path, devices=1) as w, revocation.wallets(w) as ws:
        await revocation.warm_up(w, ws)
        w.proxy.cut()
        probe = w.probes[0]
        result = await revocation.revoke_round(w, ws, probe)
        port = w.brokers[revocation.CUT].endpoint.port
        async with aiomqtt.Client("127.0.0.1", port, timeout=10) as c:
            await c.subscribe("fogpay/1/trust/revoke/#", qos=1)
            retained = []
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    async for message in c.messages:
                        retained.append(str(message.topic))

        async def counted() -> bool:  # the fogs' next fog_stats lines
            return (
                revocation.logged_counter(w.log("fog-b"), "gossip_revoke_sent") >= 1
                and revocation.logged_counter(w.log("fog-c"), "revoke_accepted") >= 1
            )

        await wait_until(counted, timeout_s=10.0)
    assert set(result.after_publish_s) == set(revocation.FOGS)  # each declined it revoked
    assert topics.revoke_topic(probe.public) not in retained  # not from the cloud: cut off
    assert w.proxy.cut_now
    print(  # the figures of one round, with -s (bench/revocation.py for more rounds)
        "revocation: "
        + ", ".join(f"{f} {s * 1000:.0f} ms" for f, s in result.after_publish_s.items())
        + " after the cloud's publish"
    )
