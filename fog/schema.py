"""The fog database's schema, its migrations and how a connection is opened.

WAL mode and ``synchronous=FULL``: a COMMIT that returned is on disk. The connection is in
autocommit mode; every transaction is an explicit ``BEGIN IMMEDIATE`` (``batcher.transaction``).
"""

import sqlite3
from pathlib import Path
from typing import Final

from fog.batcher import transaction
from protocol.errors import FogpayError

BUSY_TIMEOUT_MS: Final = 5_000

SCHEMA_V1: Final = """
CREATE TABLE trust (
    id BLOB PRIMARY KEY,            -- message id
    type TEXT NOT NULL,
    envelope BLOB NOT NULL,
    received_ms INTEGER NOT NULL
);
CREATE TABLE owners (
    id BLOB PRIMARY KEY, owner_id TEXT NOT NULL, key BLOB NOT NULL,
    nb INTEGER NOT NULL, na INTEGER NOT NULL, body BLOB NOT NULL
);
CREATE INDEX owners_by_key ON owners (owner_id, key);
CREATE TABLE fogs (id BLOB PRIMARY KEY, fog_id TEXT NOT NULL, key BLOB NOT NULL);
CREATE TABLE bindings (
    id BLOB PRIMARY KEY, device BLOB NOT NULL, owner_id TEXT NOT NULL, signer BLOB NOT NULL,
    nb INTEGER NOT NULL, na INTEGER NOT NULL, body BLOB NOT NULL
);
CREATE INDEX bindings_by_device ON bindings (device);
CREATE TABLE revocations (id BLOB PRIMARY KEY, key BLOB NOT NULL, signer BLOB NOT NULL);
CREATE INDEX revocations_by_key ON revocations (key, signer);
CREATE TABLE leases (
    lease_id BLOB PRIMARY KEY,
    id BLOB NOT NULL UNIQUE,
    owner_id TEXT NOT NULL,
    currency TEXT NOT NULL,
    amount_micros INTEGER NOT NULL CHECK (amount_micros > 0),
    drawn_micros INTEGER NOT NULL DEFAULT 0
        CHECK (drawn_micros >= 0 AND drawn_micros <= amount_micros),
    not_after_ms INTEGER NOT NULL
);
CREATE INDEX leases_by_owner ON leases (owner_id, currency);
CREATE TABLE devices (
    device BLOB PRIMARY KEY,
    seq_last INTEGER NOT NULL,      -- q - 2^63
    day INTEGER NOT NULL,
    day_micros INTEGER NOT NULL CHECK (day_micros >= 0)
) WITHOUT ROWID;
CREATE TABLE log (
    n INTEGER PRIMARY KEY,          -- log index, from 1, consecutive
    intent_id BLOB NOT NULL UNIQUE,
    device BLOB NOT NULL,
    seq INTEGER NOT NULL,           -- q - 2^63
    owner_id TEXT NOT NULL,
    lease_id BLOB NOT NULL,
    amount_micros INTEGER NOT NULL CHECK (amount_micros > 0),
    intent BLOB NOT NULL,           -- envelope as received
    receipt BLOB NOT NULL,          -- envelope as sent (replayed byte for byte)
    at_ms INTEGER NOT NULL,
    UNIQUE (device, seq)
);
CREATE TABLE batches (
    number INTEGER PRIMARY KEY,     -- b, from 1, consecutive
    header_id BLOB NOT NULL UNIQUE,
    header BLOB NOT NULL,           -- envelope
    first_index INTEGER NOT NULL,
    count INTEGER NOT NULL CHECK (count >= 1),
    sealed_ms INTEGER NOT NULL,
    acked INTEGER NOT NULL DEFAULT 0
);
"""
MIGRATIONS: Final = (SCHEMA_V1,)  # MIGRATIONS[i] takes the schema from version i to i + 1


class StoreError(FogpayError):
    """The database cannot be used (e.g. written by a newer fogpay)."""


def connect(path: str | Path) -> sqlite3.Connection:
    """A connection in autocommit mode (we issue BEGIN IMMEDIATE), WAL, synchronous=FULL."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode != "wal":
        conn.close()
        raise StoreError(f"cannot put {path} in WAL mode (got {mode})")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to the newest version, one transaction per step; returns it."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    for _ in range(len(MIGRATIONS) + 1):
        with transaction(conn):
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            version = 0 if row is None else int(row[0])
            if version > len(MIGRATIONS):
                raise StoreError(f"schema version {version} is newer than this fogpay")
            if version == len(MIGRATIONS):
                return version
            for statement in MIGRATIONS[version].split(";"):
                if statement.strip():
                    conn.execute(statement)
            if row is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (1)")
            else:
                conn.execute("UPDATE schema_version SET version = ?", (version + 1,))
    raise AssertionError("migrations did not converge")
