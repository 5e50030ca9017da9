"""Replication and restore with real processes (docs/protocol.md 17.2, 17.3): two fog daemons
(each with its store in a child process) on one amqtt broker, peers of each other. fog-a
authorizes payments and replicates its batches to fog-b; fog-a's database is deleted;
``fogpay fog restore`` (a real process) rebuilds it from fog-b's replicas; the restored fog
answers a retransmitted old intent with its stored receipt and continues its chain."""

import asyncio
import json
import sqlite3
import sys
from pathlib import Path
from typing import Final

from protocol import topics
from protocol.messages import Ack, BatchHeader, FogCredential
from protocol.signing import open_envelope, public_key, seal
from runtime.keyfile import load_key_file
from tests.conftest import BrokerEndpoint
from tests.integration.devices import (
    FAR_FUTURE_MS,
    Device,
    Issuer,
    intent_id,
    publish_retained,
    wallet,
    write_fog_files,
)
from tests.integration.fogrun import running_fog, wait_counter, wait_for

RESTORE_TIMEOUT_S: Final = 60.0
PAYMENTS: Final = 6


def federation(peer: str) -> str:
    return (
        "[batch]\nage_ms = 200\n"
        f'[federation]\npeers = ["{peer}"]\nreplicas = 1\nrelay_after_ms = 600000\n'
    )


def fog_files(tmp_path: Path, fog_id: str, peer: str, issuer: Issuer, url: str) -> Path:
    directory = tmp_path / fog_id
    directory.mkdir()
    return write_fog_files(
        directory,
        fog_id=fog_id,
        issuer_key=issuer.public,
        broker=f'url = "{url}"',
        extra=f"store_process = true\n{federation(peer)}",
    )


def fog_credential(issuer: Issuer, fog_id: str, key_file: Path) -> tuple[str, bytes]:
    cred = FogCredential(
        fog_id=fog_id,
        key=public_key(load_key_file(key_file)),
        not_before_ms=0,
        not_after_ms=FAR_FUTURE_MS,
    )
    return topics.fog_topic(fog_id), seal(cred, issuer.key)


async def restore(config: Path, *extra: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fogpay.cli", "fog", "restore", "--config", str(config),
        "--wait-s", "5", *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(RESTORE_TIMEOUT_S):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def records_at_risk(db: Path) -> int:
    """What fog/replicas.py counts, read from the file: records in no batch, or in a batch
    neither acked by the cloud nor held by a peer (k = 1)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        (n,) = conn.execute(
            "SELECT (SELECT coalesce(max(n), 0) FROM log) - (SELECT coalesce(max(first_index + "
            "count) - 1, 0) FROM batches) + (SELECT coalesce(sum(count), 0) FROM batches WHERE "
            "acked = 0 AND number NOT IN (SELECT number FROM replica_acks))"
        ).fetchone()
    finally:
        conn.close()
    return int(n)


def headers(db: Path) -> list[BatchHeader]:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT header FROM batches ORDER BY number").fetchall()
    finally:
        conn.close()
    return [open_envelope(bytes(r[0]), BatchHeader).msg for r in rows]


async def test_a_fog_that_lost_its_disk_is_restored_from_its_peer(
    tmp_path: Path, amqtt_broker: BrokerEndpoint
) -> None:
    issuer = Issuer()
    url, port = amqtt_broker.url, amqtt_broker.port
    cfg_a = fog_files(tmp_path, "fog-a", "fog-b", issuer, url)
    cfg_b = fog_files(tmp_path, "fog-b", "fog-a", issuer, url)
    db_a = cfg_a.parent / "fog.sqlite"
    devices = [Device("fog-a") for _ in range(2)]
    items = [
        issuer.owner_credential(),
        *(issuer.binding(d.public) for d in devices),
        issuer.lease("fog-a", 50_000_000),
        fog_credential(issuer, "fog-a", cfg_a.parent / "fog.key"),
        fog_credential(issuer, "fog-b", cfg_b.parent / "fog.key"),
    ]
    paid: list[tuple[Device, bytes, bytes]] = []
    at_risk: list[int] = []
    async with running_fog(cfg_b) as b:
        async with running_fog(cfg_a) as a:
            await publish_retained("127.0.0.1", port, items)
            for daemon in (a, b):
                await wait_counter(daemon, "fog_accepted", 2)
            await wait_counter(a, "lease_accepted")
            async with wallet("127.0.0.1", port, "fog-a") as w:
                for i in range(PAYMENTS):
                    dev = devices[i % len(devices)]
                    raw = dev.intent(100_000)
                    answer = await w.pay(dev, raw)
                    assert answer.ok, answer
                    paid.append((dev, raw, w.raw_for(intent_id(raw))[0]))
                    at_risk.append(records_at_risk(db_a))
            # every record is on fog-b: nothing left to lose with fog-a's disk
            await wait_for(lambda: a.counters.get("replica_acked", 0) >= 1)
            await wait_for(lambda: a.counters.get("records_at_risk", -1) == 0)
            assert records_at_risk(db_a) == 0
            assert b.counters.get("replica_stored", 0) >= 1
    sealed_before = headers(db_a)
    assert sum(h.count for h in sealed_before) == PAYMENTS
    for suffix in ("", "-wal", "-shm"):  # the disk dies
        Path(f"{db_a}{suffix}").unlink(missing_ok=True)  # noqa: ASYNC240 (a test's step)

    async with running_fog(cfg_b):
        code, out, err = await restore(cfg_a, "--json")
        assert code == 0, err
        summary = json.loads(out)
        assert summary["records"] == PAYMENTS and summary["head"] == sealed_before[-1].number
        assert summary["leases_retired"] == 1  # the old lease: never drawn on again
        assert headers(db_a) == sealed_before

        code, _, err = await restore(cfg_a)  # the database exists now: refused, usage
        assert code == 2 and "exists" in err

        async with running_fog(cfg_a) as a:
            await publish_retained("127.0.0.1", port, [issuer.lease("fog-a", 50_000_000)])
            await wait_counter(a, "lease_accepted")
            async with wallet("127.0.0.1", port, "fog-a") as w:
                dev, raw, receipt = paid[0]
                again = await w.send_raw(dev.intent_topic, raw, intent_id(raw))
                assert again == receipt  # the stored receipt, byte for byte
                new = devices[1].intent(200_000)
                assert (await w.pay(devices[1], new)).ok
            await wait_for(lambda: len(headers(db_a)) > len(sealed_before))
    after = headers(db_a)
    last, new_batch = sealed_before[-1], after[len(sealed_before)]
    assert new_batch.number == last.number + 1
    assert new_batch.first_index == last.first_index + last.count
    conn = sqlite3.connect(db_a)
    (prev_id,) = conn.execute(
        "SELECT header_id FROM batches WHERE number = ?", (last.number,)
    ).fetchone()
    conn.close()
    assert new_batch.prev_id == bytes(prev_id)  # the chain continues, no fork
    print(f"records at risk while paying: max {max(at_risk)} of {PAYMENTS}")


async def test_a_restore_refuses_when_the_chain_head_is_lost(
    tmp_path: Path, amqtt_broker: BrokerEndpoint
) -> None:
    issuer = Issuer()
    cfg_c = fog_files(tmp_path, "fog-c", "fog-d", issuer, amqtt_broker.url)
    ack = seal(Ack(fog_id="fog-c", number=5, header_id=bytes(32)), issuer.key)
    await publish_retained("127.0.0.1", amqtt_broker.port, [(topics.ack_topic("fog-c"), ack)])
    code, _, err = await restore(cfg_c)
    assert code == 1 and "new fog_id" in err
    assert not (cfg_c.parent / "fog.sqlite").exists()  # nothing written
