"""The ``fogpay cloud`` commands and ``fogpay verify-receipt``, each in a real second process,
over a real SQLite file and a real PostgreSQL database."""

import asyncio
import contextlib
import io
import json
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import structlog

from cloud.backends import open_store
from cloud.schema import SCHEMA_VERSION, VERSION_KEY
from fogpay.cli import main
from protocol.batch import decode_record
from protocol.messages import Binding, Intent, Revocation
from protocol.signing import open_envelope, possession_proof, public_key, seal
from tests.cloud.world import FogLog, new_key

FOGPAY = [sys.executable, "-m", "fogpay.cli"]


class Cli:
    def __init__(self, tmp: Path, store: str) -> None:
        self.tmp, self.store = tmp, store

    def run(self, *args: str, rc: int = 0, process: bool = False) -> Any:
        """Run a command in a second process, or in this one (same code, faster)."""
        key = str(self.tmp / "issuer.key")
        argv = ["cloud", "--store", self.store, "--issuer-key", key, *args]
        if process:
            done = subprocess.run([*FOGPAY, *argv], capture_output=True, text=True, timeout=60)
            code, out, err = done.returncode, done.stdout, done.stderr
        else:
            out_buf, err_buf = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out_buf), contextlib.redirect_stderr(err_buf):
                code = main(argv)
            structlog.reset_defaults()
            out, err = out_buf.getvalue(), err_buf.getvalue()
        assert code == rc, (args, out, err)
        return json.loads(out) if rc == 0 and out.strip() else err


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def cli(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "sqlite":
        yield Cli(tmp_path, f"sqlite://{tmp_path}/cloud.db")
        return
    dsn: str = request.getfixturevalue("pg_dsn")
    db = f"cli_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(dsn, timeout=10)
    await conn.execute(f"CREATE DATABASE {db}")
    await conn.close()
    yield Cli(tmp_path, dsn.rsplit("/", 1)[0] + "/" + db)
    conn = await asyncpg.connect(dsn, timeout=10)
    await conn.execute(f"DROP DATABASE {db} WITH (FORCE)")
    await conn.close()


def test_cloud_commands_end_to_end(cli: Cli, tmp_path: Path) -> None:
    init = cli.run("init", process=True)
    issuer_pub = init["issuer_public_key"]
    assert (tmp_path / "issuer.key").stat().st_mode & 0o077 == 0
    alice, shop, fog_key, device = new_key(), new_key(), new_key(), new_key()
    cli.run(
        "owner",
        "add",
        "alice",
        "--key",
        public_key(alice).hex(),
        "--limit",
        "5000000",
        "--currency",
        "EUR",
        "--funding",
        "card:tok_alice",
        "--name",
        "Alice",
    )
    cli.run(
        "owner",
        "add",
        "shop",
        "--key",
        public_key(shop).hex(),
        "--limit",
        "0",
        "--currency",
        "EUR",
        "--funding",
        "card:tok_shop",
    )
    cli.run("fog", "add", "fog-a", "--key", public_key(fog_key).hex())
    t = time.time_ns() // 1_000_000  # the CLI signs credentials at the wall clock's now
    binding = seal(
        Binding(
            device=public_key(device),
            owner_id="alice",
            not_before_ms=t - 10**9,
            not_after_ms=t + 10**12,
            currency="EUR",
            tx_max_micros=10**6,
            day_max_micros=10**7,
        ),
        alice,
    )
    bad_proof = possession_proof(new_key(), open_envelope(binding, Binding).body)
    refused = cli.run(
        "device", "bind", "--binding", binding.hex(), "--proof", bad_proof.hex(), rc=1
    )
    assert "proof of possession" in refused
    proof = possession_proof(device, open_envelope(binding, Binding).body)
    cli.run("device", "bind", "--binding", binding.hex(), "--proof", proof.hex())
    assert [d["device"] for d in cli.run("device", "list")] == [public_key(device).hex()]
    lease = cli.run("lease", "grant", "alice", "fog-a", "2000000")
    assert cli.run("owner", "show", "alice")["available_micros"] == 3_000_000

    fog = FogLog("fog-a", fog_key)
    lease_id = bytes.fromhex(lease["lease_id"])
    records = [
        fog.authorize(device, seq=q, lease_id=lease_id, amount=12_345, payee="shop", t=t)
        for q in (1, 2, 3)
    ]
    (tmp_path / "b1.batch").write_bytes(fog.cut(records, t=t))
    out = cli.run("ingest", str(tmp_path / "b1.batch"), process=True)
    assert out[0]["status"] == "booked" and out[0]["booked"] == 3
    again = cli.run("ingest", str(tmp_path / "b1.batch"))
    assert again[0]["status"] == "duplicate" and again[0]["booked"] == 0
    assert cli.run("alarms") == []
    [listed] = cli.run("lease", "list", "alice")
    assert (listed["drawn_micros"], listed["state"]) == (3 * 12_345, "open")
    check = cli.run("check")
    assert check["ok"] and check["sums_micros"] == {"EUR": 0} and check["transfers"] == 3

    intent_env = decode_record(records[1])[0]
    intent_id = open_envelope(intent_env, Intent).id
    cli.run("prove", intent_id.hex(), "--out", str(tmp_path / "proof.json"))
    verify = [*FOGPAY, "verify-receipt", str(tmp_path / "proof.json"), "--issuer", issuer_pub]
    done = subprocess.run(verify, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    checked = json.loads(done.stdout)
    assert checked["checked"] == "receipt and inclusion" and checked["owner_id"] == "alice"
    # the same proof against another issuer key fails
    other = [*verify[:-1], public_key(new_key()).hex()]
    assert subprocess.run(other, capture_output=True, timeout=60).returncode == 1

    report = cli.run(
        "settle", "--until", "2100-01-01T00:00", "--period", "P1", "--out", str(tmp_path / "s")
    )
    assert report["balanced"] is True
    eur = report["currencies"][0]
    assert eur["receipts_micros"] == eur["ledger_debits_micros"] == 3 * 12_345
    assert eur["charged_micros"] == 30_000 and eur["charge_carry_out_micros"] == 7_035
    assert (tmp_path / "s" / "P1.csv").read_text().count("\n") == 3  # header + charge + payout
    again = cli.run("settle", "--until", "2100-01-01T00:00", "--period", "P1", rc=1)
    assert "already closed" in again

    rev = cli.run("device", "revoke", public_key(device).hex(), "--reason", "lost")
    assert rev["revoked"] == public_key(device).hex()
    assert cli.run("device", "list")[0]["revoked"] is True
    cli.run("owner", "limit", "alice", "1")
    assert cli.run("owner", "show", "alice")["available_micros"] == 0


def test_owner_may_revoke_its_device_but_not_anothers(cli: Cli, tmp_path: Path) -> None:
    cli.run("init")
    alice, bob, device = new_key(), new_key(), new_key()
    for name, key in (("alice", alice), ("bob", bob)):
        cli.run(
            "owner",
            "add",
            name,
            "--key",
            public_key(key).hex(),
            "--limit",
            "1",
            "--currency",
            "EUR",
            "--funding",
            "card:x",
        )
    b = seal(
        Binding(
            device=public_key(device),
            owner_id="alice",
            not_before_ms=0,
            not_after_ms=2**40,
            currency="EUR",
            tx_max_micros=1,
            day_max_micros=1,
        ),
        alice,
    )
    cli.run(
        "device",
        "bind",
        "--binding",
        b.hex(),
        "--proof",
        possession_proof(device, open_envelope(b, Binding).body).hex(),
    )
    by_bob = seal(Revocation(key=public_key(device), time_ms=1, reason="not mine"), bob)
    assert "may not revoke" in cli.run("device", "revoke", "--envelope", by_bob.hex(), rc=1)
    assert cli.run("device", "list")[0]["revoked"] is False
    by_alice = seal(Revocation(key=public_key(device), time_ms=1, reason="stolen"), alice)
    cli.run("device", "revoke", "--envelope", by_alice.hex())
    assert cli.run("device", "list")[0]["revoked"] is True


def test_a_database_of_a_newer_schema_is_refused_with_the_reason(cli: Cli) -> None:
    cli.run("init")
    newer = str(SCHEMA_VERSION + 1)

    async def as_a_newer_fogpay_left_it() -> None:
        store = await open_store(cli.store)
        try:
            await store.transact(
                lambda tx: tx.execute("UPDATE meta SET v = ? WHERE k = ?", (newer, VERSION_KEY))
            )
        finally:
            await store.close()

    asyncio.run(as_a_newer_fogpay_left_it())
    err = cli.run("check", rc=2, process=True)  # the configured store is wrong: exit 2
    assert err.startswith(f"fogpay: cloud check: the database has schema version {newer}"), err
    assert err.count("\n") == 1
    assert "Traceback" not in err


@pytest.mark.postgres
def test_a_postgres_database_that_does_not_exist_is_one_line_exit_2(pg_dsn: str) -> None:
    missing = pg_dsn.rsplit("/", 1)[0] + f"/no_such_db_{secrets.token_hex(4)}"
    argv = [*FOGPAY, "cloud", "--store", missing, "check"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("fogpay: cloud check: store postgresql://"), line
    assert "does not exist" in line, line
