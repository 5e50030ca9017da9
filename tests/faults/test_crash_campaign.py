"""The crash campaign: the fog SIGKILLed at random moments under load, round after round, and
the cloud SIGKILLed during ingest every other round, each restarted at once; both are real
processes (``python -m fog``, ``python -m fogpay.cli cloud run``) on Mosquitto, devices pay
all along (one intent at a time, the same bytes again on silence or a transient decline).

After the last round, once the cloud caught up: every ok receipt a device holds is in the
fog's log with the very bytes the device holds, and booked exactly once at the cloud (no more
transfers than receipts held, the ledger sums to zero); no lease is overdrawn, at the fog
(its draws equal the log's amounts per lease) or at the cloud (transfers per lease within
the lease); the batch chain is intact (numbers 1..N, each header's ``h`` the previous header's
id, ``s`` following on, the cloud's chain at the fog's last batch, no alarm).

``FOGPAY_CRASH_ROUNDS`` (default 2 in ``make test``; the campaign runs 30) and
``FOGPAY_CRASH_SEED`` choose the rounds; ``-s`` shows the figures line (``crash_campaign``).
Builds on tests/pipeline/test_restarts.py's helpers (one kill of each there).
"""

import asyncio
import json
import os
import random
import re
import sqlite3
from pathlib import Path
from typing import Final

import pytest

from protocol.messages import BatchHeader, Receipt
from protocol.signing import open_envelope
from runtime.keyfile import write_key_file
from tests.conftest import process_running
from tests.integration.devices import Device, Wallet, wallet
from tests.integration.test_fog_process import exited
from tests.pipeline.test_restarts import (
    kill,
    pipe,  # noqa: F401 (the fixture)
    spawn,
    terminate,
    unacked,
    wait_all_acked,
    wait_booked,
)
from tests.pipeline.world import FOG_EXTRA, Pipeline

ROUNDS: Final = int(os.environ.get("FOGPAY_CRASH_ROUNDS", "2"))
SEED: Final = int(os.environ.get("FOGPAY_CRASH_SEED", "1"))
DEVICES: Final = 6
PAY_MICROS: Final = 100
RETRANSMIT_S: Final = 0.5
TRANSIENT_RETRY_S: Final = 0.1
ATTEMPTS_MAX: Final = 200
RECEIPTS_TIMEOUT_S: Final = 60.0
PAYERS_STOP_TIMEOUT_S: Final = 120.0
# Leases large enough for the whole run. The pipeline tests' 50,000-micro leases cap a fog at
# 4 live leases x 50,000 = 2,000 payments of 100 per lease lifetime (1 h): the cloud refuses
# a fifth live lease, and a fog reports a lease only after it expired. A 30-round run with
# another seed reached that cap (insufficient_budget for minutes): capacity, not a crash.
REQUEST_MICROS: Final = 5_000_000
FOG_LEASES: Final = FOG_EXTRA.replace(
    "request_micros = 50000", f"request_micros = {REQUEST_MICROS}"
)


def cloud_config(p: Pipeline) -> Path:
    """tests/pipeline/test_restarts.py's cloud config with leases of REQUEST_MICROS."""
    key = p.directory / "issuer.key"
    write_key_file(key, p.world.issuer)
    path = p.directory / "cloud.toml"
    path.write_text(
        f'store = "sqlite://{p.directory / "cloud.db"}"\nissuer_key = "{key}"\n'
        f"[lease]\ninitial_micros = {REQUEST_MICROS}\nrequest_micros_max = {REQUEST_MICROS}\n"
        f'[service]\nbroker_url = "{p.broker.url}"\nverify_workers = 0\n'
        "stats_interval_s = 1.0\n"
    )
    return path


async def pay_until(w: Wallet, device: Device, held: list[bytes], stop: asyncio.Event) -> None:
    """Pay until ``stop``; the intent in hand is always finished (a device keeps sending the
    same bytes until it holds the receipt), so every intent sent ends with a receipt held."""
    while not stop.is_set():
        intent = device.intent(PAY_MICROS)
        for _ in range(ATTEMPTS_MAX):
            raw = await w.pay_until_answered(
                device, intent, timeout_s=RETRANSMIT_S, attempts_max=ATTEMPTS_MAX
            )
            reason = open_envelope(raw, Receipt).msg.reason
            if reason is None or not reason.transient:
                break
            await asyncio.sleep(TRANSIENT_RETRY_S)
        assert open_envelope(raw, Receipt).msg.ok, open_envelope(raw, Receipt).msg.reason
        held.append(raw)


def store_pids(log: Path) -> list[int]:
    """The store processes the fog's log names, oldest first. A SIGKILLed fog may leave half
    a line, which the next start's first line continues: split such lines, skip the half."""
    pids = []
    for line in log.read_text().splitlines():
        for part in re.split(r"(?<=\})(?=\{)", line):
            try:
                e = json.loads(part)
            except ValueError:
                continue
            if e.get("event") == "store_opened" and e.get("process"):
                pids.append(e["pid"])
    return pids


async def receipts_grow(held: list[bytes], by: int) -> None:
    target = len(held) + by
    async with asyncio.timeout(RECEIPTS_TIMEOUT_S):
        while len(held) < target:  # noqa: ASYNC110 (receipts arrive on other tasks)
            await asyncio.sleep(0.005)


@pytest.mark.mosquitto
async def test_fog_and_cloud_killed_at_random_lose_and_double_nothing(pipe: Pipeline) -> None:  # noqa: F811
    p = pipe
    rng = random.Random(SEED)
    await p.owner("alice", limit=10**12)
    assert FOG_LEASES != FOG_EXTRA
    config = await p.fog("fog-a", extra=FOG_LEASES)
    fog_db = p.directory / "fog-a" / "fog.sqlite"
    devices = [await p.device("alice", "fog-a") for _ in range(DEVICES)]
    cloud_args = ["-m", "fogpay.cli", "cloud", "--config", str(cloud_config(p)), "run"]
    fog_log, cloud_log = p.directory / "fog.log", p.directory / "cloud.log"
    fog_args = ["-m", "fog", "--config", str(config)]
    held: list[bytes] = []
    kills = {"fog": 0, "cloud": 0, "cloud_with_batches_in_flight": 0}
    at_kill: list[int] = []
    stop = asyncio.Event()
    cloud = spawn(cloud_args, cloud_log)
    fog = spawn(fog_args, fog_log)
    try:
        async with wallet(p.edge.host, p.edge.port, "fog-a") as w:
            payers = asyncio.gather(*(pay_until(w, d, held, stop) for d in devices))
            try:
                for round_ in range(ROUNDS):
                    await receipts_grow(held, rng.randint(3, 40))
                    await asyncio.sleep(rng.uniform(0.0, 0.3))
                    pids = store_pids(fog_log)
                    kill(fog)
                    kills["fog"] += 1
                    at_kill.append(len(held))
                    if pids:
                        await exited(pids[-1])  # its store process does not outlive it
                    fog = spawn(fog_args, fog_log)
                    if round_ % 2 == 1:
                        await receipts_grow(held, rng.randint(1, 20))
                        await asyncio.sleep(rng.uniform(0.0, 0.3))
                        kills["cloud_with_batches_in_flight"] += unacked(fog_db) > 0
                        kill(cloud)
                        kills["cloud"] += 1
                        cloud = spawn(cloud_args, cloud_log)
                await receipts_grow(held, 10)  # the last restart serves too
            finally:
                stop.set()
                async with asyncio.timeout(PAYERS_STOP_TIMEOUT_S):
                    await payers
        await wait_booked(p, [open_envelope(r, Receipt).msg.intent_id for r in held])
        await wait_all_acked(fog_db)
    finally:
        fog_rc = terminate(fog) if process_running(fog.pid) else fog.wait()
        cloud_rc = terminate(cloud) if process_running(cloud.pid) else cloud.wait()
    assert fog_rc == 0 and cloud_rc == 0

    receipts = [open_envelope(raw, Receipt).msg for raw in held]
    ids = [r.intent_id for r in receipts]
    assert len(set(ids)) == len(ids)
    await p.check_books(ids)  # booked exactly once each, nothing more, ledger balanced
    con = sqlite3.connect(fog_db)
    try:
        check_fog_log(con, held, ids)
        last = check_fog_chain(con)
        check_fog_leases(con)
    finally:
        con.close()
    await check_cloud(p, last)
    print(
        json.dumps(
            {
                "event": "crash_campaign",
                "rounds": ROUNDS,
                "seed": SEED,
                "kills": kills,
                "receipts_held": len(held),
                "receipts_at_fog_kills": at_kill,
                "batches": last[0],
                "store_opened_lines": len(store_pids(fog_log)),  # a kill may cut one
            }
        )
    )
    assert kills["fog"] == ROUNDS and kills["cloud"] == ROUNDS // 2


def check_fog_log(con: sqlite3.Connection, held: list[bytes], ids: list[bytes]) -> None:
    rows = con.execute("SELECT n, intent_id, receipt FROM log ORDER BY n").fetchall()
    assert [n for n, _, _ in rows] == list(range(1, len(rows) + 1))
    stored = {bytes(i): bytes(r) for _, i, r in rows}
    assert set(stored) == set(ids)  # every receipt held is logged, nothing else is
    for raw, i in zip(held, ids, strict=True):
        assert stored[i] == raw


def check_fog_chain(con: sqlite3.Connection) -> tuple[int, bytes, int]:
    """Numbers 1..N, h = previous header id, s following on; (N, last id, next index)."""
    rows = con.execute(
        "SELECT number, header_id, header, first_index, count FROM batches ORDER BY number"
    ).fetchall()
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1)) and rows
    prev, next_index = bytes(32), 1
    for number, header_id, header, first, count in rows:
        signed = open_envelope(bytes(header), BatchHeader)
        h = signed.msg
        assert signed.id == bytes(header_id)
        assert (h.number, h.prev_id, h.first_index, h.count) == (number, prev, first, count)
        assert first == next_index
        prev, next_index = bytes(header_id), first + count
    total = con.execute("SELECT count(*) FROM log").fetchone()[0]
    assert next_index == total + 1  # every record sealed
    return len(rows), prev, next_index


def check_fog_leases(con: sqlite3.Connection) -> None:
    drawn = dict(con.execute("SELECT lease_id, drawn_micros FROM leases").fetchall())
    amounts = dict(con.execute("SELECT lease_id, amount_micros FROM leases").fetchall())
    logged = dict(
        con.execute("SELECT lease_id, sum(amount_micros) FROM log GROUP BY lease_id").fetchall()
    )
    for lease_id, d in drawn.items():
        assert d <= amounts[lease_id]
        assert d == logged.get(lease_id, 0)
    assert set(logged) <= set(drawn)


async def check_cloud(p: Pipeline, last: tuple[int, bytes, int]) -> None:
    chain = await p.query(
        "SELECT number, header_id, next_index FROM chains WHERE fog_id = ?", ("fog-a",)
    )
    assert [(n, bytes(h), i) for n, h, i in chain] == [last]
    assert await p.query("SELECT kind, subject FROM alarms") == []
    assert await p.query("SELECT reason FROM rejected") == []
    over = await p.query(
        "SELECT l.lease_id FROM leases l JOIN transfers t ON t.lease_id = l.lease_id "
        "GROUP BY l.lease_id HAVING sum(t.amount_micros) > max(l.amount_micros)"
    )
    assert over == []
    assert await p.query("SELECT lease_id FROM leases WHERE drawn_micros > amount_micros") == []
