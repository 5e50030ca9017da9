"""Restore a fog that lost its disk from its peers' replicas (docs/protocol.md 17.3).

Sans-IO but for the one new SQLite file: ``plan`` decides from what the peers sent (batch
wires of this fog, verified under its own key) and the cloud's retained ack what can be
imported; ``import_into`` writes it into a new store as the sealed log: records (receipts
for replay), batches (acked up to the cloud's ack), device sequence high-water marks and day
totals. Every lease named by an imported record or seen retained for this fog is
**retired**: stored as reported and closed (``lease_reports``, ``drawn_micros`` -1), so it
is never drawn on, never reported and never republished by the restored fog; the cloud
closes it from booked evidence (``fogpay cloud fog close-leases``). Records no peer held
are lost from the fog: devices hold their receipts.

The caller (``fogpay fog restore``, the simulator) gathers the wires by ``fetch`` and opens
the core over the file afterwards: it continues the chain after the highest batch.
"""

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from fog.authorize import DAY_MS
from fog.batcher import transaction
from fog.replicas import VerifiedBatch, verify_batch
from fog.sqlints import to_i64
from protocol.batch import decode_batch, decode_record
from protocol.errors import Declined
from protocol.messages import Ack, BatchHeader, Intent, Receipt
from protocol.signing import open_envelope, open_message

RETIRED_DRAWN: Final = -1  # lease_reports.drawn_micros of a retired lease (never reported)


class RestoreError(Exception):
    """The fog cannot be restored (its chain head is lost): it needs a new fog_id."""


@dataclass(frozen=True, slots=True)
class RestorePlan:
    batches: list[VerifiedBatch]  # contiguous, ascending: what is imported
    cloud_acked: int  # the cloud's ack of this fog (0: none)
    refused: int = 0  # wires that did not verify as ours
    dropped: list[int] = field(default_factory=list)  # numbers not on the run to the head

    @property
    def head(self) -> int:
        return self.batches[-1].number if self.batches else 0

    @property
    def records(self) -> int:
        return sum(len(b.records) for b in self.batches)


def cloud_ack_number(payload: bytes | None, *, fog_id: str, issuer: bytes) -> int:
    """The batch number of the cloud's retained ack of ``fog_id`` (0 for none or invalid)."""
    if not payload:
        return 0
    try:
        ack = open_envelope(payload, Ack, signer=issuer).msg
    except Declined:
        return 0
    return ack.number if ack.fog_id == fog_id else 0


def batch_number(wire: bytes) -> int:
    """The batch number a wire's header states (0 if it does not decode); not verified."""
    try:
        return _header(decode_batch(wire)[0]).number
    except Declined:
        return 0


def plan(
    wires: Iterable[bytes], *, fog_id: str, fog_public: bytes, cloud_acked: int
) -> RestorePlan:
    """Verify the wires as this fog's batches and pick the contiguous run ending at the
    highest; raises RestoreError when it does not reach back to the cloud's ack (the batches
    in between are lost, so the chain cannot continue) or the cloud holds more than it."""
    got: dict[int, VerifiedBatch] = {}
    refused = 0
    for wire in wires:
        try:
            vb = verify_batch(wire, lambda f: [fog_public] if f == fog_id else [])
        except Declined:
            refused += 1
            continue
        got.setdefault(vb.number, vb)
    if not got:
        if cloud_acked > 0:
            raise RestoreError(
                f"the cloud holds batches to {cloud_acked} and no peer holds any: the chain "
                "head is lost, this fog needs a new fog_id"
            )
        return RestorePlan([], 0, refused)
    head = max(got)
    start = head
    while start - 1 in got and _links(got[start - 1], got[start]):
        start -= 1
    if head < cloud_acked:
        raise RestoreError(
            f"the cloud holds batches to {cloud_acked}, the peers only to {head}: the chain "
            "head is lost, this fog needs a new fog_id"
        )
    if start > cloud_acked + 1:
        raise RestoreError(
            f"batches {cloud_acked + 1}..{start - 1} are on no peer and not at the cloud: the "
            "chain cannot continue, this fog needs a new fog_id"
        )
    run = [got[n] for n in range(start, head + 1)]
    return RestorePlan(run, cloud_acked, refused, sorted(n for n in got if n < start))


def _links(prev: VerifiedBatch, nxt: VerifiedBatch) -> bool:
    header = _header(decode_batch(nxt.wire)[0])
    return header.prev_id == prev.header_id and header.first_index == prev.first_index + len(
        prev.records
    )


def import_into(
    conn: sqlite3.Connection,
    restore: RestorePlan,
    *,
    retired_leases: Sequence[bytes],
    now_ms: int,
) -> int:
    """Write the plan into a new, empty store (schema already created), in one transaction;
    returns the number of records imported."""
    (rows,) = conn.execute(
        "SELECT (SELECT count(*) FROM log) + (SELECT count(*) FROM batches)"
    ).fetchone()
    assert rows == 0, "restore imports into an empty store only"
    retired = set(retired_leases)
    devices: dict[bytes, tuple[int, int, int]] = {}  # device -> (q, day, day micros)
    with transaction(conn):
        for b in restore.batches:
            header_env, _ = decode_batch(b.wire)
            for position, record in enumerate(b.records):
                intent_env, receipt_env = decode_record(record)
                intent, intent_id, _ = open_message(intent_env, Intent)
                receipt, _, _ = open_message(receipt_env, Receipt)
                assert receipt.lease_id is not None
                retired.add(receipt.lease_id)
                owner = conn.execute(
                    "SELECT owner_id FROM bindings WHERE device = ? LIMIT 1", (intent.device,)
                ).fetchone()
                conn.execute(
                    "INSERT INTO log (n, intent_id, device, seq, owner_id, lease_id, "
                    "amount_micros, intent, receipt, at_ms) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (
                        b.first_index + position,
                        intent_id,
                        intent.device,
                        to_i64(intent.seq),
                        "" if owner is None else str(owner[0]),
                        receipt.lease_id,
                        intent.amount_micros,
                        intent_env,
                        receipt_env,
                        receipt.time_ms,
                    ),
                )
                day, a = receipt.time_ms // DAY_MS, intent.amount_micros
                q, d, micros = devices.get(intent.device, (0, day, 0))
                if day > d:  # the day total is the latest day's
                    d, micros = day, 0
                micros += a if day == d else 0
                devices[intent.device] = (max(q, intent.seq), d, micros)
            header = _header(header_env)
            conn.execute(
                "INSERT INTO batches (number, header_id, header, first_index, count, "
                "sealed_ms, acked) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    b.number,
                    b.header_id,
                    header_env,
                    b.first_index,
                    len(b.records),
                    header.time_ms,
                    int(b.number <= restore.cloud_acked),
                ),
            )
        for device, (q, day, micros) in devices.items():
            conn.execute(
                "INSERT INTO devices (device, seq_last, day, day_micros) VALUES (?, ?, ?, ?)",
                (device, to_i64(q), day, micros),
            )
        conn.execute(
            """CREATE TABLE IF NOT EXISTS lease_reports (
    lease_id BLOB PRIMARY KEY, drawn_micros INTEGER NOT NULL, batch INTEGER NOT NULL,
    envelope BLOB NOT NULL, reported_ms INTEGER NOT NULL, closed_ms INTEGER)"""
        )
        for lease_id in sorted(retired):
            conn.execute(
                "INSERT INTO lease_reports (lease_id, drawn_micros, batch, envelope, "
                "reported_ms, closed_ms) VALUES (?, ?, 0, x'', ?, ?) ON CONFLICT DO NOTHING",
                (lease_id, RETIRED_DRAWN, now_ms, now_ms),
            )
    return restore.records


def _header(env: bytes) -> BatchHeader:
    return open_message(env, BatchHeader)[0]
