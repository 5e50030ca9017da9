"""The floor under cloud ingest: what two pieces of it cost alone, against the target's budget.

    .venv/bin/python bench/cloud_floor.py [--records 40960] [--repeat 3] [--dir PATH]

bench/cloud.py's target (0.8 x verify rate / 2 x cores) allows, with every core busy,
1.25 x 2 verifies of CPU per record, all work included: only a quarter of the two verifies is
left for everything else. This measures two parts of that "everything else", each on its own,
in one process, best of ``--repeat`` (the machine is shared):

- decode and checks: ``cloud.verify.check_batch`` on real fog batches of 2,048 records, less
  two bare libsodium verifies per record (the same call, same process, interleaved);
- the booking's SQL floor: inserting the records' rows into ``transfers`` and committing, on a
  real SQLite file (WAL, synchronous=FULL) with the cloud's own DDL: with every index the
  schema has, and with none (a table that could not check booked-once or cloned keys). Its
  random-key indexes cost more per row as the table grows (8,192 rows: about 7 us; 40,960:
  about 12 us, on this machine), so a ledger of months costs more than this.

Merkle roots, IPC, the booking logic, the ``records`` rows, lookups and the database server
come on top. Not a test; prints its figures.
"""

import sys
from pathlib import Path

# The project before bench/ on the path: bench/fog.py would shadow the fog package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import secrets
import sqlite3
import tempfile
import time

import nacl.bindings
import nacl.signing

from cloud.schema import ddl
from cloud.verify import check_batch
from protocol import limits
from tests.cloud.world import FogLog

BATCH = 2048
DEVICES = 100


def batches(records: int) -> list[bytes]:
    fog = FogLog("fog-floor", nacl.signing.SigningKey.generate())
    devices = [nacl.signing.SigningKey.generate() for _ in range(DEVICES)]
    lease = secrets.token_bytes(limits.LEASE_ID_BYTES)
    out = []
    for start in range(0, records, BATCH):
        recs = [
            fog.authorize(devices[i % DEVICES], seq=i + 1, lease_id=lease, amount=1_000 + i % 7)
            for i in range(start, min(records, start + BATCH))
        ]
        out.append(fog.cut(recs))
    return out


def decode_overhead_us(wires: list[bytes], records: int, repeat: int) -> tuple[float, float]:
    """(two bare verifies, check_batch beyond them) in us per record, best of ``repeat``."""
    key = nacl.signing.SigningKey.generate()
    msg = secrets.token_bytes(150)
    signed, pk = key.sign(msg).signature + msg, bytes(key.verify_key)
    bare, full = float("inf"), float("inf")
    for _ in range(repeat):
        t = time.process_time()
        for _ in range(2 * records):
            nacl.bindings.crypto_sign_open(signed, pk)
        bare = min(bare, time.process_time() - t)
        t = time.process_time()
        for wire in wires:
            check_batch(wire)
        full = min(full, time.process_time() - t)
    us = 1e6 / records
    return bare * us, (full - bare) * us


def transfers_us(directory: str, records: int, repeat: int, *, indexes: bool) -> float:
    """CPU per record of inserting ``transfers`` rows (batches of 2,048, one commit each)."""
    best = float("inf")
    for r in range(repeat):
        conn = sqlite3.connect(f"{directory}/floor-{indexes}-{r}.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        for stmt in ddl(blob="BLOB", integer="INTEGER"):
            if "CREATE TABLE IF NOT EXISTS transfers" in stmt and not indexes:
                stmt = stmt.replace("intent_id BLOB PRIMARY KEY", "intent_id BLOB NOT NULL")
            if indexes or "ON transfers" not in stmt:
                conn.execute(stmt)
        devices = [secrets.token_bytes(32) for _ in range(DEVICES)]
        lease = secrets.token_bytes(limits.LEASE_ID_BYTES)
        spent = 0.0
        for start in range(0, records, BATCH):
            rows = [
                (
                    secrets.token_bytes(32),
                    devices[i % DEVICES],
                    devices[i % DEVICES] + i.to_bytes(8, "big"),
                    "payer",
                    "payee",
                    "EUR",
                    1_000,
                    lease,
                    i - start,
                    "fog-floor",
                    start // BATCH + 1,
                    0,
                )
                for i in range(start, min(records, start + BATCH))
            ]
            t = time.process_time()
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT INTO transfers (intent_id, device, dseq, debit, credit, currency, "
                "amount_micros, lease_id, position, fog_id, number, booked_ms) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            conn.execute("COMMIT")
            spent += time.process_time() - t
        conn.close()
        best = min(best, spent)
    return best * 1e6 / records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=20 * BATCH, help="as bench/cloud.py's run")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", help="where the SQLite files go (default: the system temp dir)")
    args = ap.parse_args()
    wires = batches(args.records)
    verifies, decode = decode_overhead_us(wires, args.records, args.repeat)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        indexed = transfers_us(d, args.records, args.repeat, indexes=True)
        bare_table = transfers_us(d, args.records, args.repeat, indexes=False)
    allowed = 0.25 * verifies
    print(f"{args.records:,} records; CPU us per record, best of {args.repeat}:")
    print(f"  two verifies (libsodium via PyNaCl)                 {verifies:6.1f}")
    print(f"  the target leaves besides them (0.25 x that)        {allowed:6.1f}")
    print(f"  decode and checks beyond the verifies (check_batch) {decode:6.1f}")
    print(f"  transfers insert + commit, the schema's indexes     {indexed:6.1f}")
    print(f"  transfers insert + commit, no index at all          {bare_table:6.1f}")
    print(
        f"  these two parts alone: {decode + indexed:.1f} us = "
        f"{(decode + indexed) / allowed:.2f} x what the target leaves for all the work "
        "besides the verifies"
    )


if __name__ == "__main__":
    main()
