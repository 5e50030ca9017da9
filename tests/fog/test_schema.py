"""The database: WAL, synchronous=FULL, a schema version, refused when newer than the code."""

import sqlite3

import pytest

from fog.store import MIGRATIONS, StoreError
from tests.fog.world import World


def test_wal_full_and_versioned(world: World) -> None:
    conn = sqlite3.connect(world.path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(len(MIGRATIONS),)]
    finally:
        conn.close()
    assert world.store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_reopen_does_not_migrate_twice(world: World) -> None:
    world.owner()
    world.reopen()
    world.reopen()
    conn = sqlite3.connect(world.path)
    try:
        assert conn.execute("SELECT count(*) FROM schema_version").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM owners").fetchone()[0] == 1
    finally:
        conn.close()


def test_newer_schema_refused(world: World) -> None:
    world.store.close()
    conn = sqlite3.connect(world.path)
    conn.execute("UPDATE schema_version SET version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        world.open()
    conn = sqlite3.connect(world.path)
    conn.execute("UPDATE schema_version SET version = ?", (len(MIGRATIONS),))
    conn.commit()
    conn.close()
    world.store = world.open()  # the fixture closes it
