"""The pieces of fog/metrics.py on their own: the database read (real SQLite file, rows as the
store writes them) and the histogram export."""

import os
import sqlite3
from pathlib import Path

import pytest

from fog.metrics import EXPORT_LE_S, RunningHistogram, export_buckets, read_store
from fog.schema import connect, migrate
from fog.store import LEASE_REPORTS_DDL

NOW_MS = 1_800_000_000_000


def make_db(path: Path, *, batches: int, acked: int, log_end: int) -> sqlite3.Connection:
    conn = connect(path)
    migrate(conn)
    conn.execute(LEASE_REPORTS_DDL)
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (n, os.urandom(32), b"h", (n - 1) * 4 + 1, 4, 1000 * n, int(n <= acked))
            for n in range(1, batches + 1)
        ],
    )
    conn.executemany(
        "INSERT INTO log (n, intent_id, device, seq, owner_id, lease_id, amount_micros, "
        "intent, receipt, at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(n, os.urandom(32), b"d", n, "o", b"l", 1, b"i", b"r", 0) for n in range(1, log_end)],
    )
    conn.execute("COMMIT")
    return conn


@pytest.mark.parametrize(
    "batches,acked", [(0, 0), (1, 0), (1, 1), (100, 0), (100, 37), (100, 99), (100, 100)]
)
def test_the_backlog_found_by_bisection_is_what_a_count_says(
    tmp_path: Path, batches: int, acked: int
) -> None:
    db = tmp_path / "fog.sqlite"
    conn = make_db(db, batches=batches, acked=acked, log_end=batches * 4 + 4)  # 3 unsealed
    count, oldest = conn.execute(
        "SELECT count(*), min(sealed_ms) FROM batches WHERE acked = 0"
    ).fetchone()
    view = read_store(db, now_ms=NOW_MS)
    assert (view.unacked, view.oldest_unacked_sealed_ms) == (count, oldest)
    assert view.batches_sealed == batches
    assert view.unsealed_records == 3
    records = conn.execute(
        "SELECT count(*) FROM log WHERE n >= coalesce((SELECT min(first_index) FROM batches "
        "WHERE acked = 0), (SELECT coalesce(max(first_index + count), 1) FROM batches))"
    ).fetchone()[0]
    assert view.unacked_records == records  # the uplink's backlog (uplink_backlog)
    assert (view.suspended_devices, view.peer_marked_devices) == (0, 0)  # no gossip tables
    conn.close()


def test_budget_counts_live_unreported_leases_and_shows_spent_owners_as_zero(
    tmp_path: Path,
) -> None:
    db = tmp_path / "fog.sqlite"
    conn = make_db(db, batches=0, acked=0, log_end=1)
    rows = [  # lease_id, owner, currency, amount, drawn, not_after_ms
        (b"a" * 16, "anna", "EUR", 5_000_000, 1_250_000, NOW_MS + 1),
        (b"b" * 16, "anna", "EUR", 2_000_000, 0, NOW_MS),  # live to the millisecond
        (b"c" * 16, "anna", "GBP", 3_000_000, 3_000_000, NOW_MS + 1),  # spent
        (b"d" * 16, "bert", "EUR", 9_000_000, 0, NOW_MS - 1),  # expired
        (b"e" * 16, "carl", "EUR", 7_000_000, 1, NOW_MS + 1),  # reported
    ]
    conn.executemany(
        "INSERT INTO leases VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(lid, os.urandom(32), o, c, a, d, t) for lid, o, c, a, d, t in rows],
    )
    conn.execute("INSERT INTO lease_reports VALUES (?, 1, 0, x'00', 0, NULL)", (b"e" * 16,))
    view = read_store(db, now_ms=NOW_MS)
    assert view.budget == {
        ("anna", "EUR"): (5_750_000, 2),
        ("anna", "GBP"): (0, 1),
        ("bert", "EUR"): (0, 0),
        ("carl", "EUR"): (0, 0),
    }
    conn.close()


def test_a_missing_database_is_an_error_not_a_new_file(tmp_path: Path) -> None:
    with pytest.raises(sqlite3.Error):
        read_store(tmp_path / "absent.sqlite", now_ms=NOW_MS)
    assert not (tmp_path / "absent.sqlite").exists()


def test_exported_buckets_are_exact_cumulative_counts_and_totals_survive_take() -> None:
    h = RunningHistogram()
    samples_s = [0.00004, 0.0009, 0.001, 0.0031, 0.012, 0.25, 0.9, 4.0, 61.0, 3600.0]
    for s in samples_s[:5]:
        h.add(s)
    assert h.take("answer_ms")["answer_ms_n"] == 5  # fog_stats' interval ends ...
    for s in samples_s[5:]:
        h.add(s)
    counts, n, total_s = h.totals()  # ... the totals do not
    assert n == len(samples_s) and total_s == pytest.approx(sum(samples_s))
    pairs = export_buckets(counts, n)
    assert pairs[-1] == ("+Inf", float(n))
    edges = [float(le) for le, _ in pairs[:-1]]
    assert edges == sorted(edges) and len(edges) == len(set(edges))
    assert len(edges) >= len(EXPORT_LE_S) - 2 and edges[-1] <= 60
    for le, count in pairs[:-1]:  # an edge is a 10% bucket's upper edge: the count is exact
        assert count == sum(1 for s in samples_s if s <= float(le)), le


@pytest.mark.parametrize("doc", ["fog.md", "cloud.md"])
def test_the_metrics_config_keys_are_documented(doc: str) -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / doc).read_text()
    assert "`metrics.enabled`" in text and "`metrics.listen`" in text
