"""The pipelined group commit through a real broker (Mosquitto) and a real device client:
a receipt is not published while the fsync that makes its record durable has not completed,
although the record is committed (another connection reads it); once the sync completes the
receipt arrives, the very bytes the log holds. The daemon runs in this process
(``store_process = false``) so that a test hook can hold the sync threads: the hook is called
in place of the WAL's fdatasync and calls it once released."""

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Final

import pytest

from fog.config import load_config
from fog.daemon import FogDaemon
from protocol.messages import Receipt
from protocol.signing import open_envelope
from tests.conftest import BrokerEndpoint
from tests.integration.devices import (
    Device,
    Issuer,
    intent_id,
    publish_retained,
    wallet,
    write_fog_files,
)
from tests.integration.fogrun import READY_TIMEOUT_S, STOP_TIMEOUT_S, wait_for

FOG: Final = "fog-p"
HOLD_S: Final = 0.5  # the gate stays closed this long after the commit (a receipt would come)
GATE_WAIT_S: Final = 30.0  # a sync thread never waits longer (bounded)


class Gate:
    def __init__(self) -> None:
        self.open = threading.Event()
        self.open.set()
        self.synced = 0
        self.lock = threading.Lock()

    def __call__(self, fsync: Callable[[], None]) -> None:
        self.open.wait(GATE_WAIT_S)
        fsync()
        with self.lock:
            self.synced += 1


def stored_receipt(db: Path, iid: bytes) -> bytes | None:
    con = sqlite3.connect(db)
    try:
        row = con.execute("SELECT receipt FROM log WHERE intent_id = ?", (iid,)).fetchone()
    finally:
        con.close()
    return None if row is None else bytes(row[0])


@pytest.mark.mosquitto
async def test_no_receipt_leaves_before_the_sync_that_covers_its_record(
    tmp_path: Path, mosquitto_broker: BrokerEndpoint
) -> None:
    issuer, device = Issuer(), Device(FOG)
    config = write_fog_files(
        tmp_path,
        fog_id=FOG,
        issuer_key=issuer.public,
        broker=f'url = "{mosquitto_broker.url}"',
        extra="store_process = false\nstore_pipeline = true\n",
    )
    db = tmp_path / "fog.sqlite"
    trust = [issuer.owner_credential(), issuer.lease(FOG, 10**12), issuer.binding(device.public)]
    await publish_retained("127.0.0.1", mosquitto_broker.port, trust)
    daemon = FogDaemon(load_config(config))
    gate = Gate()
    daemon.sync_hook = gate
    ready = asyncio.Event()
    task = asyncio.create_task(daemon.run(ready=ready))
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            await ready.wait()
        async with wallet("127.0.0.1", mosquitto_broker.port, FOG) as w:
            first = device.intent(100)
            for _ in range(100):  # bounded: trust may still be loading (a transient decline)
                r = open_envelope(
                    await w.send_raw(device.intent_topic, first, intent_id(first)), Receipt
                ).msg
                if r.ok:
                    break
                await asyncio.sleep(0.05)
            assert r.ok
            gate.open.clear()  # from here no sync completes
            synced = gate.synced
            held = device.intent(100)
            iid = intent_id(held)
            await w.client.publish(device.intent_topic, held, qos=1)
            await wait_for(lambda: stored_receipt(db, iid) is not None)  # decided, committed
            await asyncio.sleep(HOLD_S)
            assert w.raw_for(iid) == []  # committed, not durable: no receipt left
            assert gate.synced == synced
            gate.open.set()
            await wait_for(lambda: w.raw_for(iid) != [])
            [raw] = w.raw_for(iid)
            assert open_envelope(raw, Receipt).msg.ok
            assert raw == stored_receipt(db, iid)
            assert gate.synced > synced
    finally:
        gate.open.set()
        await daemon.stop()
        async with asyncio.timeout(STOP_TIMEOUT_S):
            await task
