"""``fogpay cloud settle`` with SEPA parties: the pain files validate against the official
XSDs and the SEPA rules, and their sums are the period's charges and payouts."""

import contextlib
import io
import json
from pathlib import Path

import pytest
import structlog
import xmlschema

from cloud.sepa import check_document
from cloud.sqlitestore import SqliteStore
from fogpay.cli import main
from runtime.keyfile import write_key_file
from tests.cloud.world import World

XSD = Path(__file__).parent / "data"
PAYER_FUNDING = "sepa:DE89370400440532013000:COBADEFFXXX:2024-01-01:MANDATE-ALICE-1"
PAYEE_FUNDING = "sepa:FR1420041010050500013M02606:"
RAILS = """
[rails.creditor]
name = "fogpay operator"
iban = "DE89370400440532013000"
bic = "COBADEFFXXX"
creditor_id = "DE98ZZZ09999999999"

[rails.debtor]
name = "fogpay operator"
iban = "DE89370400440532013000"
"""


@pytest.fixture
async def booked_db(tmp_path: Path) -> Path:
    """A SQLite store with two booked SEPA-to-SEPA intents, and the issuer key beside it."""
    db = tmp_path / "cloud.db"
    store = await SqliteStore.open(str(db))
    w = World(store)
    await w.owner("alice", funding=PAYER_FUNDING)
    await w.owner("shop", limit=0, funding=PAYEE_FUNDING)
    fog = await w.fog("fog-a")
    device = await w.device("alice")
    lease_id = (await w.lease("alice", "fog-a")).lease.lease_id
    records = [
        fog.authorize(device, seq=q, lease_id=lease_id, amount=1_234_567, payee="shop")
        for q in (1, 2)
    ]
    await w.ingestor().ingest_batch(fog.cut(records))
    await store.close()
    write_key_file(tmp_path / "issuer.key", w.issuer)
    return db


def test_settle_writes_valid_sepa_files(booked_db: Path, tmp_path: Path) -> None:
    (tmp_path / "cloud.toml").write_text(RAILS)
    argv = [
        *("cloud", "--config", str(tmp_path / "cloud.toml"), "--store", f"sqlite://{booked_db}"),
        *("--issuer-key", str(tmp_path / "issuer.key"), "settle", "--until", "2100-01-01"),
        *("--period", "P2100", "--out", str(tmp_path / "s")),
    ]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        rc = main(argv)
    structlog.reset_defaults()
    assert rc == 0, out.getvalue()
    report = json.loads(out.getvalue())
    assert report["balanced"] and report["files"] == [
        "P2100-pain.001.xml",
        "P2100-pain.008.xml",
        "P2100.csv",
        "P2100-report.json",
    ]
    for name, xsd in (
        ("P2100-pain.008.xml", "pain.008.001.02.xsd"),
        ("P2100-pain.001.xml", "pain.001.001.03.xsd"),
    ):
        xml = (tmp_path / "s" / name).read_bytes()
        xmlschema.XMLSchema(str(XSD / xsd)).validate(xml.decode())
        check_document(xml)
        assert b"<CtrlSum>2.46</CtrlSum>" in xml  # 2 x 1.234567 EUR, rounded down to cents
    eur = report["currencies"][0]
    assert eur["charge_carry_out_micros"] == 2_469_134 - 2_460_000
