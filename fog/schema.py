"""The fog database's schema, its migrations and how a connection is opened.

WAL mode and ``synchronous=FULL``: a COMMIT that returned is on disk. The connection is in
autocommit mode; every transaction is an explicit ``BEGIN IMMEDIATE`` (``batcher.transaction``).
"""

import os
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


class StoreOpenError(StoreError):
    """The database cannot be opened or brought to this schema: not a database, a directory
    that does not exist or is not writable, a newer schema. The configuration's ``db`` is
    wrong for this host, so ``fogpay fog`` exits 2 with this one line."""


def open_problem(path: str | Path, exc: sqlite3.Error) -> StoreOpenError:
    """Translate SQLite's error at open into one line naming the file and, where SQLite only
    says "unable to open database file", what is wrong with its directory."""
    directory = Path(path).parent
    if not directory.is_dir():
        why = f"directory {directory} does not exist"
    elif not os.access(directory, os.W_OK | os.X_OK):
        why = f"directory {directory} is not writable (SQLite writes its WAL beside the file)"
    elif Path(path).is_dir():
        why = "is a directory"
    else:
        why = str(exc)
    return StoreOpenError(f"database {path}: {why}")


def connect(path: str | Path) -> sqlite3.Connection:
    """A connection in autocommit mode (we issue BEGIN IMMEDIATE), WAL, synchronous=FULL.
    Raises StoreOpenError (never sqlite3.Error) when the file cannot serve as the fog's
    database."""
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise open_problem(path, exc) from None
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise StoreOpenError(f"database {path}: cannot use WAL mode (got {mode})")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    except sqlite3.Error as exc:
        conn.close()
        raise open_problem(path, exc) from None
    except BaseException:
        conn.close()
        raise
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to the newest version, one transaction per step; returns it. Raises
    StoreOpenError for a database this fogpay cannot use (newer, read-only, not ours)."""
    try:
        return _migrate(conn)
    except sqlite3.Error as exc:
        raise StoreOpenError(
            f"database {_file(conn)}: cannot bring the schema up to date: {exc}"
        ) from None
    except StoreOpenError as exc:
        raise StoreOpenError(f"database {_file(conn)}: {exc}") from None


def _file(conn: sqlite3.Connection) -> str:
    try:
        return str(conn.execute("PRAGMA database_list").fetchone()[2])
    except sqlite3.Error:
        return "?"


def schema_version(conn: sqlite3.Connection) -> int:
    """The schema version of an open database, 0 for a new one (nothing is written)."""
    try:
        known = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
        ).fetchone()
        row = conn.execute("SELECT version FROM schema_version").fetchone() if known else None
    except sqlite3.Error as exc:
        raise StoreOpenError(
            f"database {_file(conn)}: cannot read its schema version: {exc}"
        ) from None
    return 0 if row is None else int(row[0])


def _migrate(conn: sqlite3.Connection) -> int:
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    for _ in range(len(MIGRATIONS) + 1):
        with transaction(conn):
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            version = 0 if row is None else int(row[0])
            if version > len(MIGRATIONS):
                raise StoreOpenError(f"schema version {version} is newer than this fogpay")
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
