"""A partition between real processes: a cloud (``fogpay cloud run``) and two fogs
(``python -m fog``), each on its own Mosquitto on 127.0.0.1, the fogs' brokers joined to the
cloud's by the shipped bridge (``deploy/mosquitto/fogpay-bridge.conf``); fog-a's bridge goes
through a TCP proxy the test controls (``tcpproxy.py``). Under load the proxy is cut: fog-a
keeps authorizing on the leases it holds while its batches wait; then it heals, and
everything reconciles: every receipt a device holds is booked exactly once, every batch of
both fogs is acked, the ledger balances.

The fogs name each other in ``[federation] peers``; once replication and gossip run, their
traffic crosses the same bridges (docs/protocol.md 17.10), and fog-b holds replicas of
fog-a's batches sealed while it was cut off.
"""

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

import pytest

from cloud.sqlitestore import SqliteStore
from tests.conftest import MosquittoProcess, start_mosquitto
from tests.integration.devices import wallet
from tests.integration.tcpproxy import TcpProxy, tcp_proxy
from tests.pipeline.test_bridge import BRIDGE, bridge_for
from tests.pipeline.test_restarts import (
    cloud_config,
    pay,
    spawn,
    terminate,
    wait_all_acked,
    wait_booked,
    wait_held,
)
from tests.pipeline.world import FOG_EXTRA, Pipeline

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
        f"{len(everything)} receipts booked once {reconciled_s:.1f} s after the heal"
    )


@pytest.mark.skip(reason="needs replica restore (fogpay fog restore): wired by the lead")
async def test_a_fog_that_loses_its_database_mid_run_loses_nothing_replicated(
    world: World,
) -> None:
    """TODO(lead), once replication and restore are merged: as above, but instead of (or
    after) the cut, SIGKILL fog-a, delete its fog.sqlite, run ``fogpay fog restore --config``
    (its peers answer ``fetch`` over the bridges), start it again; then every receipt whose
    batch reached fog-b (``replicas`` table) is booked exactly once, devices upload the rest
    (``held``), and the cloud raises no chain fork. Measure ``records_at_risk``'s maximum
    from fog-a's ``fog_stats``."""
