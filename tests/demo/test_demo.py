"""``fogpay demo`` as a real subprocess: the summary's invariants, checked again against the
files and databases it left behind (not against what the demo says about itself)."""

import csv
import json
import re
import sqlite3
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

import pytest
import xmlschema

from cloud.ledger import LedgerCheck
from cloud.sepa import check_document
from fogpay.cli import main
from fogpay.demo import MARKER_FILE, prepare_out
from fogpay.demo_budget import summarize
from fogpay.demo_cast import PAYERS
from fogpay.demo_pay import Outcomes
from fogpay.demo_summary import Facts, build
from protocol.messages import Receipt
from protocol.signing import open_envelope

XSD: Final = Path(__file__).parents[1] / "cloud" / "data"
DEMO_TIMEOUT_S: Final = 60.0
SVG: Final = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "fogpay.cli", "demo", "--out", str(out), "--seconds", "3"],
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    return out, summary, proc.stdout


def test_summary_invariants_hold(demo: tuple[Path, dict[str, Any], str]) -> None:
    _, s, stdout = demo
    assert s["ok"] is True and all(s["invariants"].values())
    assert s["ledger_sum_micros"] == 0 and set(s["ledger_sums_micros"].values()) == {0}
    assert s["authorized"] > 50
    assert s["receipts_held"] == s["receipts_booked_once"] == s["authorized"] == s["booked"]
    assert s["sent"] == s["authorized"] + s["declined"] + s["timeouts"] + s["errors"]
    assert s["timeouts"] == 0 and s["errors"] == 0
    assert s["batches"] == s["batches_sealed"] >= 1
    assert {"revoked", "limit_tx", "payee_not_allowed"} <= set(s["reasons"])
    assert s["reasons"]["limit_tx"] == 1 and s["reasons"]["payee_not_allowed"] == 1
    assert "invariants" in stdout and "FAILED" not in stdout


def _csv_lines(out: Path, s: dict[str, Any]) -> list[dict[str, str]]:
    (csv_path,) = [Path(f) for f in s["settlement_files"] if f.endswith(".csv")]
    assert csv_path.parent == out / "settlement"
    with open(csv_path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_charges_and_payouts_are_the_csv_sums(demo: tuple[Path, dict[str, Any], str]) -> None:
    out, s, _ = demo
    sums: dict[str, Counter[str]] = {"charge": Counter(), "payout": Counter()}
    for line in _csv_lines(out, s):
        sums[line["kind"]][line["currency"]] += int(line["micros"])
    assert s["charged_micros"] == dict(sums["charge"]) and s["charged_micros"]["EUR"] > 0
    assert s["paid_out_micros"] == dict(sums["payout"])
    assert set(s["charged_micros"]) == {"EUR", "GBP"}


def test_ledger_and_carries_in_the_cloud_database(demo: tuple[Path, dict[str, Any], str]) -> None:
    out, s, _ = demo
    with sqlite3.connect(out / "cloud.sqlite") as db:
        balances = dict(db.execute("SELECT currency, SUM(balance_micros) FROM accounts GROUP BY 1"))
        debits = dict(db.execute("SELECT currency, SUM(amount_micros) FROM transfers GROUP BY 1"))
        (transfers,) = db.execute("SELECT COUNT(*) FROM transfers").fetchone()
        carries = db.execute(
            "SELECT currency, SUM(charge_micros), SUM(payout_micros) FROM carries GROUP BY 1"
        ).fetchall()
        # the voucher escrow (docs/protocol.md 18.3): voucher intents go into it, unpaid;
        # d2d payments and returned escrow leave it, paid out (docs/settlement.md section 1)
        escrow_in = dict(
            db.execute(
                "SELECT currency, SUM(amount_micros) FROM transfers WHERE credit = 'voucher' "
                "GROUP BY 1"
            )
        )
        escrow_out: dict[str, int] = {}
        for table, key in (("voucher_payments", "payment_id"), ("voucher_returns", "voucher_id")):
            for currency, micros in db.execute(
                f"SELECT m.currency, SUM(m.amount_micros) FROM {table} m JOIN escrow_settled e "
                f"ON e.ref = m.{key} GROUP BY 1"
            ):
                escrow_out[currency] = escrow_out.get(currency, 0) + micros
    assert set(balances.values()) == {0}
    assert transfers == s["booked"]
    for currency, charge_carry, payout_carry in carries:
        # one period, nothing carried in: what was charged plus the carry is what was booked;
        # what was paid out plus the carry is that, less what stays in the voucher escrow
        held = escrow_in.get(currency, 0) - escrow_out.get(currency, 0)
        assert s["charged_micros"][currency] + charge_carry == debits[currency]
        assert s["paid_out_micros"][currency] + payout_carry == debits[currency] - held
        assert s["carried_micros"][currency] == {"charges": charge_carry, "payouts": payout_carry}


def test_every_receipt_a_device_holds_is_one_transfer(
    demo: tuple[Path, dict[str, Any], str],
) -> None:
    out, s, _ = demo
    held = [
        bytes.fromhex(json.loads(line)["i"])
        for path in (out / "devices").glob("*/receipts.jsonl")
        for line in path.read_text().splitlines()
    ]
    assert len(held) == len(set(held)) == s["receipts_held"]
    with sqlite3.connect(out / "cloud.sqlite") as db:
        booked = {bytes(r[0]) for r in db.execute("SELECT intent_id FROM transfers")}
    assert set(held) == booked


@pytest.mark.parametrize(
    ("suffix", "xsd"),
    [("-pain.008.xml", "pain.008.001.02.xsd"), ("-pain.001.xml", "pain.001.001.03.xsd")],
)
def test_pain_files_validate(demo: tuple[Path, dict[str, Any], str], suffix: str, xsd: str) -> None:
    _, s, _ = demo
    (path,) = [Path(f) for f in s["settlement_files"] if f.endswith(suffix)]
    xml = path.read_bytes()
    xmlschema.XMLSchema(str(XSD / xsd)).validate(xml.decode())
    check_document(xml)
    sepa = [x for x in s["lines"] if x["rail"] == "sepa"]
    kind = "charge" if "008" in suffix else "payout"
    total = sum(int(x["micros"]) for x in sepa if x["kind"] == kind)
    assert f"<CtrlSum>{total // 1_000_000}.{total % 1_000_000 // 10_000:02d}</CtrlSum>" in (
        xml.decode()
    )


def test_reconciliation_report_is_consistent(demo: tuple[Path, dict[str, Any], str]) -> None:
    _, s, _ = demo
    (path,) = [Path(f) for f in s["settlement_files"] if f.endswith("-report.json")]
    report = json.loads(path.read_text())
    assert report["balanced"] is True and report["mismatches"] == []
    assert report["period_id"] == s["period_id"]
    for row in report["currencies"]:
        assert all(row["checks"].values())
        assert row["receipts_micros"] == row["ledger_debits_micros"]
        assert row["ledger_debits_micros"] == (
            row["ledger_credits_micros"] + row["escrow_in_micros"] - row["escrow_out_micros"]
        )
        assert row["charged_micros"] == s["charged_micros"][row["currency"]]
    assert sum(row["receipts"] for row in report["currencies"]) == s["receipts_held"]


def test_refuses_a_foreign_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path), "--seconds", "1"]) == 2
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    assert not (tmp_path / "summary.json").exists()


def test_empties_a_directory_an_earlier_demo_wrote(tmp_path: Path) -> None:
    (tmp_path / MARKER_FILE).write_text("")
    (tmp_path / "settlement").mkdir()
    (tmp_path / "settlement" / "old.csv").write_text("old")
    prepare_out(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [MARKER_FILE]


def test_a_broken_invariant_fails_the_summary(demo: tuple[Path, dict[str, Any], str]) -> None:
    """The summary over the run's real files: whole, it holds; with one booking lost or a
    ledger off by one micro, ``ok`` is false (and ``fogpay demo`` exits 1)."""
    out, s, _ = demo
    (path,) = [Path(f) for f in s["settlement_files"] if f.endswith("-report.json")]
    outcomes = Outcomes()
    outcomes.by_status["ok"] = s["authorized"]
    facts = Facts(
        outcomes=outcomes,
        seconds=3,
        all_batches_booked=True,
        fog_batches_sealed=s["batches"],
        report=json.loads(path.read_text()),
        settlement_dir=out / "settlement",
    )
    held = s["receipts_held"]
    cloud = {
        "booked_once": held,
        "check": LedgerCheck({"EUR": 0, "GBP": 0}, [], s["booked"]),
        "batches": s["batches"],
        "records": s["records"],
        "rejected": 0,
        "alarms": 0,
        "leases": s["leases"],
        "carried": s["carried_micros"],
    }
    assert build(facts, cloud, held)["ok"] is True
    silent = Outcomes()
    silent.by_status["timeout"] = 3
    nothing = build(replace(facts, outcomes=silent), cloud | {"booked_once": 0}, 0)
    assert nothing["ok"] is False
    assert not nothing["invariants"]["payments_authorized"]
    assert not nothing["invariants"]["every_payment_answered"]
    lost = build(facts, cloud | {"booked_once": held - 1}, held)
    assert lost["ok"] is False and lost["invariants"]["receipts_booked_once"] is False
    off = build(facts, cloud | {"check": LedgerCheck({"EUR": 1}, [], s["booked"])}, held)
    assert off["ok"] is False and off["invariants"]["ledger_sum_zero"] is False
    assert off["ledger_sum_micros"] == 1


def test_report_html_is_self_contained_and_adds_up(
    demo: tuple[Path, dict[str, Any], str],
) -> None:
    """report.html: no script, no link, nothing fetched; its histogram counts every ok
    payment; each paying owner has a drawdown whose drawn total is what the cloud's leases
    say was drawn (transfers timed by the devices' receipts vs the leases table)."""
    out, s, stdout = demo
    text = (out / "report.html").read_text(encoding="utf-8")
    for banned in ("<script", "<link", "<img", "<iframe", "src=", "url(", "@import"):
        assert banned not in text.lower(), banned
    assert set(re.findall(r"https?://[^\s\"'<>]+", text)) == {
        "http://www.w3.org/1999/xhtml",
        "http://www.w3.org/2000/svg",
    }  # namespace names, never fetched
    root = ET.fromstring(text.split("\n", 1)[1])  # after the doctype: well-formed XML
    bars = root.findall(f".//{SVG}rect[@class='bar']")
    assert sum(int(b.attrib["data-count"]) for b in bars) == s["authorized"]
    assert sum(b["count"] for b in s["latency_histogram"]) == s["authorized"]
    drawn = {
        p.attrib["data-owner"]: int(p.attrib["data-last-micros"])
        for p in root.findall(f".//{SVG}polyline[@class='drawn']")
    }
    assert drawn == {k: v["drawn_micros"] for k, v in s["leases"].items()}
    assert set(drawn) == {o.owner_id for o in PAYERS}
    assert "report.html" in stdout


def test_stdout_shows_progress_and_a_histogram(demo: tuple[Path, dict[str, Any], str]) -> None:
    """Not a terminal here: plain progress lines, then the summary with its histogram."""
    _, s, stdout = demo
    progress = [line for line in stdout.splitlines() if re.match(r"\[\s*[\d.]+/3 s\]", line)]
    assert progress and progress[-1].startswith("[  3.0/3 s]")
    assert f"{s['sent']} paid: {s['authorized']} ok" in progress[-1]
    rows = re.findall(r"^ +\S+ ms [█ ]+ (\d+)$", stdout, re.M)
    assert rows and sum(int(n) for n in rows) == s["authorized"]


def test_every_paying_owner_had_a_lease_before_its_first_payment(
    demo: tuple[Path, dict[str, Any], str],
) -> None:
    """The issuer granted the first leases at registration: no owner's first payment waited
    for an lreq round trip (the fog signed every ok receipt after its owner's first grant)."""
    out, _, _ = demo
    with sqlite3.connect(out / "cloud.sqlite") as db:
        first_grant = dict(db.execute("SELECT owner_id, MIN(granted_ms) FROM leases GROUP BY 1"))
        owner_of = {bytes(i): d for i, d in db.execute("SELECT intent_id, debit FROM transfers")}
    first_paid: dict[str, int] = {}
    for path in (out / "devices").glob("*/receipts.jsonl"):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            env = open_envelope(bytes.fromhex(rec["env"]), Receipt)
            owner = owner_of[env.msg.intent_id]
            first_paid[owner] = min(first_paid.get(owner, env.msg.time_ms), env.msg.time_ms)
    assert set(first_paid) == {o.owner_id for o in PAYERS}
    for owner, at in first_paid.items():
        assert first_grant[owner] < at


def test_budget_moved_early_returns_and_device_to_device(
    demo: tuple[Path, dict[str, Any], str],
) -> None:
    """docs/protocol.md 18 in the one-fog demo, recounted from the databases and the payee
    devices' files: every lease given back early is closed at the cloud with the fog's final
    draw, the unused part is what the summary says returned; the voucher's payments the payees
    accepted offline are booked once each, within the voucher's amount; no peer transfers
    with one fog."""
    out, s, stdout = demo
    assert s["transfers"] == 0 and s["transfers_micros"] == {}
    for key in ("returned_leases_closed", "transfers_reconciled"):
        assert s["invariants"][key] is True
    assert s["invariants"]["vouchers_within_amount"] and s["invariants"]["d2d_booked_once"]
    with sqlite3.connect(out / "fog.sqlite") as fog:
        returned = fog.execute(
            "SELECT lease_id, currency, amount_micros, drawn_micros, reason FROM lease_returns"
        ).fetchall()
    assert len(returned) == s["leases_returned"] > 0
    assert {r[4] for r in returned} == {"operator"}
    back: Counter[str] = Counter()
    with sqlite3.connect(out / "cloud.sqlite") as db:
        for lease_id, currency, amount, drawn, _ in returned:
            state, reported = db.execute(
                "SELECT state, reported_micros FROM leases WHERE lease_id = ?", (lease_id,)
            ).fetchone()
            assert state == "closed" and reported == drawn
            back[currency] += amount - drawn
        paid = db.execute(
            "SELECT payment_id, payee, amount_micros FROM voucher_payments"
        ).fetchall()
        vouchers = db.execute("SELECT amount_micros, spent_micros FROM vouchers").fetchall()
        escrow = db.execute(
            "SELECT CAST(SUM(amount_micros) AS INTEGER) FROM transfers WHERE credit = 'voucher'"
        ).fetchone()[0]
    assert s["budget_returned_micros"] == dict(back) and sum(back.values()) > 0
    assert len(paid) == s["d2d_payments"] == s["d2d_accepted"] == 3
    assert {p[1] for p in paid} == {"skylink", "alptoll"}
    assert vouchers == [(escrow, sum(p[2] for p in paid))] and escrow >= sum(p[2] for p in paid)
    accepted = [
        bytes.fromhex(json.loads(line)["id"])
        for path in (out / "d2d").glob("*/d2d-in.jsonl")
        for line in path.read_text().splitlines()
    ]
    assert sorted(accepted) == sorted(bytes(p[0]) for p in paid)
    assert all(not (p / "held.jsonl").read_text().strip() for p in (out / "d2d").iterdir())
    assert "given back early" in stdout and "3 booked" in stdout


def test_the_budget_invariants_fail_on_a_mismatch() -> None:
    """``demo_budget.summarize`` over made-up facts: a returned lease the cloud has not closed,
    a transfer only one fog knows, a voucher paid past its amount, a payment accepted and never
    booked each fail their invariant."""
    lease, x, v, p = b"l" * 16, b"x" * 16, b"v" * 32, b"p" * 32
    fogs = {"returned": [(lease, "EUR", 100, 40)], "given": [x], "received": [x]}
    cloud = {
        "returned_leases": {lease: ("closed", 100, 40)},
        "transfers": [(x, 30, "closed", 30, 30, "EUR")],
        "vouchers": [(v, 50, 20, "EUR", 20)],
        "payments": [p],
    }
    good = summarize(fogs, cloud, [p])
    assert all(good["invariants"].values())
    assert good["facts"]["budget_returned_micros"] == {"EUR": 60}
    assert good["facts"]["transfers"] == 1 and good["facts"]["d2d_payments"] == 1
    bad = [
        (fogs, cloud | {"returned_leases": {lease: ("reported", 100, 40)}}, [p]),
        (fogs | {"received": []}, cloud, [p]),
        (fogs, cloud | {"vouchers": [(v, 50, 60, "EUR", 60)]}, [p]),
        (fogs, cloud, [p, b"q" * 32]),
    ]
    for (f, c, a), key in zip(
        bad,
        (
            "returned_leases_closed",
            "transfers_reconciled",
            "vouchers_within_amount",
            "d2d_booked_once",
        ),
        strict=True,
    ):
        assert summarize(f, c, a)["invariants"][key] is False, key


def test_json_prints_the_summary_alone(tmp_path: Path) -> None:
    """``--json``: stdout is one JSON object, the summary (the embedded broker's child once
    printed its ``broker_shared_account`` warning there too: the fog logs it, once)."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "fogpay.cli", "demo", "--out", str(out), "--seconds", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.count("\n") == 1
    assert json.loads(proc.stdout) == json.loads((out / "summary.json").read_text())
    assert "broker_shared_account" in (out / "demo.log").read_text()
