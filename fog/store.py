"""The fog's durable state: trust material, leases, devices, the log and its batches.

Synchronous, plain ``sqlite3``: the storage interface of ``FogCore`` (fog/core.py), its one
caller, which runs in a process of its own or on the daemon's one worker thread; the hot path
is one core input per group of intents, not one call per SQL statement.
``process`` decides a whole group in one ``BEGIN IMMEDIATE ... COMMIT``; the database is in WAL
mode with ``synchronous=FULL``, so when ``process`` returns the group is durable and its
receipts may leave. A crash before the COMMIT loses the whole group and no receipt of it has
left; a crash after it loses nothing. Opened with ``durable_commits=False`` (the daemon's
pipelined group commit, fog/pipeline.py) the COMMIT does not fsync (``synchronous=NORMAL``)
and durability is ``WalFile.sync()``'s: an fsync of the ``-wal`` file that covers every commit
made before it started (why that is safe: fog/pipeline.py). Nothing here raises for bad
input: bad input becomes a decline receipt (intents) or a refused outcome (trust material,
acks), and a counter.

Modules: the schema and connection in ``fog/schema.py``, trust material in
``fog/trustdb.py``, a group's reads and writes in ``fog/group.py`` (what is read once per
device and kept while the database provably has not changed), the decision in
``fog/authorize.py``, batches and acks in ``fog/batcher.py``, wire integers in SQLite in
``fog/sqlints.py``.
"""

import hashlib
import os
import sqlite3
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import nacl.signing

from fog import batcher, peers, returns, transfers, trustdb
from fog.authorize import Decision, DeviceView, Policy, authorize, screen
from fog.batcher import transaction
from fog.group import DeviceState, Group, LeaseSet, LogRow, Reads, Voucher
from fog.ratelimit import Buckets
from fog.schema import MIGRATIONS, SCHEMA_V1, StoreError, connect, migrate
from fog.sqlints import INT64_MAX, to_i64
from fog.trustdb import (
    DETAIL_CHARS_MAX,
    ISSUER_SIGNED,
    TRUST_CLASSES,
    TRUST_ROWS_MAX,
    TRUST_TYPES,
    TrustOutcome,
)
from protocol import limits
from protocol.batch import encode_batch, encode_record
from protocol.errors import Declined
from protocol.gossip import SeenEntry
from protocol.messages import (
    STATUS_DECLINED,
    STATUS_OK,
    ZERO_KEY,
    Intent,
    Receipt,
    decode_body,
)
from protocol.reasons import Reason
from protocol.signing import (
    Signed,
    is_valid_public_key,
    message_id,
    public_key,
    seal,
    split_envelope,
)

PROCESS_GROUP_MAX: Final = 4096  # arrivals per process() call (one transaction)
__all__ = [  # what other modules import from here (the split modules' names included)
    "DETAIL_CHARS_MAX",
    "ISSUER_SIGNED",
    "MIGRATIONS",
    "PROCESS_GROUP_MAX",
    "SCHEMA_V1",
    "TRUST_CLASSES",
    "TRUST_ROWS_MAX",
    "TRUST_TYPES",
    "AckOutcome",
    "Arrival",
    "FogStore",
    "LeaseDraws",
    "Outcome",
    "SealedBatch",
    "StoreError",
    "StoreSyncError",
    "TrustOutcome",
    "WalFile",
    "connect",
    "migrate",
]


@dataclass(frozen=True, slots=True)
class Arrival:
    topic_device: bytes  # the 32 key bytes parsed from the intent topic's device level
    payload: bytes  # raw MQTT payload (unverified)
    # time.perf_counter() when the daemon read it (fog_stats' answer_ms); not stored, not sent
    # to the core's process
    received_s: float = field(default=0.0, compare=False)
    # a verify worker of this fog found the payload's signature good (fog/verifyproc.py): the
    # core does not check it again; False: the core checks it (as it always did)
    verified: bool = False


@dataclass(frozen=True, slots=True)
class Outcome:
    receipt: bytes  # receipt envelope to publish on receipt_topic(fog_id, topic_device)
    status: str  # "ok" | "declined"
    reason: Reason | None
    replay: bool  # a stored receipt answered again (retransmission of an authorized intent)
    intent_id: bytes  # for malformed: sha256(payload)
    device: bytes  # the intent's d (zeros when malformed)
    seq: int
    owner_id: str | None
    amount_micros: int | None
    log_index: int | None
    detail: str = ""  # why, for the log line (never a key or payload)
    # the intent's c once its signature verified (None: malformed or bad_signature): which
    # budget a lease request asks for, without decoding the intent again
    currency: str | None = None
    # publish the receipt sealed to ``device`` (docs/protocol.md section 16): the intent asked
    # (``sr``) and passed decoding, its signature and the topic check; ``receipt`` stays the
    # plain envelope (the log record holds it as it is)
    sealed: bool = False


AckOutcome = batcher.AckOutcome
SealedBatch = batcher.SealedBatch

# ---- uplink and lease management: constants and types (see the section at the class end)
UNACKED_LISTED_MAX: Final = 4096
LEASE_OWNERS_QUERIED_MAX: Final = 4096
LEASE_REPORTS_LISTED_MAX: Final = 1024
PRUNE_ROWS_MAX: Final = 512  # per call: a DELETE holds the store ~10 us per row
LEASE_REPORTED_NOT_AFTER_MS: Final = -1  # a reported lease: nothing is ever drawn on it again
LEASE_REPORTS_DDL: Final = """
CREATE TABLE IF NOT EXISTS lease_reports (
    lease_id BLOB PRIMARY KEY,
    drawn_micros INTEGER NOT NULL,
    batch INTEGER NOT NULL,
    envelope BLOB NOT NULL,         -- the signed lrep, resent as is
    reported_ms INTEGER NOT NULL,
    closed_ms INTEGER               -- the cloud cleared the retained lease topic
)"""


@dataclass(frozen=True, slots=True)
class LeaseDraws:
    lease_id: bytes
    drawn_micros: int
    last_batch: int  # 0: no batch holds a draw on the lease


class StoreSyncError(StoreError):
    """The durability barrier failed (fsync of the WAL: EIO): what was committed since the
    last good sync may not be on disk, and the page cache cannot be trusted to say."""


class WalFile:
    """One descriptor on a store's ``-wal`` file; ``sync()`` makes durable every commit that
    returned before it was called. One per syncing thread: after a failed writeback, Linux
    reports the error once per open file description (errseq), so two threads sharing one
    descriptor could each believe the other's failure was a success."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._fd: int | None = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def sync(self) -> None:
        """fdatasync (per inode: every frame written to the file before the call, by any
        thread). Raises ``OSError`` when the disk failed. A WAL file replaced since it was
        opened (deleted by a last connection's close and made again) is reopened: the old one
        was checkpointed into the database, with SQLite's own fsyncs, before it went; a WAL
        file gone means the same."""
        assert self._fd is not None, "closed"
        try:
            replaced = os.stat(self._path).st_ino != os.fstat(self._fd).st_ino
        except FileNotFoundError:
            return
        if replaced:
            fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
            os.close(self._fd)
            self._fd = fd
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class FogStore:
    """One fog's database. Open with ``FogStore.open``; call from one thread at a time."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        fog_id: str,
        fog_key: nacl.signing.SigningKey,
        issuer_key: bytes,
        policy: Policy,
    ) -> None:
        self._conn = conn
        self.fog_id = fog_id
        self._fog_key = fog_key
        self.fog_public_key = public_key(fog_key)
        self._issuer = issuer_key
        self._policy = policy
        self._buckets = Buckets()
        self._counts: Counter[str] = Counter()
        self._reads = Reads(issuer_key)
        first, last, count = conn.execute(
            "SELECT coalesce(min(n), 1), coalesce(max(n), 0), count(*) FROM log"
        ).fetchone()
        self._next_n: int = last + 1
        # consecutive from 1, or from where pruning stopped (prune keeps the newest record)
        assert count == last - first + 1, "log indexes are not consecutive"
        self._trust_rows: int = conn.execute("SELECT count(*) FROM trust").fetchone()[0]
        self._reads.peer_marks = peers.has_marks(conn)
        self._wal_path: str | None = None  # durable_commits=False: the -wal file to sync

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        fog_id: str,
        fog_key: nacl.signing.SigningKey,
        issuer_key: bytes,
        policy: Policy,
        durable_commits: bool = True,
    ) -> "FogStore":
        """Open (creating or migrating the schema) with WAL, synchronous=FULL and
        check_same_thread=False (opened on one thread, used on the worker thread).

        ``durable_commits=False``: once open (the schema steps still commit with FULL), every
        COMMIT is ``synchronous=NORMAL``: written to the WAL, not synced; nothing is durable
        until a ``WalFile.sync()`` (``wal_file()``) started after it returned, and the caller
        must not let anything about a commit leave before then (fog/pipeline.py)."""
        assert is_valid_public_key(issuer_key)
        conn = connect(path)
        try:
            migrate(conn)
            with transaction(conn):  # trust checks it (a lease reported unused is refused)
                conn.execute(LEASE_REPORTS_DDL)
            peers.init(conn)  # the federation's gossip tables (fog/peers.py)
            returns.init(conn)  # leases returned early (fog/returns.py)
            transfers.init(conn)  # peer transfers given and received (fog/transfers.py)
            store = cls(conn, fog_id=fog_id, fog_key=fog_key, issuer_key=issuer_key, policy=policy)
            if not durable_commits:
                store._wal_path = conn.execute("PRAGMA database_list").fetchone()[2] + "-wal"
                conn.execute("PRAGMA synchronous=NORMAL")
            return store
        except BaseException:
            conn.close()
            raise

    @property
    def durable_commits(self) -> bool:
        """True: a COMMIT that returned is on disk; False: only after a ``WalFile.sync()``."""
        return self._wal_path is None

    def wal_file(self) -> "WalFile":
        """A descriptor of its own on the ``-wal`` file (``durable_commits=False``), for one
        syncing thread; close it before the store."""
        assert self._wal_path is not None, "durable_commits=False only"
        # SQLite makes the -wal file at a connection's first read in WAL mode
        self._conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return WalFile(self._wal_path)

    # ---- intents -------------------------------------------------------------------------

    def process(self, arrivals: Sequence[Arrival], *, now_ms: int) -> list[Outcome]:
        """Decode, verify and authorize every arrival in order, in ONE transaction, durable on
        return (``durable_commits=False``: once a ``WalFile.sync()`` started after the return
        completed); one Outcome per arrival, same order. Later arrivals see earlier ones' effects.
        Never raises for bad input (a storage failure rolls the group back and raises)."""
        assert len(arrivals) <= PROCESS_GROUP_MAX
        assert 0 <= now_ms <= INT64_MAX
        if not arrivals:
            return []
        next_n = self._next_n
        try:
            with transaction(self._conn):
                self._reads.begin(self._conn)
                group = Group(self._conn, self._reads, now_ms)
                outcomes = [self._one(arrival, group, now_ms) for arrival in arrivals]
                group.flush()
        except BaseException:
            self._next_n = next_n
            self._reads.forget()
            raise
        self._reads.committed(self._conn)
        for o in outcomes:
            self._count_outcome(o)
        return outcomes

    def _count_outcome(self, o: Outcome) -> None:
        if o.replay:
            self._counts["intents_replayed"] += 1
        elif o.reason is None:
            self._counts["intents_ok"] += 1
        else:
            self._counts["intents_declined"] += 1
            self._counts[f"declined_{o.reason}"] += 1

    def _one(self, arrival: Arrival, group: Group, now_ms: int) -> Outcome:
        assert len(arrival.topic_device) == limits.KEY_BYTES
        # the precedence of spec section 6, rows 1-3, then the retransmission, then 4-15:
        # fog/authorize.py
        signed, declined = screen(arrival.payload, arrival.topic_device, verified=arrival.verified)
        if signed is None:
            assert declined is not None
            return self._unopened(arrival.payload, declined, now_ms)
        if declined is not None:
            return self._declined(signed, declined.reason, None, now_ms)
        intent = signed.msg
        state = group.device(intent.device)
        taken = False
        if intent.seq <= state.seq_last:  # else no record has this q, hence this intent id
            prior = group.prior(intent.device, intent.seq)
            if prior is not None and prior.intent_id == signed.id:
                r = prior
                return self._outcome(
                    signed, r.receipt, None, r.owner_id, r.amount_micros, r.n, replay=True
                )
            taken = prior is not None
        voucher = group.voucher(intent.device)
        owner_id = voucher.owner.owner_id if voucher is not None else None
        leases = group.leases(owner_id, intent.currency) if owner_id is not None else None
        decision = authorize(
            intent,
            _device_view(voucher, state, taken),
            list(leases.views.values()) if leases is not None else [],
            self._buckets.get(intent.device),
            fog_id=self.fog_id,
            policy=self._policy,
            now_ms=now_ms,
        )
        self._buckets.set(intent.device, decision.bucket)
        if decision.reason is not None:
            return self._declined(signed, decision.reason, owner_id, now_ms)
        assert owner_id is not None and leases is not None
        return self._authorized(signed, decision, owner_id, leases, group, now_ms)

    def decline_unrecorded(self, arrivals: Sequence[Arrival], *, now_ms: int) -> list[Outcome]:
        """Answers for a group whose ``process`` raised (a full disk, a read-only or broken
        database): nothing is read or written. Each intent gets what the first checks of
        spec section 6 give (rows 1-3: malformed, bad_signature, topic_mismatch), else
        ``rate_limited``: transient, the device sends the same bytes again later (and then
        gets the stored receipt, if the intent had been authorized before). Never an ok for
        something not recorded."""
        out = []
        for a in arrivals:
            signed, declined = screen(a.payload, a.topic_device)
            if signed is None:
                assert declined is not None
                out.append(self._unopened(a.payload, declined, now_ms))
                continue
            reason = declined.reason if declined is not None else Reason.RATE_LIMITED
            out.append(self._declined(signed, reason, None, now_ms))
        return out

    def _unopened(self, payload: bytes, exc: Declined, now_ms: int) -> Outcome:
        """malformed, or bad_signature (then the body is well-formed: answer with its d, q)."""
        if exc.reason is Reason.BAD_SIGNATURE:
            env = split_envelope(payload, bytes_max=Intent.ENVELOPE_BYTES_MAX)
            intent = decode_body(Intent, env.body)
            intent_id, device, seq = message_id(Intent.TYPE, env.body), intent.device, intent.seq
        else:
            assert exc.reason is Reason.MALFORMED, exc.reason
            intent_id, device, seq = hashlib.sha256(payload).digest(), ZERO_KEY, 0
        receipt = Receipt(
            intent_id=intent_id,
            device=device,
            seq=seq,
            status=STATUS_DECLINED,
            reason=exc.reason,
            time_ms=now_ms,
        )
        raw = seal(receipt, self._fog_key)
        return Outcome(
            receipt=raw,
            status=STATUS_DECLINED,
            reason=exc.reason,
            replay=False,
            intent_id=intent_id,
            device=device,
            seq=seq,
            owner_id=None,
            amount_micros=None,
            log_index=None,
            detail=exc.detail[:DETAIL_CHARS_MAX],
        )

    def _declined(
        self, signed: Signed[Intent], reason: Reason, owner_id: str | None, now_ms: int
    ) -> Outcome:
        intent = signed.msg
        receipt = Receipt(
            intent_id=signed.id,
            device=intent.device,
            seq=intent.seq,
            status=STATUS_DECLINED,
            reason=reason,
            time_ms=now_ms,
        )
        raw = seal(receipt, self._fog_key)
        return self._outcome(signed, raw, reason, owner_id, intent.amount_micros, None)

    def _outcome(
        self,
        signed: Signed[Intent],
        receipt: bytes,
        reason: Reason | None,
        owner_id: str | None,
        amount_micros: int | None,
        log_index: int | None,
        *,
        replay: bool = False,
    ) -> Outcome:
        status = STATUS_OK if reason is None else STATUS_DECLINED
        i = signed.msg
        # a d of mixed order verifies but has no X25519 form: only declines can carry one (a
        # binding refuses such keys, so ok and replays need no check), and they go plain
        sealed = (
            i.seal_receipts is not None
            and reason is not Reason.TOPIC_MISMATCH
            and (reason is None or is_valid_public_key(i.device))
        )
        return Outcome(
            receipt=receipt,
            status=status,
            reason=reason,
            replay=replay,
            intent_id=signed.id,
            device=i.device,
            seq=i.seq,
            owner_id=owner_id,
            amount_micros=amount_micros,
            log_index=log_index,
            currency=i.currency,
            sealed=sealed,
        )

    def _authorized(
        self,
        signed: Signed[Intent],
        decision: Decision,
        owner_id: str,
        leases: LeaseSet,
        group: Group,
        now_ms: int,
    ) -> Outcome:
        """Draw the lease, advance the device, append the log record (in the group, written
        at its end inside its transaction); returns the ok receipt."""
        intent, n, lease_id = signed.msg, self._next_n, decision.lease_id
        assert lease_id is not None
        receipt = Receipt(
            intent_id=signed.id,
            device=intent.device,
            seq=intent.seq,
            status=STATUS_OK,
            log_index=n,
            lease_id=lease_id,
            time_ms=now_ms,
        )
        raw = seal(receipt, self._fog_key)
        a = intent.amount_micros
        row = LogRow(
            n, signed.id, intent.device, to_i64(intent.seq), owner_id, lease_id, a,
            signed.raw, raw, now_ms,
        )  # fmt: skip
        d = decision
        group.append(row, seq=intent.seq, leases=leases, day=d.day, day_micros=d.day_micros)
        self._next_n = n + 1
        return self._outcome(signed, raw, None, owner_id, a, n)

    # ---- trust material ------------------------------------------------------------------

    def put_trust(self, msg_type: str, envelope: bytes, *, now_ms: int) -> TrustOutcome:
        """Verify and store trust material or a lease (``msg_type`` in TRUST_TYPES), durably,
        idempotent by message id. Signers: issuer for owner/fog/lease; any valid key for bind
        and revoke (a binding counts once an owner credential of its owner_id with the
        binding's signer as key is known; a revocation counts when signed by the issuer or by
        the owner key of the device's binding), so material may arrive in any order."""
        out = trustdb.put(
            self._conn,
            msg_type,
            envelope,
            issuer=self._issuer,
            fog_id=self.fog_id,
            now_ms=now_ms,
            full=self._trust_rows >= TRUST_ROWS_MAX,
        )
        if out.status == "accepted":
            self._trust_rows += 1
        self._counts[f"trust_{out.status}"] += 1
        return out

    def trust_envelopes(self) -> list[tuple[str, bytes]]:
        """All stored trust and lease envelopes as (type, bytes), in arrival order."""
        return trustdb.envelopes(self._conn)

    # ---- batches -------------------------------------------------------------------------

    def seal_due(self, *, now_ms: int, records_max: int, age_ms: int) -> list[SealedBatch]:
        """Seal every full batch (``records_max`` records, or fewer if 1 MiB on the wire is
        reached) and a partial one if its oldest record is ``age_ms`` old or more; each batch
        in its own transaction. Returns the batches sealed, in order."""
        changes = self._conn.total_changes
        sealed = batcher.seal_due(
            self._conn,
            fog_id=self.fog_id,
            fog_key=self._fog_key,
            now_ms=now_ms,
            records_max=records_max,
            age_ms=age_ms,
            log_end=self._next_n,
        )
        self._reads.restamp(changes, self._conn.total_changes)  # it wrote batches only
        self._counts["batches_sealed"] += len(sealed)
        self._counts["records_sealed"] += sum(len(b.records) for b in sealed)
        return sealed

    def unacked_batches(self) -> list[SealedBatch]:
        """Every sealed batch not yet acked, in order."""
        return batcher.unacked(self._conn)

    def apply_ack(self, envelope: bytes) -> AckOutcome:
        """An issuer-signed ack: marks batches <= b acked if b is sealed here and h is its
        header id."""
        changes = self._conn.total_changes
        out = batcher.apply_ack(self._conn, envelope, fog_id=self.fog_id, issuer=self._issuer)
        self._reads.restamp(changes, self._conn.total_changes)  # it wrote batches only
        self._counts[f"acks_{out.status}"] += 1
        return out

    # ---- the rest ------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """Counters since open: intents_ok, intents_replayed, intents_declined,
        declined_<reason>, trust_accepted, trust_duplicate, trust_refused, batches_sealed,
        records_sealed, acks_accepted, acks_duplicate, acks_refused."""
        return dict(self._counts)

    @property
    def connection(self) -> sqlite3.Connection:
        """The connection, for fog/replicas.py's tables (the same thread rules)."""
        return self._conn

    def close(self) -> None:
        """Close the connection (every transaction of ours is already committed)."""
        assert not self._conn.in_transaction
        if self._wal_path is not None:  # SQLite's close checkpoints, with its own fsyncs
            self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.close()

    # ---- uplink and lease management (fog/uplink.py, fog/leasing.py) ----------------------
    # Queries and updates of the batch, lease and log tables for the core's uplink, plus
    # the table ``lease_reports`` (created here, IF NOT EXISTS: one row per lease reported to
    # the cloud; ``closed_ms`` is set once the cloud cleared the retained lease topic).

    def uplink_init(self) -> None:
        """Create the lease report table if missing (idempotent; ``open`` does it too, for a
        store opened by an older fogpay before this call existed)."""
        with transaction(self._conn):
            self._conn.execute(LEASE_REPORTS_DDL)

    def unacked_numbers(self, limit: int) -> list[int]:
        """The first ``limit`` sealed batch numbers not acked, ascending."""
        assert 1 <= limit <= UNACKED_LISTED_MAX
        rows = self._conn.execute(
            "SELECT number FROM batches WHERE acked = 0 ORDER BY number LIMIT ?", (limit,)
        ).fetchall()
        return [int(r[0]) for r in rows]

    def batch_wire(self, number: int) -> bytes | None:
        """Batch ``number`` on the wire (header and records rebuilt from the log)."""
        row = self._conn.execute(
            "SELECT header, first_index, count FROM batches WHERE number = ?", (number,)
        ).fetchone()
        if row is None:
            return None
        header, first, count = bytes(row[0]), int(row[1]), int(row[2])
        rows = self._conn.execute(
            "SELECT intent, receipt FROM log WHERE n >= ? AND n < ? ORDER BY n",
            (first, first + count),
        ).fetchall()
        assert len(rows) == count, "a sealed batch lost records"
        return encode_batch(header, [encode_record(bytes(i), bytes(r)) for i, r in rows])

    def lease_room(self, owner_ids: Sequence[str], *, now_ms: int) -> dict[tuple[str, str], int]:
        """Room (amount - drawn) of the live, unreported leases of each owner, summed per
        (owner_id, currency); a pair absent from the result has no live lease."""
        room: dict[tuple[str, str], int] = {}
        for owner_id in sorted(set(owner_ids))[:LEASE_OWNERS_QUERIED_MAX]:
            rows = self._conn.execute(
                "SELECT currency, amount_micros - drawn_micros FROM leases "
                "WHERE owner_id = ? AND not_after_ms >= ? AND lease_id NOT IN "
                "(SELECT lease_id FROM lease_reports)",
                (owner_id, now_ms),
            ).fetchall()
            for currency, left in rows:
                key = (owner_id, str(currency))
                room[key] = room.get(key, 0) + int(left)
        return room

    def prune(self, *, now_ms: int, keep_ms: int, rows_max: int = PRUNE_ROWS_MAX) -> int:
        """Delete the oldest log records nothing needs any more, at most ``rows_max``, in one
        transaction; returns how many. A record goes only if its batch is acked by the cloud,
        it is older than ``keep_ms`` (a device's retransmission within that time still gets
        its stored receipt; after it, the sequence check declines it), and its lease is
        closed (reported and cleared: the lease's draws are summed from the log until then).
        Only a prefix of the log goes, and never the newest record (it numbers the next), so
        the log stays consecutive. Batch headers stay (small; the chain continues from them)."""
        first, last = self._conn.execute("SELECT min(n), max(n) FROM log").fetchone()
        if first is None:
            return 0
        window_end = min(first + rows_max, last)  # the newest record always stays
        stops = [window_end]
        for sql, params in (
            ("SELECT min(first_index) FROM batches WHERE acked = 0", ()),
            ("SELECT coalesce(max(first_index + count), 1) FROM batches", ()),  # unsealed
            (
                "SELECT min(n) FROM log WHERE n >= ? AND n < ? AND (at_ms > ? OR lease_id NOT "
                "IN (SELECT lease_id FROM lease_reports WHERE closed_ms IS NOT NULL))",
                (first, window_end, now_ms - keep_ms),
            ),
        ):
            row = self._conn.execute(sql, params).fetchone()
            if row[0] is not None:
                stops.append(int(row[0]))
        stop = min(stops)
        if stop <= first:
            return 0
        with transaction(self._conn):
            deleted = self._conn.execute("DELETE FROM log WHERE n < ?", (stop,)).rowcount
        self._counts["records_pruned"] += deleted
        return int(deleted)

    def lease_reports_due(self, *, now_ms: int) -> list[LeaseDraws]:
        """Expired leases not reported yet whose every draw is in a sealed batch: what the
        fog drew on each (``u``) and the last batch holding a draw (``b``, 0 for none)."""
        rows = self._conn.execute(
            "SELECT lease_id, drawn_micros FROM leases WHERE not_after_ms < ? AND lease_id "
            "NOT IN (SELECT lease_id FROM lease_reports) ORDER BY not_after_ms LIMIT ?",
            (now_ms, LEASE_REPORTS_LISTED_MAX),
        ).fetchall()
        due = []
        for lease_id, drawn in rows:
            last = self._last_batch_of(bytes(lease_id), int(drawn))
            if last is not None:
                due.append(LeaseDraws(bytes(lease_id), int(drawn), last))
        return due

    def _last_batch_of(self, lease_id: bytes, drawn: int) -> int | None:
        """The last batch holding a draw on ``lease_id``; 0 if none; None if a draw is not
        sealed yet."""
        n_max, total = self._conn.execute(
            "SELECT max(n), coalesce(sum(amount_micros), 0) FROM log WHERE lease_id = ?",
            (lease_id,),
        ).fetchone()
        given = transfers.given_on(self._conn, lease_id)  # carved out by peer transfers
        assert total + given == drawn, "lease drawn total differs from the log and transfers"
        if n_max is None:
            return 0
        row = self._conn.execute(
            "SELECT number FROM batches WHERE first_index <= ? AND first_index + count > ?",
            (n_max, n_max),
        ).fetchone()
        return None if row is None else int(row[0])

    def record_lease_report(self, draws: LeaseDraws, envelope: bytes, *, now_ms: int) -> None:
        """Keep the signed report (resent until the cloud clears the lease) and make sure
        nothing is drawn on the lease again, whatever the clock does: it is promised."""
        with transaction(self._conn):
            self._conn.execute(
                "INSERT INTO lease_reports (lease_id, drawn_micros, batch, envelope, "
                "reported_ms) VALUES (?, ?, ?, ?, ?) ON CONFLICT (lease_id) DO NOTHING",
                (draws.lease_id, draws.drawn_micros, draws.last_batch, envelope, now_ms),
            )
            self._conn.execute(
                "UPDATE leases SET not_after_ms = ? WHERE lease_id = ?",
                (LEASE_REPORTED_NOT_AFTER_MS, draws.lease_id),
            )

    def record_unused_lease_report(self, lease_id: bytes, envelope: bytes, *, now_ms: int) -> bool:
        """A lease of ours that arrived already expired was never stored, so nothing was
        drawn on it: keep its report (``u`` = 0, ``b`` = 0), resent until the cloud clears
        the lease. False if the lease is stored or reported already (nothing to do)."""
        with transaction(self._conn):
            known = self._conn.execute(
                "SELECT 1 FROM leases WHERE lease_id = ? UNION ALL "
                "SELECT 1 FROM lease_reports WHERE lease_id = ?",
                (lease_id, lease_id),
            ).fetchone()
            if known is not None:
                return False
            self._conn.execute(
                "INSERT INTO lease_reports (lease_id, drawn_micros, batch, envelope, "
                "reported_ms) VALUES (?, 0, 0, ?, ?)",
                (lease_id, envelope, now_ms),
            )
        return True

    def lease_reports_open(self) -> list[tuple[bytes, bytes]]:
        """(lease_id, report envelope) of every report the cloud has not cleared yet."""
        rows = self._conn.execute(
            "SELECT lease_id, envelope FROM lease_reports WHERE closed_ms IS NULL "
            "ORDER BY reported_ms LIMIT ?",
            (LEASE_REPORTS_LISTED_MAX,),
        ).fetchall()
        return [(bytes(lid), bytes(env)) for lid, env in rows]

    def close_lease(self, lease_id: bytes, *, now_ms: int) -> bool:
        """The cloud cleared the lease's topic: True if it closes a report of ours now."""
        with transaction(self._conn):
            changed = self._conn.execute(
                "UPDATE lease_reports SET closed_ms = ? WHERE lease_id = ? AND closed_ms IS NULL",
                (now_ms, lease_id),
            ).rowcount
        return changed == 1

    def closed_lease_ids(self) -> set[bytes]:
        """Leases the cloud has closed (not to be republished)."""
        rows = self._conn.execute(
            "SELECT lease_id FROM lease_reports WHERE closed_ms IS NOT NULL"
        ).fetchall()
        return {bytes(r[0]) for r in rows}

    # ---- early return of leases (fog/returns.py, docs/protocol.md 18.1) ------------------

    def retire_leases(
        self, *, now_ms: int, reason: str, owner_ids: list[str] | None = None
    ) -> list[returns.Returned]:
        """Retire the live, unreported leases of ``owner_ids`` (None: all) for good, in one
        transaction; the lease round then reports them (``lease_reports_due``)."""
        out = returns.retire(self._conn, now_ms=now_ms, reason=reason, owner_ids=owner_ids)
        self._counts["leases_returned"] += len(out)
        self._counts["lease_returned_micros"] += sum(r.room_micros for r in out)
        return out

    def give_transfer(
        self, envelope: bytes, *, peers: tuple[str, ...], now_ms: int
    ) -> transfers.Given:
        """A peer's ``xreq``: the parent debited and the ``xfer`` stored in one transaction
        (docs/protocol.md 18.2), or the stored one again."""
        out = transfers.give(
            self._conn,
            envelope,
            own_fog_id=self.fog_id,
            peers=peers,
            issuer=self._issuer,
            key=self._fog_key,
            now_ms=now_ms,
        )
        self._counts[f"transfer_requests_{out.status}"] += 1
        if out.status == "given":
            self._counts["transfer_given_micros"] += out.amount_micros
        return out

    def receive_transfer(self, envelope: bytes, *, now_ms: int) -> transfers.Received:
        """A peer's ``xfer``: stored as a sub-lease once per transfer id (18.2)."""
        out = transfers.receive(
            self._conn, envelope, own_fog_id=self.fog_id, issuer=self._issuer, now_ms=now_ms
        )
        self._counts[f"transfers_{out.status}"] += 1
        if out.status == "accepted":
            self._counts["transfer_received_micros"] += out.amount_micros
        return out

    def transfers_received_open(self) -> list[bytes]:
        """The ``xfer``s of received sub-leases not closed yet (18.2)."""
        return transfers.received_open(self._conn)

    def transfers_of(self, lease_id: bytes) -> list[bytes]:
        """The ``xfer``s carved from ``lease_id`` (sent up before and with its report)."""
        return transfers.outgoing(self._conn, lease_id)

    def live_lease_owners(self, *, now_ms: int) -> list[str]:
        """Owners with a live lease not reported nor retired."""
        return returns.live_owners(self._conn, now_ms=now_ms)

    # ---- federation: sequence gossip, clones, the uplink's backlog (fog/peers.py) ---------

    def apply_seen(self, envelope: bytes, *, now_ms: int) -> peers.SeenOutcome:
        """A peer's ``seen``: verified, its entries noted durably (docs/protocol.md 17.4).
        What groups cache stays valid but for the devices it names (their marks may have
        moved): those are forgotten, the rest kept (``Reads.restamp``): a peer's seen twice
        a second must not empty the cache of every device."""
        changes = self._conn.total_changes
        out = peers.apply_seen(
            self._conn, envelope, own_fog_id=self.fog_id, issuer=self._issuer, now_ms=now_ms
        )
        if out.status == "accepted":
            self._reads.peer_marks = True  # from now on groups read the marks
            for device in out.devices:
                self._reads.devices.pop(device, None)
            self._reads.restamp(changes, self._conn.total_changes)
        self._counts[f"seen_{out.status}"] += 1
        self._counts["seen_entries"] += out.entries
        self._counts["devices_suspended"] += len(out.clones)
        self._counts["seen_collisions"] += out.collisions
        return out

    def note_peer_marks(
        self, fog_id: str, entries: Sequence[SeenEntry], *, now_ms: int
    ) -> tuple[int, tuple[peers.Clone, ...], int]:
        """What peer ``fog_id`` authorized, learnt otherwise than by its ``seen`` (the
        records of its batches this fog holds as a replica): the same marks and checks. In
        the caller's transaction when one is open (``fog.replicas``: the replica and the
        marks it brings commit together), else in its own."""
        if self._conn.in_transaction:
            out = peers.note_marks(self._conn, fog_id, list(entries), self.fog_id, now_ms)
        else:
            with transaction(self._conn):
                out = peers.note_marks(self._conn, fog_id, list(entries), self.fog_id, now_ms)
        self._reads.peer_marks = True
        self._counts["devices_suspended"] += len(out[1])
        self._counts["seen_collisions"] += out[2]
        return out

    def suspended_devices(self) -> list[tuple[bytes, int, str]]:
        """(device, q, evidence) of the devices suspended here as clones."""
        return peers.suspended(self._conn)

    def seen_cursor(self) -> int:
        return peers.cursor(self._conn)

    def set_seen_cursor(self, n: int) -> None:
        changes = self._conn.total_changes
        peers.set_cursor(self._conn, n)
        self._reads.restamp(changes, self._conn.total_changes)  # not a table groups read

    def authorized_after(self, after_n: int) -> list[tuple[int, SeenEntry]]:
        """The log's records after ``after_n``, in order, for the next ``seen``s."""
        return peers.authorized_after(self._conn, after_n)

    def prune_peer_seen(self, *, now_ms: int) -> int:
        changes = self._conn.total_changes
        deleted = peers.prune_seen(self._conn, now_ms=now_ms)
        self._reads.restamp(changes, self._conn.total_changes)  # not a table groups read
        return deleted

    def unacked_records(self) -> int:
        """Log records the cloud has not acked: from the first unacked batch's first record
        (or the end of the last sealed batch) to the newest record."""
        row = self._conn.execute(
            "SELECT first_index FROM batches WHERE acked = 0 ORDER BY number LIMIT 1"
        ).fetchone()
        if row is None:
            row = self._conn.execute(
                "SELECT coalesce(max(first_index + count), 1) FROM batches"
            ).fetchone()
        return max(0, self._next_n - int(row[0]))

    def lease_expiring(
        self, owner_ids: Sequence[str], *, now_ms: int, within_ms: int
    ) -> set[tuple[str, str]]:
        """(owner_id, currency) pairs whose live, unreported leases with room all expire
        within ``within_ms`` of ``now_ms`` (the latest ``na`` is that close), unless that
        latest lease lived ``within_ms`` or less when it arrived: a lease that short is
        short by design (its whole life is inside the window), and renewing it ahead would
        ask for a lease at every draw."""
        out: set[tuple[str, str]] = set()
        for owner_id in sorted(set(owner_ids))[:LEASE_OWNERS_QUERIED_MAX]:
            rows = self._conn.execute(
                "SELECT l.currency, l.not_after_ms, t.received_ms FROM leases l "
                "JOIN trust t ON t.id = l.id WHERE l.owner_id = ? AND l.not_after_ms >= ? "
                "AND l.drawn_micros < l.amount_micros AND l.lease_id NOT IN "
                "(SELECT lease_id FROM lease_reports)",
                (owner_id, now_ms),
            ).fetchall()
            latest: dict[str, tuple[int, int]] = {}
            for currency, na, received in rows:
                if str(currency) not in latest or int(na) > latest[str(currency)][0]:
                    latest[str(currency)] = (int(na), int(received))
            out.update(
                (owner_id, c)
                for c, (na, received) in latest.items()
                if na - now_ms <= within_ms and na - received > within_ms
            )
        return out


def _device_view(voucher: Voucher | None, state: DeviceState, taken: bool) -> DeviceView:
    """What authorize needs about the device: ``taken`` is an authorized record with the
    intent's q (another intent id: retransmissions were answered before)."""
    if voucher is None:
        return DeviceView(binding=None, owner=None)
    return DeviceView(
        binding=voucher.binding,
        owner=voucher.owner,
        device_revoked=voucher.device_revoked,
        owner_revoked=voucher.owner_revoked,
        seq_last=state.seq_last,
        seq_taken=taken,
        peer_seq_last=state.peer_seq,
        suspended=state.suspended,
        day=state.day,
        day_micros=state.day_micros,
    )
