"""``fogpay sandbox`` with its cloud, as a real subprocess: material provisioned by hand with
the issuer seed is mirrored into the cloud's registry, and a payment at the fog ends up
booked in the cloud's store, acked, and in a ledger that checks."""

import asyncio
import json
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any, Final

import tests.edge.test_sandbox_process as sbx
from edge.device import Device
from fogpay.sandbox import SANDBOX_JSON, SandboxInfo

BOOK_WAIT_S: Final = 30.0


def cloud_cli(store: str, *args: str) -> Any:
    """``fogpay cloud --store STORE ...``; its stdout is one JSON document."""
    done = subprocess.run(
        [*sbx.FOGPAY, "cloud", "--store", store, *args],
        capture_output=True,
        text=True,
        timeout=sbx.CLI_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def booked(cloud_db: Path, intent_id: bytes) -> bool:
    with sqlite3.connect(f"file:{cloud_db}?mode=ro", uri=True) as db:
        row = db.execute("SELECT COUNT(*) FROM transfers WHERE intent_id = ?", (intent_id,))
        return bool(row.fetchone()[0])


def wait_booked(cloud_db: Path, intent_id: bytes) -> None:
    deadline = time.monotonic() + BOOK_WAIT_S
    while not booked(cloud_db, intent_id):
        assert time.monotonic() < deadline, "the payment was never booked in the cloud"
        time.sleep(0.1)


def test_sandbox_payment_is_booked_in_its_cloud(tmp_path: Path) -> None:
    directory, work, log = tmp_path / "sbx", tmp_path / "work", tmp_path / "sandbox.log"
    work.mkdir()
    proc = sbx.start_sandbox(directory, log)
    try:
        raw = json.loads((directory / SANDBOX_JSON).read_text())
        assert raw["cloud"] == {"db": "cloud.sqlite"}
        info = SandboxInfo.load(directory / SANDBOX_JSON)
        cloud_db = directory / "cloud.sqlite"
        device = Device.open(work / "dev", fog_id=info.fog_id, fog_key=info.fog_key)
        sbx.provision(directory, work, info, device)
        receipt = asyncio.run(sbx.pay(info, device, 10_000))
        wait_booked(cloud_db, receipt.msg.intent_id)
        with sqlite3.connect(f"file:{cloud_db}?mode=ro", uri=True) as db:
            owner = db.execute("SELECT currency, funding_ref FROM owners WHERE owner_id = 'acme'")
            assert owner.fetchone() == ("EUR", "")
            (devices,) = db.execute("SELECT COUNT(*) FROM bindings").fetchone()
            amount = db.execute(
                "SELECT debit, credit, amount_micros FROM transfers WHERE intent_id = ?",
                (receipt.msg.intent_id,),
            ).fetchone()
        assert devices == 1 and amount == ("acme", "shop-1", 10_000)
        store = f"sqlite://{cloud_db}"
        (hand_granted,) = cloud_cli(store, "lease", "list", "acme")
        assert hand_granted["lease_id"] == receipt.msg.lease_id.hex()
        assert (hand_granted["amount_micros"], hand_granted["drawn_micros"]) == (20_000_000, 10_000)
        check = cloud_cli(store, "check")
        assert check["ok"] is True and check["sums_micros"] == {"EUR": 0}
    finally:
        assert sbx.stop_sandbox(proc) == 0
    assert "Traceback" not in log.read_text()
