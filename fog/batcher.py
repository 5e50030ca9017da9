"""Cutting the log into signed batches, and applying the cloud's acks (spec section 7).

The log is the table ``log``: one row per authorized intent, index ``n`` from 1 with no gaps.
Batches cover it from the start with no gaps either: batch ``b`` holds records
``s .. s + count - 1`` and batch ``b + 1`` starts at ``s + count``, so "what is not batched
yet" is just the log after the last batch; no per-record flag is needed.

A batch is cut when ``records_max`` records wait (or fewer, if one more would take the wire
form past 1 MiB), or when the oldest waiting record is ``age_ms`` old. Its header carries the
Merkle root of its records (``protocol.merkle``) and ``h``, the message id of the previous
header, so the batches form a hash chain the cloud can check. Each batch is sealed in its own
transaction: a crash seals a batch wholly or not at all, and the next ``seal_due`` carries on.

Acks only move forward: ``ack b`` with the header id of our batch ``b`` marks it and every
earlier batch acked. Records stay in the database after the ack (retransmitted intents are
still answered from the log) until ``FogStore.prune`` removes them (old enough, lease closed).
"""

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final, Literal

import nacl.signing

from protocol import limits, merkle
from protocol.batch import encode_batch, encode_record
from protocol.errors import Declined
from protocol.messages import ZERO_HASH, Ack, BatchHeader
from protocol.reasons import Reason
from protocol.signing import open_envelope, seal_signed

SEAL_ROUNDS_MAX: Final = 256  # batches sealed per seal_due call
# msgpack framing of [header: bin, [record: bin, ...]]: array, bin 16, array 32 headers
WIRE_FRAME_BYTES: Final = 1 + 3 + 5
RECORD_FRAME_BYTES: Final = 3  # bin 16 header (records are < 64 KiB)


@dataclass(frozen=True, slots=True)
class SealedBatch:
    number: int
    header: bytes  # header envelope
    records: list[bytes]
    first_index: int
    wire: bytes  # protocol.batch.encode_batch(header, records)


@dataclass(frozen=True, slots=True)
class AckOutcome:
    status: Literal["accepted", "duplicate", "refused"]
    reason: Reason | None
    detail: str
    number: int | None = None  # the acked batch number b


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT; ROLLBACK and re-raise on any exception (SQLite may have
    rolled back already, e.g. on a full disk)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def records_that_fit(records: list[bytes], *, bytes_max: int = limits.BATCH_WIRE_BYTES_MAX) -> int:
    """How many of ``records``, from the first, fit in one batch on the wire."""
    budget = bytes_max - WIRE_FRAME_BYTES - limits.IDENTITY_ENVELOPE_BYTES_MAX
    count = 0
    for record in records[: limits.BATCH_RECORDS_MAX]:
        budget -= RECORD_FRAME_BYTES + len(record)
        if budget < 0:
            break
        count += 1
    return count


def make_header(
    *, fog_id: str, number: int, prev_id: bytes, first_index: int, records: list[bytes], now_ms: int
) -> BatchHeader:
    """The header of a batch: pure."""
    assert number >= 1 and (number > 1 or prev_id == ZERO_HASH)
    return BatchHeader(
        fog_id=fog_id,
        number=number,
        prev_id=prev_id,
        first_index=first_index,
        count=len(records),
        root=merkle.root_of_records(records),
        time_ms=now_ms,
    )


def _last_batch(conn: sqlite3.Connection) -> tuple[int, bytes, int]:
    """(number, header id, next log index to batch) of the newest batch; (0, zeros, 1) if none."""
    row = conn.execute(
        "SELECT number, header_id, first_index + count FROM batches ORDER BY number DESC LIMIT 1"
    ).fetchone()
    return (0, ZERO_HASH, 1) if row is None else (row[0], row[1], row[2])


def _records(conn: sqlite3.Connection, first: int, count: int) -> tuple[list[bytes], int | None]:
    """Records ``first ..`` (at most ``count``) and the time of the first."""
    rows = conn.execute(
        "SELECT n, intent, receipt, at_ms FROM log WHERE n >= ? ORDER BY n LIMIT ?",
        (first, count),
    ).fetchall()
    assert all(r[0] == first + k for k, r in enumerate(rows)), "gap in the log"
    return [encode_record(r[1], r[2]) for r in rows], (rows[0][3] if rows else None)


def seal_due(
    conn: sqlite3.Connection,
    *,
    fog_id: str,
    fog_key: nacl.signing.SigningKey,
    now_ms: int,
    records_max: int,
    age_ms: int,
    log_end: int,
) -> list[SealedBatch]:
    """Seal what is due (module docstring); ``log_end`` is the next log index to be written."""
    assert 1 <= records_max <= limits.BATCH_RECORDS_MAX and age_ms >= 0
    sealed: list[SealedBatch] = []
    for _ in range(SEAL_ROUNDS_MAX):
        number, prev_id, first = _last_batch(conn)
        if first >= log_end:
            break
        records, oldest_ms = _records(conn, first, records_max)
        assert oldest_ms is not None
        fit = records_that_fit(records)
        full = fit < len(records) or len(records) == records_max
        if not full and now_ms - oldest_ms < age_ms:
            break
        sealed.append(
            _seal_one(conn, fog_id, fog_key, number + 1, prev_id, first, records[:fit], now_ms)
        )
    return sealed


def _seal_one(
    conn: sqlite3.Connection,
    fog_id: str,
    fog_key: nacl.signing.SigningKey,
    number: int,
    prev_id: bytes,
    first: int,
    records: list[bytes],
    now_ms: int,
) -> SealedBatch:
    header = make_header(
        fog_id=fog_id,
        number=number,
        prev_id=prev_id,
        first_index=first,
        records=records,
        now_ms=now_ms,
    )
    signed = seal_signed(header, fog_key)
    with transaction(conn):
        conn.execute(
            "INSERT INTO batches (number, header_id, header, first_index, count, sealed_ms) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (number, signed.id, signed.raw, first, len(records), now_ms),
        )
    return SealedBatch(number, signed.raw, records, first, encode_batch(signed.raw, records))


def unacked(conn: sqlite3.Connection) -> list[SealedBatch]:
    """Every sealed batch not acked, in order, rebuilt from the log."""
    rows = conn.execute(
        "SELECT number, header, first_index, count FROM batches WHERE acked = 0 ORDER BY number"
    ).fetchall()
    out: list[SealedBatch] = []
    for number, header, first, count in rows:
        records, _ = _records(conn, first, count)
        assert len(records) == count
        out.append(SealedBatch(number, header, records, first, encode_batch(header, records)))
    return out


def apply_ack(
    conn: sqlite3.Connection, envelope: bytes, *, fog_id: str, issuer: bytes
) -> AckOutcome:
    """Verify an ack (issuer-signed, for this fog, naming one of our headers) and mark batches
    up to its ``b`` acked, in one transaction."""
    try:
        ack = open_envelope(envelope, Ack, signer=issuer).msg
    except Declined as exc:
        return AckOutcome("refused", exc.reason, exc.detail[:200])
    if ack.fog_id != fog_id:
        return AckOutcome("refused", Reason.WRONG_FOG, f"ack for fog {ack.fog_id}", ack.number)
    with transaction(conn):
        return _mark_acked(conn, ack)


def _mark_acked(conn: sqlite3.Connection, ack: Ack) -> AckOutcome:
    row = conn.execute(
        "SELECT header_id, acked FROM batches WHERE number = ?", (ack.number,)
    ).fetchone()
    if row is None:
        return AckOutcome("refused", Reason.MALFORMED, "ack of a batch not sealed", ack.number)
    if row[0] != ack.header_id:
        return AckOutcome("refused", Reason.MALFORMED, "ack header id mismatch", ack.number)
    marked = conn.execute(
        "UPDATE batches SET acked = 1 WHERE number <= ? AND acked = 0", (ack.number,)
    ).rowcount
    if marked == 0:
        return AckOutcome("duplicate", None, f"batches to {ack.number} already acked", ack.number)
    return AckOutcome("accepted", None, f"{marked} batches acked to {ack.number}", ack.number)
