"""Device-to-device payments (docs/protocol.md 18.3) with real processes: ``fogpay sandbox``
(a real fog, its broker and the cloud) and ``fogpay edge`` commands, each a process of its own.

A payer obtains a voucher through the fog; the sandbox stops (no fog, no broker, no cloud);
the payer pays two payees device to device, and a copy of its state (a cloned key) pays a
third payee at a voucher sequence already used; the payees check each bundle with the issuer's
key alone. The sandbox comes back, the payees hand in: each payment is booked once, never more
than the voucher's amount, the double spend is refused, attributed to the payer's device, and
the device is revoked."""

import json
import shutil
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

from tests.edge.test_sandbox_process import CLI_TIMEOUT_S, FOGPAY, start_sandbox, stop_sandbox

VOUCHER = 10_000
UPLOADS_MAX = 20


def run(*args: str, code: int = 0) -> dict[str, Any]:
    done = subprocess.run(
        [*FOGPAY, *args], capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False
    )
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr[-2000:])
    out: dict[str, Any] = json.loads(done.stdout)
    return out


def upload(directory: Path, state: Path) -> dict[str, Any]:
    """Hand in what ``state`` holds until the cloud answered every record (the voucher
    intent's batch may still be on its way: such a payment is left for the next upload)."""
    for _ in range(UPLOADS_MAX):
        done = subprocess.run(
            [
                *FOGPAY,
                "edge",
                "upload",
                "--sandbox",
                str(directory),
                "--state",
                str(state),
                "--timeout",
                "2",
                "--retries",
                "0",
            ],
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
            check=False,
        )
        assert done.returncode in (0, 1), done.stderr[-2000:]
        out: dict[str, Any] = json.loads(done.stdout)
        if out["held"] == 0:
            return out
    raise AssertionError(f"{state}: still holding after {UPLOADS_MAX} uploads: {out}")


def test_devices_pay_each_other_offline_then_hand_in_once(tmp_path: Path) -> None:
    directory, devices = tmp_path / "sbx", tmp_path / "devices"
    log = tmp_path / "sandbox.log"
    sbx = ["--sandbox", str(directory)]
    proc = start_sandbox(directory, log)
    try:
        sim = run(
            "edge",
            "simulate",
            *sbx,
            "--devices",
            "3",
            "--count",
            "3",
            "--rate",
            "20",
            "--amount",
            str(VOUCHER),
            "--lease",
            "100000000",
            "--devices-dir",
            str(devices),
            "--json",
        )
        assert sim["status"] == {"ok": 3}, sim
        payer, pad2, pad3 = (devices / f"dev-0000{n}" for n in range(3))
        got = run("edge", "voucher", *sbx, "--state", str(payer), "--amount", str(VOUCHER))
        assert got["status"] == "ok" and got["amount_micros"] == VOUCHER, got
        voucher = got["voucher"]
    finally:
        assert stop_sandbox(proc) == 0
    clone = tmp_path / "clone"
    shutil.copytree(payer, clone)  # the payer's key copied, with its voucher state

    # no fog, no broker, no cloud: device to device, through files
    def pay(state: Path, payee: str, amount: int, out: str) -> dict[str, Any]:
        return run(
            "edge",
            "d2d-pay",
            *sbx,
            "--state",
            str(state),
            "--payee",
            payee,
            "--amount",
            str(amount),
            "--out",
            str(tmp_path / out),
        )

    def accept(state: Path, payee: str, bundle: str, code: int = 0) -> dict[str, Any]:
        return run(
            "edge",
            "d2d-accept",
            *sbx,
            "--state",
            str(state),
            "--payee",
            payee,
            "--bundle",
            str(tmp_path / bundle),
            code=code,
        )

    assert pay(payer, "pad-2", 3_000, "b1")["left_micros"] == {voucher: 7_000}
    a1 = accept(pad2, "pad-2", "b1")
    assert a1["status"] == "ok" and a1["seq"] == 1 and a1["voucher"] == voucher
    assert pay(payer, "pad-2", 4_000, "b2")["left_micros"] == {voucher: 3_000}
    a2 = accept(pad2, "pad-2", "b2")
    assert a2["seq"] == 2
    assert accept(pad2, "pad-2", "b2")["payment"] == a2["payment"]  # idempotent
    # the payer has 3,000 left: a 5,000 payment has no voucher to go on
    run(
        "edge",
        "d2d-pay",
        *sbx,
        "--state",
        str(payer),
        "--payee",
        "pad-2",
        "--amount",
        "5000",
        "--out",
        str(tmp_path / "none"),
        code=1,
    )
    # a bundle for another payee is refused by pad-2
    assert accept(pad2, "pad-3", "b1", code=1)["fault"] == "payee_not_allowed"
    # the clone spends the voucher again from s = 1: pad-2 sees a second payment at s = 1
    pay(clone, "pad-2", 1_000, "b3")
    assert accept(pad2, "pad-2", "b3", code=1)["fault"] == "voucher_seq_conflict"
    # and pad-3, which has seen nothing of this voucher, cannot know: it accepts
    pay(clone, "pad-3", 5_000, "b4")
    a3 = accept(pad3, "pad-3", "b4")
    assert a3["seq"] == 2

    proc = start_sandbox(directory, log)
    try:
        up2 = upload(directory, pad2)
        assert sorted(up2["refused"], key=str) == [] and up2["booked"] >= 2, up2
        up3 = upload(directory, pad3)
        assert up3["refused"] == [{"intent": a3["payment"], "fault": "voucher_overspent"}], up3
        again = upload(directory, pad2)  # nothing left to hand in
        assert again["sent"] == 0
        db = f"sqlite://{directory}/cloud.sqlite"
        check = run("cloud", "--store", db, "check", code=1)  # 1: an alarm is recorded
        assert check["ledger_ok"] and check["alarms_by_kind"] == {"voucher_double_spent": 1}
        owner = run("cloud", "--store", db, "owner", "show", "sim-owner")
        assert owner["vouchers"] == {
            "vouchers": 1,
            "deposited_micros": VOUCHER,
            "spent_micros": 7_000,
            "outstanding_micros": 3_000,
            "returnable_micros": 0,
            "returned_micros": 0,
        }, owner
    finally:
        assert stop_sandbox(proc) == 0
    with sqlite3.connect(directory / "cloud.sqlite") as conn:
        paid = conn.execute(
            "SELECT payee, amount_micros, seq FROM voucher_payments ORDER BY seq"
        ).fetchall()
        alarms = conn.execute("SELECT kind, subject FROM alarms").fetchall()
        revoked = conn.execute("SELECT hex(key) FROM revocations").fetchall()
    assert paid == [("pad-2", 3_000, 1), ("pad-2", 4_000, 2)]
    payer_key = got["device"]
    assert ("voucher_double_spent", payer_key) in alarms
    assert (payer_key.upper(),) in revoked
