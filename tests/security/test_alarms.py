"""No money lost silently: every record the cloud refuses to book raises an alarm with its
evidence, ``fogpay cloud alarms`` lists it, ``fogpay cloud check`` fails with the count, and
the metrics count it by kind."""

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

import pytest

from cloud.config import MetricsConfig
from cloud.ingest import ALARM_RECORD_REJECTED, Status
from cloud.metrics import CloudObserver, CloudState
from cloud.sqlitestore import SqliteStore
from tests.cloud.world import World, new_key

FOGPAY: Final = [sys.executable, "-m", "fogpay.cli"]
CLI_TIMEOUT_S: Final = 60.0


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    store = await SqliteStore.open(str(tmp_path / "cloud.sqlite"))
    yield World(store)
    await store.close()


def cloud(tmp_path: Path, *args: str) -> "subprocess.CompletedProcess[str]":
    store = f"sqlite://{tmp_path / 'cloud.sqlite'}"
    argv = [*FOGPAY, "cloud", "--store", store, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False)


async def test_rejected_records_raise_alarms_check_fails_metrics_count(
    world: World, tmp_path: Path
) -> None:
    await world.owner("alice")
    await world.owner("payee")
    fog = await world.fog("fog-a")
    device = await world.device("alice")
    lease_id = (await world.lease("alice", "fog-a", 10_000)).lease.lease_id
    ok = cloud(tmp_path, "check")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["alarms"] == 0

    stranger = new_key()  # trust the cloud never registered: a fog paid it anyway
    good = fog.authorize(device, seq=1, lease_id=lease_id, amount=10)
    unbound = fog.authorize(stranger, seq=1, lease_id=lease_id, amount=700)
    no_lease = fog.authorize(device, seq=2, lease_id=bytes(16), amount=20)
    wire = fog.cut([good, unbound, no_lease])
    ingestor = world.ingestor()
    out = await ingestor.ingest_batch(wire)
    assert out.status is Status.BOOKED and out.booked == 1 and out.rejected == 2
    assert out.alarms == [ALARM_RECORD_REJECTED, ALARM_RECORD_REJECTED]
    assert ingestor.metrics.get(f"alarm_{ALARM_RECORD_REJECTED}") == 2

    again = await world.ingestor().ingest_batch(wire)  # idempotent: no second alarm
    assert again.status is Status.DUPLICATE and again.alarms == []

    listed = cloud(tmp_path, "alarms")
    assert listed.returncode == 0, listed.stderr
    alarms = {a["subject"]: a for a in json.loads(listed.stdout)}
    assert set(alarms) == {"fog-a:1:1", "fog-a:1:2"}
    assert all(
        a["kind"] == ALARM_RECORD_REJECTED and a["fog_id"] == "fog-a" for a in alarms.values()
    )
    unbound_detail = alarms["fog-a:1:1"]["detail"]
    assert "reason=unknown_device" in unbound_detail and "batch=1" in unbound_detail
    intents = await world.tx(
        lambda tx: tx.fetchall("SELECT intent_id FROM rejected ORDER BY position")
    )
    assert f"intent={bytes(intents[0][0]).hex()}" in unbound_detail
    assert "reason=unknown_lease" in alarms["fog-a:1:2"]["detail"]

    check = cloud(tmp_path, "check")
    assert check.returncode == 1
    report = json.loads(check.stdout)
    assert report["ledger_ok"] is True and report["ok"] is False
    assert report["alarms"] == 2 and report["alarms_by_kind"] == {ALARM_RECORD_REJECTED: 2}
    assert "2 alarm(s)" in check.stderr and len(check.stderr.strip().splitlines()) == 1

    state = CloudState(
        counters=lambda: ingestor.metrics.counters,
        broker_up=lambda: True,
        stopping=lambda: False,
        queued=dict,
        store=world.store,
    )
    observer = CloudObserver(MetricsConfig(enabled=False), state)
    text = (await observer.scrape()).decode()
    assert f'fogpay_cloud_alarms_total{{kind="{ALARM_RECORD_REJECTED}"}} 2.0' in text
    assert f'fogpay_cloud_alarms_recorded{{kind="{ALARM_RECORD_REJECTED}"}} 2.0' in text
