"""``fogpay demo --fogs 2 --cut-uplink S`` as a real subprocess: two fogs bridged to a hub,
fog-a's bridge cut for a few seconds midway while the devices keep paying; after the heal
every receipt a device holds is booked exactly once (checked in the cloud's database, not
only in the summary), the invariants hold, and payments were authorized during the cut."""

import contextlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any, Final

import nacl.signing
import pytest

from fogpay import demo_cast as cast
from fogpay.cli import main
from fogpay.demo_fed import (
    bridge_rules,
    first_leases,
    fog_ids,
    make_fogs,
    replicated_records,
)
from fogpay.demo_setup import Keys
from protocol.batch import encode_batch, encode_record
from protocol.messages import Receipt
from protocol.signing import open_envelope

DEMO_TIMEOUT_S: Final = 120.0
CUT_S: Final = 2.5


@pytest.fixture(scope="module")
def cut_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("demo-fogs") / "out"
    args = ["demo", "--out", str(out), "--seconds", "5", "--fogs", "2"]
    proc = subprocess.run(
        [sys.executable, "-m", "fogpay.cli", *args, "--cut-uplink", str(CUT_S)],
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "summary.json").read_text())


def test_a_cut_uplink_heals_and_nothing_is_lost(cut_demo: tuple[Path, dict[str, Any]]) -> None:
    out, s = cut_demo
    assert s["ok"] is True and all(s["invariants"].values())
    assert s["fogs"] == 2 and s["fog_ids"] == ["fog-a", "fog-b"]
    assert s["records_lost"] == 0
    assert s["uplink_cut"]["fog_id"] == "fog-a" and s["uplink_cut"]["seconds"] == CUT_S
    assert s["uplink_cut"]["end_ms"] - s["uplink_cut"]["start_ms"] >= CUT_S * 1000
    assert s["offline_authorized"] > 0  # fog-a kept paying while cut off
    if any(_has_replicas(db) for db in (out / "fogs").glob("*/fog.sqlite")):
        # the fogs replicate (docs/protocol.md 17.2): their batches crossed the bridges
        assert s["replicated_records"] > 0
    else:
        assert s["replicated_records"] == 0
    held = [
        bytes.fromhex(json.loads(line)["i"])
        for path in (out / "devices").glob("*/receipts.jsonl")
        for line in path.read_text().splitlines()
    ]
    assert len(held) == len(set(held)) == s["receipts_held"] == s["authorized"]
    with sqlite3.connect(out / "cloud.sqlite") as db:
        booked = [bytes(r[0]) for r in db.execute("SELECT intent_id FROM transfers")]
        per_fog = dict(db.execute("SELECT fog_id, COUNT(*) FROM records GROUP BY fog_id"))
    assert sorted(booked) == sorted(held)  # each once, none missing, nothing else
    assert set(per_fog) == {"fog-a", "fog-b"} and sum(per_fog.values()) == len(held)


def _has_replicas(db: Path) -> bool:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return bool(conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'replicas'").fetchone())


def test_the_cut_fog_signed_receipts_inside_the_window(
    cut_demo: tuple[Path, dict[str, Any]],
) -> None:
    """offline_authorized is read back from the devices' receipts: fog-a's, fog time within
    the cut; and the cloud booked every one of them after the heal."""
    out, s = cut_demo
    cut = s["uplink_cut"]
    inside = []
    for path in (out / "devices").glob("*/receipts.jsonl"):
        for line in path.read_text().splitlines():
            receipt = open_envelope(bytes.fromhex(json.loads(line)["env"]), Receipt).msg
            if receipt.ok and cut["start_ms"] <= receipt.time_ms <= cut["end_ms"]:
                inside.append(receipt)
    with sqlite3.connect(out / "cloud.sqlite") as db:
        fog_of = {bytes(i): f for i, f in db.execute("SELECT intent_id, fog_id FROM records")}
    at_a = [r for r in inside if fog_of[r.intent_id] == "fog-a"]
    assert len(at_a) == s["offline_authorized"] > 0


def test_one_fog_cannot_cut_its_uplink(tmp_path: Path) -> None:
    args = ["demo", "--out", str(tmp_path / "o"), "--seconds", "1", "--cut-uplink", "1"]
    assert main(args) == 2
    assert main(["demo", "--out", str(tmp_path / "o"), "--fogs", "9"]) == 2
    assert not (tmp_path / "o" / "summary.json").exists()


def test_first_leases_split_each_owners_credit_between_its_fogs() -> None:
    for n in (1, 2, 3):
        grants = first_leases(fog_ids(n))
        for o in cast.PAYERS:
            mine = [a for owner, _, a in grants if owner == o.owner_id]
            assert mine and sum(mine) <= o.limit_micros
    assert fog_ids(1) == (cast.FOG_ID,)


def test_the_demo_bridge_carries_what_the_mosquitto_bridge_carries() -> None:
    """The same topics as deploy/mosquitto/fogpay-bridge.conf, gossip out to the named peers."""
    conf = Path(__file__).parents[2] / "deploy" / "mosquitto" / "fogpay-bridge.conf"
    shipped = {
        (parts[1], parts[2])
        for line in conf.read_text().splitlines()
        if (parts := line.split()) and parts[0] == "topic"
    }
    ours = {(r.filter, r.direction) for r in bridge_rules("fog-a", ["fog-b"])}
    assert ours - shipped == {("fogpay/1/gossip/fog-b/#", "out")}
    assert (
        shipped - ours
        == {
            ("fogpay/1/gossip/+/#", "out"),
            ("fogpay/1/up/+/ack", "in"),
        }
        - ours
    )


def test_replicated_records_are_read_from_the_peers_replica_tables(tmp_path: Path) -> None:
    """The replica store's shape (origin, number, header id, wire): records of other fogs'
    batches count, a fog's own do not; a store without the table counts 0."""
    keys = Keys(nacl.signing.SigningKey.generate(), nacl.signing.SigningKey.generate(), {})
    (tmp_path / "fog.key").write_bytes(b"")
    fogs = make_fogs(tmp_path, fog_ids(2), keys)
    record = encode_record(b"i" * 100, b"r" * 100)
    with contextlib.closing(sqlite3.connect(fogs[1].config.db)) as db:
        db.execute(
            "CREATE TABLE replicas (origin TEXT, number INTEGER, header_id BLOB, wire BLOB, "
            "received_ms INTEGER, PRIMARY KEY (origin, number))"
        )
        rows = [("fog-a", 1, encode_batch(b"h", [record] * 3)), ("fog-a", 2, b"\xc1garbage")]
        rows.append(("fog-b", 1, encode_batch(b"h", [record] * 5)))  # its own: not a replica
        db.executemany("INSERT INTO replicas VALUES (?, ?, x'00', ?, 0)", rows)
        db.commit()
    with contextlib.closing(sqlite3.connect(fogs[0].config.db)) as db:
        db.execute("CREATE TABLE other (x)")
    assert replicated_records(fogs) == 3


def test_the_cut_fog_borrowed_from_its_peer_and_everything_reconciled(
    cut_demo: tuple[Path, dict[str, Any]],
) -> None:
    """fog-a, on small leases and cut from the cloud, ran short of nordfleet's budget and
    borrowed from fog-b (docs/protocol.md 18.2): each transfer is in the giver's
    ``transfers_out``, the receiver's ``transfers_in`` and the cloud's ``peer_transfers``
    once, its sub-lease is a lease of fog-a closed with no more drawn than moved, and every
    lease of both fogs given back early at the end is closed; the payees' device-to-device
    payments are booked once."""
    out, s = cut_demo
    assert s["transfers"] > 0 and s["invariants"]["transfers_reconciled"]
    assert s["invariants"]["returned_leases_closed"] and s["invariants"]["d2d_booked_once"]
    assert s["d2d_payments"] == 3 and sum(s["budget_returned_micros"].values()) > 0

    def ids(fog: str, sql: str) -> list[bytes]:
        with contextlib.closing(sqlite3.connect(out / "fogs" / fog / "fog.sqlite")) as db:
            return sorted(bytes(r[0]) for r in db.execute(sql))

    given = sorted(
        x for f in ("fog-a", "fog-b") for x in ids(f, "SELECT transfer_id FROM transfers_out")
    )
    got = sorted(
        x for f in ("fog-a", "fog-b") for x in ids(f, "SELECT transfer_id FROM transfers_in")
    )
    with contextlib.closing(sqlite3.connect(out / "cloud.sqlite")) as db:
        rows = db.execute(
            "SELECT t.transfer_id, t.giver, t.receiver, t.amount_micros, l.fog_id, l.state, "
            "l.amount_micros, l.drawn_micros, p.fog_id, p.state FROM peer_transfers t "
            "JOIN leases l ON l.lease_id = t.transfer_id JOIN leases p ON p.lease_id = t.parent_id"
        ).fetchall()
    assert sorted(bytes(r[0]) for r in rows) == given == got and len(rows) == s["transfers"]
    for _, giver, receiver, amount, fog, state, sub, drawn, parent_fog, parent_state in rows:
        assert giver != receiver and (fog, parent_fog) == (receiver, giver)
        assert sub == amount and drawn <= amount
        assert state == parent_state == "closed"
    assert any(r[2] == "fog-a" for r in rows)  # the cut fog borrowed
    assert s["transfers_micros"] == {"EUR": sum(r[3] for r in rows)}
