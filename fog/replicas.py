"""Replication between fogs (docs/protocol.md 17.2, 17.3): the fog's two roles, sans-IO.

**Origin.** Every sealed batch goes, byte for byte as on ``up/{f}/batch``, to the first
``k`` peers (``federation.replicas``, in the order of ``federation.peers``; all of them if
fewer) on ``fogpay/1/gossip/{peer}/batch``. A holder answers ``racc``; the origin records
``(b, p)`` durably (table ``replica_acks``). A batch is **safe** when ``k`` distinct holders
acked it or the cloud acked it. Unsafe batches go again on the uplink's go-back-N timing
(``uplink.ack_timeout_ms``, doubling per silent round to ``ACK_WAIT_MS_MAX``; at once after
``Connected``), and each silent round widens the targets by one more peer in order, so k
holders are found when k peers answer. ``records_at_risk``: records in no safe batch
(unsealed ones included): what the fog can lose with its disk.

**Holder.** A batch on ``gossip/{me}/batch`` is verified (size, decoding, header signed by
the fog credential of its ``f``, Merkle root, each record: intent signed by its ``d``,
receipt signed by the header's signer, answering the intent, ``ok``, log index) before it
is stored (table ``replicas``), and the ``racc`` is signed before the COMMIT and sent
after it. A second batch at one ``(f, b)`` with another header id is evidence of a fork:
kept in ``replica_forks``, never replacing the first, no ``racc``, event ``replica_fork``.
A full store (``federation.replica_bytes_max``) refuses (``replica_full``, no ``racc``).
The holder learns the cloud's height per origin from the retained, issuer-signed
``up/{f}/ack`` and relays what the cloud lacks on ``up/{me}/relay`` once it has held it
``relay_after_ms`` (at most ``uplink.window`` batches per origin per ``relay_after_ms``).
Replicas the cloud acked go after ``replica_keep_ms``, except the newest of each origin. A
signed ``fetch`` of origin ``f`` is answered with its replicas from ``b``, up to 64.

Tables are created ``IF NOT EXISTS`` at open (like ``lease_reports``), so a store of an
older fogpay gains them without a schema step.
"""

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import nacl.signing

from fog.batcher import transaction
from fog.config import FederationConfig
from fog.uplink import ACK_WAIT_MS_MAX
from protocol import limits, merkle, topics
from protocol.batch import decode_batch, decode_record
from protocol.errors import Declined, TopicError
from protocol.messages import Ack, BatchHeader, Intent, Receipt
from protocol.reasons import Reason
from protocol.replica import FETCH_BATCHES_MAX, Fetch, ReplicaAck
from protocol.signing import open_envelope, open_message, seal

REPLICAS_DDL: Final = (
    """CREATE TABLE IF NOT EXISTS replicas (
    origin TEXT NOT NULL,           -- the batch header's f
    number INTEGER NOT NULL,        -- its b
    header_id BLOB NOT NULL,
    wire BLOB NOT NULL,             -- the batch as received (verified first)
    received_ms INTEGER NOT NULL,
    PRIMARY KEY (origin, number)
)""",
    """CREATE TABLE IF NOT EXISTS replica_forks (
    origin TEXT NOT NULL, number INTEGER NOT NULL, header_id BLOB NOT NULL,
    wire BLOB NOT NULL, received_ms INTEGER NOT NULL,
    PRIMARY KEY (origin, number, header_id)
)""",
    """CREATE TABLE IF NOT EXISTS replica_acks (
    number INTEGER NOT NULL,        -- our batch b
    holder TEXT NOT NULL,           -- the peer p that holds it (racc verified)
    at_ms INTEGER NOT NULL,
    PRIMARY KEY (number, holder)
)""",
)
UNSAFE_LISTED_MAX: Final = 64  # unsafe batches (re)sent per plan
FORKS_KEPT_MAX: Final = 1_024
PRUNE_ROWS_MAX: Final = 512
ROUNDS_MAX: Final = 30  # silent rounds counted per batch (the wait is capped anyway)
# a fetch is answered once, and only within this much of the holder's clock: a replayed fetch
# cannot make a holder send a fog's batches again and again
FETCH_WINDOW_MS: Final = 300_000
FETCHES_REMEMBERED_MAX: Final = 1_024


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaEvent:
    """What replication did, for the shell's log line and counter (``event`` is both):
    replica_stored, replica_duplicate, replica_refused, replica_fork, replica_full (held
    batches of other fogs), replica_acked (a holder's racc of ours), replica_relayed,
    replica_fetched (answers to a restoring fog). ``origin`` is the batch's fog, except for
    replica_acked, where it is the holder that acked our batch ``number``."""

    event: str
    origin: str
    number: int
    detail: str = ""


@dataclass(frozen=True, slots=True)
class VerifiedBatch:
    origin: str
    number: int
    header_id: bytes
    first_index: int
    records: list[bytes]
    wire: bytes
    signer: bytes


@dataclass(slots=True)
class _Sending:
    last_ms: int | None = None
    rounds: int = 0


@dataclass(slots=True)
class Gossip:
    """A message for a peer or the cloud (``fog.core`` turns it into a ``Publish``)."""

    topic: str
    payload: bytes


Out = list[Gossip | ReplicaEvent]


def _ev(event: str, origin: str, number: int, detail: str = "") -> ReplicaEvent:
    return ReplicaEvent(event=event, origin=origin, number=number, detail=detail[:200])


def init(conn: sqlite3.Connection) -> None:
    with transaction(conn):
        for ddl in REPLICAS_DDL:
            conn.execute(ddl)


def fog_keys(conn: sqlite3.Connection, fog_id: str) -> list[bytes]:
    """The keys of the fog credentials of ``fog_id`` the trust store holds."""
    rows = conn.execute("SELECT key FROM fogs WHERE fog_id = ?", (fog_id,)).fetchall()
    return [bytes(r[0]) for r in rows]


def verify_batch(wire: bytes, keys_of: Callable[[str], list[bytes]]) -> VerifiedBatch:
    """Every check of a replica before it is stored; raises Declined for the batch."""
    if len(wire) > limits.BATCH_WIRE_BYTES_MAX:
        raise Declined(Reason.MALFORMED, "batch: too large")
    header_env, records = decode_batch(wire)
    header, header_id, signer = open_message(header_env, BatchHeader)
    keys = keys_of(header.fog_id)
    if not keys:  # its credential has not arrived yet: the origin sends again
        raise Declined(Reason.BAD_SIGNATURE, f"batch: unknown fog {header.fog_id}")
    if signer not in keys:
        raise Declined(Reason.BAD_SIGNATURE, f"batch: not signed by fog {header.fog_id}")
    if header.count != len(records):
        raise Declined(Reason.MALFORMED, "batch: n differs from the records")
    if merkle.root_of_records(records) != header.root:
        raise Declined(Reason.MALFORMED, "batch: Merkle root does not match the records")
    for position, record in enumerate(records):
        intent_env, receipt_env = decode_record(record)
        intent, intent_id, _ = open_message(intent_env, Intent)
        receipt, _, receipt_signer = open_message(receipt_env, Receipt)
        if receipt_signer != signer:
            raise Declined(Reason.BAD_SIGNATURE, f"record {position}: receipt signer")
        if (receipt.intent_id, receipt.device, receipt.seq) != (
            intent_id,
            intent.device,
            intent.seq,
        ):
            raise Declined(Reason.MALFORMED, f"record {position}: receipt does not answer")
        if not receipt.ok or intent.fog_id != header.fog_id:
            raise Declined(Reason.MALFORMED, f"record {position}: not an ok of this fog")
        if receipt.log_index != header.first_index + position:
            raise Declined(Reason.MALFORMED, f"record {position}: log index")
    return VerifiedBatch(
        header.fog_id, header.number, header_id, header.first_index, records, wire, signer
    )


@dataclass(slots=True)
class Replication:
    """Both roles over the fog's connection; the in-memory part (resend times, the cloud's
    heights per origin) may be lost on a crash: a restart resends and relearns."""

    conn: sqlite3.Connection
    fog_id: str
    key: nacl.signing.SigningKey
    issuer: bytes
    config: FederationConfig
    ack_timeout_ms: int
    window: int
    _sending: dict[int, _Sending] = field(default_factory=dict)
    _heights: dict[str, int] = field(default_factory=dict)  # origin -> the cloud's ack b
    _relayed_ms: dict[str, int] = field(default_factory=dict)  # origin -> mono of last relay
    _fetches: dict[bytes, int] = field(default_factory=dict)  # fetch id -> its t (answered)
    _bytes: int = -1  # replica bytes stored (read at first use)
    _at: int = 0

    def __post_init__(self) -> None:
        init(self.conn)

    @property
    def k(self) -> int:
        return min(self.config.replicas, len(self.config.peers))

    @property
    def enabled(self) -> bool:
        return bool(self.config.peers)

    # ---- origin ----------------------------------------------------------------------------

    def reset(self) -> None:
        """After a reconnect: every unsafe batch goes again at once."""
        self._sending.clear()
        self._at = 0

    def plan(self, mono: int, wire_of: Callable[[int], bytes | None]) -> Out:
        """(Re)send unsafe batches that are due; at most every ``ack_timeout_ms / 4``."""
        k = self.k
        if k == 0:
            return []
        acked = self._holders()
        unsafe = [
            int(r[0])
            for r in self.conn.execute(
                "SELECT number FROM batches WHERE acked = 0 ORDER BY number LIMIT ?",
                (UNSAFE_LISTED_MAX * 4,),
            )
            if len(acked.get(int(r[0]), ())) < k
        ][:UNSAFE_LISTED_MAX]
        keep = set(unsafe)
        self._sending = {b: s for b, s in self._sending.items() if b in keep}
        out: Out = []
        for b in unsafe:
            s = self._sending.setdefault(b, _Sending())
            if s.last_ms is not None:
                wait = min(ACK_WAIT_MS_MAX, self.ack_timeout_ms << min(s.rounds, ROUNDS_MAX))
                if mono - s.last_ms < wait:
                    continue
                s.rounds = min(s.rounds + 1, ROUNDS_MAX)
            held = acked.get(b, set())
            candidates = [p for p in self.config.peers if p not in held]
            targets = candidates[: k - len(held) + s.rounds]
            wire = wire_of(b)
            if wire is None:
                continue
            s.last_ms = mono
            out.extend(Gossip(topics.gossip_topic(p, "batch"), wire) for p in targets)
        return out

    def _holders(self) -> dict[int, set[str]]:
        acked: dict[int, set[str]] = {}
        for number, holder in self.conn.execute(
            "SELECT number, holder FROM replica_acks WHERE number IN "
            "(SELECT number FROM batches WHERE acked = 0)"
        ):
            acked.setdefault(int(number), set()).add(str(holder))
        return acked

    def at_risk(self) -> int:
        """Records in no safe batch: unsealed, or sealed and neither acked by the cloud nor
        held by k peers."""
        k = self.k
        (unsealed,) = self.conn.execute(
            "SELECT (SELECT coalesce(max(n), 0) FROM log) - "
            "(SELECT coalesce(max(first_index + count) - 1, 0) FROM batches)"
        ).fetchone()
        (sealed,) = self.conn.execute(
            "SELECT coalesce(sum(count), 0) FROM batches WHERE acked = 0 AND "
            "(SELECT count(*) FROM replica_acks a WHERE a.number = batches.number) < ?",
            (max(k, 1) if self.enabled else 1_000_000,),
        ).fetchone()
        return max(0, int(unsealed)) + int(sealed)

    def racc(self, payload: bytes, now: int) -> Out:
        """A holder's racc of one of our batches: recorded durably."""
        try:
            signed = open_envelope(payload, ReplicaAck)
        except Declined as exc:
            return [_ev("replica_refused", "", 0, exc.detail)]
        r = signed.msg
        keys = fog_keys(self.conn, r.holder)
        if not keys:  # its credential has not arrived yet: the holder answers again
            return [_ev("replica_refused", r.origin, r.number, f"unknown fog {r.holder}")]
        if r.origin != self.fog_id or signed.signer not in keys:
            return [
                _ev(
                    "replica_refused",
                    r.origin,
                    r.number,
                    f"racc not signed by {r.holder} or not ours",
                )
            ]
        with transaction(self.conn):
            row = self.conn.execute(
                "SELECT header_id FROM batches WHERE number = ?", (r.number,)
            ).fetchone()
            if row is None or bytes(row[0]) != r.header_id:
                return [_ev("replica_refused", r.origin, r.number, "racc names no batch of ours")]
            new = self.conn.execute(
                "INSERT INTO replica_acks (number, holder, at_ms) VALUES (?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                (r.number, r.holder, now),
            ).rowcount
        if not new:
            return []
        return [_ev("replica_acked", r.holder, r.number)]

    # ---- holder ----------------------------------------------------------------------------

    def batch(self, wire: bytes, now: int) -> Out:
        """A replica offered by its origin (or by a holder answering a fetch)."""
        try:
            vb = verify_batch(wire, lambda f: fog_keys(self.conn, f))
        except Declined as exc:
            return [_ev("replica_refused", "", 0, f"{exc.reason}: {exc.detail}"[:200])]
        if vb.origin == self.fog_id:  # our own batch: only a restore takes those
            return [_ev("replica_refused", vb.origin, vb.number, "a batch of our own")]
        if self._bytes < 0:
            (self._bytes,) = self.conn.execute(
                "SELECT coalesce(sum(length(wire)), 0) FROM replicas"
            ).fetchone()
        racc = seal(
            ReplicaAck(origin=vb.origin, number=vb.number, header_id=vb.header_id,
                       holder=self.fog_id, time_ms=now),
            self.key,
        )  # fmt: skip
        with transaction(self.conn):
            row = self.conn.execute(
                "SELECT header_id FROM replicas WHERE origin = ? AND number = ?",
                (vb.origin, vb.number),
            ).fetchone()
            if row is not None and bytes(row[0]) != vb.header_id:
                (forks,) = self.conn.execute("SELECT count(*) FROM replica_forks").fetchone()
                if forks < FORKS_KEPT_MAX:
                    self.conn.execute(
                        "INSERT INTO replica_forks (origin, number, header_id, wire, "
                        "received_ms) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                        (vb.origin, vb.number, vb.header_id, wire, now),
                    )
                return [_ev("replica_fork", vb.origin, vb.number, "another header id: kept")]
            if row is None:
                if self._bytes + len(wire) > self.config.replica_bytes_max:
                    return [_ev("replica_full", vb.origin, vb.number, f"{self._bytes} bytes")]
                self.conn.execute(
                    "INSERT INTO replicas (origin, number, header_id, wire, received_ms) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (vb.origin, vb.number, vb.header_id, wire, now),
                )
        if row is None:
            self._bytes += len(wire)
        what = "replica_stored" if row is None else "replica_duplicate"
        return [
            _ev(what, vb.origin, vb.number),
            Gossip(topics.gossip_topic(vb.origin, "racc"), racc),
        ]

    def fetch(self, payload: bytes, now: int) -> Out:
        """A restoring fog asks for its own batches: answered only if it signed the fetch,
        once, and only if its ``t`` is within ``FETCH_WINDOW_MS`` of our clock."""
        try:
            signed = open_envelope(payload, Fetch)
        except Declined as exc:
            return [_ev("replica_refused", "", 0, exc.detail)]
        f = signed.msg
        keys = fog_keys(self.conn, f.fog_id)
        if not keys:
            return [_ev("replica_refused", f.fog_id, f.from_number, f"unknown fog {f.fog_id}")]
        if signed.signer not in keys:
            return [_ev("replica_refused", f.fog_id, f.from_number, "fetch not signed by its fog")]
        if abs(now - f.time_ms) > FETCH_WINDOW_MS:
            return [_ev("replica_refused", f.fog_id, f.from_number, "fetch time off our clock")]
        self._fetches = {i: t for i, t in self._fetches.items() if abs(now - t) <= FETCH_WINDOW_MS}
        if signed.id in self._fetches or len(self._fetches) >= FETCHES_REMEMBERED_MAX:
            return [_ev("replica_refused", f.fog_id, f.from_number, "fetch answered already")]
        self._fetches[signed.id] = f.time_ms
        rows = self.conn.execute(
            "SELECT number, wire FROM replicas WHERE origin = ? AND number >= ? "
            "ORDER BY number LIMIT ?",
            (f.fog_id, f.from_number, FETCH_BATCHES_MAX),
        ).fetchall()
        topic = topics.gossip_topic(f.fog_id, "batch")
        out: Out = [Gossip(topic, bytes(w)) for _, w in rows]
        last = int(rows[-1][0]) if rows else 0
        out.append(
            _ev("replica_fetched", f.fog_id, last, f"{len(rows)} batches from {f.from_number}")
        )
        return out

    def cloud_ack(self, origin: str, payload: bytes) -> Out:
        """The retained ack of another fog: the cloud holds its chain up to ``b``."""
        try:
            ack = open_envelope(payload, Ack, signer=self.issuer).msg
        except Declined:
            return []
        if ack.fog_id != origin:
            return []
        if ack.number > self._heights.get(origin, 0):
            self._heights[origin] = ack.number
        return []

    def relay(self, now: int, mono: int) -> Out:
        """Replicas the cloud lacks, held ``relay_after_ms``: up to the uplink window per
        origin per ``relay_after_ms``; and pruning of what the cloud acked."""
        every = self.config.relay_after_ms
        out: Out = []
        origins = [str(r[0]) for r in self.conn.execute("SELECT DISTINCT origin FROM replicas")]
        for origin in origins:
            last = self._relayed_ms.get(origin)
            if last is not None and mono - last < every:
                continue
            rows = self.conn.execute(
                "SELECT number, wire FROM replicas WHERE origin = ? AND number > ? AND "
                "received_ms <= ? ORDER BY number LIMIT ?",
                (origin, self._heights.get(origin, 0), now - every, self.window),
            ).fetchall()
            if not rows:
                continue
            self._relayed_ms[origin] = mono
            topic = topics.relay_topic(self.fog_id)
            out.extend(Gossip(topic, bytes(w)) for _, w in rows)
            out.append(_ev("replica_relayed", origin, int(rows[-1][0]), f"{len(rows)} batches"))
        self._prune(now)
        return out

    def _prune(self, now: int) -> None:
        keep = self.config.replica_keep_ms
        with transaction(self.conn):
            for origin, height in self._heights.items():
                self.conn.execute(
                    "DELETE FROM replicas WHERE rowid IN (SELECT rowid FROM replicas WHERE "
                    "origin = ? AND number <= ? AND received_ms < ? AND number < "
                    "(SELECT max(number) FROM replicas WHERE origin = ?) LIMIT ?)",
                    (origin, height, now - keep, origin, PRUNE_ROWS_MAX),
                )
            self.conn.execute(  # acks of batches the cloud holds are no longer needed
                "DELETE FROM replica_acks WHERE number < "
                "(SELECT coalesce(max(number), 0) FROM batches WHERE acked = 1)"
            )
        self._bytes = -1

    # ---- routing ---------------------------------------------------------------------------

    def route(self, topic: topics.Topic, payload: bytes, now: int) -> Out | None:
        """The messages that are replication's; None for the rest."""
        kind = topic.kind
        if kind is topics.Kind.ACK:
            if topic.fog_id == self.fog_id or not payload:
                return None
            assert topic.fog_id is not None
            return self.cloud_ack(topic.fog_id, payload)
        if topic.fog_id != self.fog_id:
            return None
        if kind is topics.Kind.GOSSIP_BATCH:
            return self.batch(payload, now)
        if kind is topics.Kind.GOSSIP_RACC:
            return self.racc(payload, now)
        if kind is topics.Kind.GOSSIP_FETCH:
            return self.fetch(payload, now)
        return None


def parse_or_none(topic: str) -> topics.Topic | None:
    try:
        return topics.parse(topic)
    except TopicError:
        return None
