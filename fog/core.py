"""FogCore: every decision of a fog, as a sans-IO object (no asyncio, no sockets, no clock).

Why. A fog decides on payments, loads trust material, seals batches, plans which batches go up
to the cloud, asks for budget and reports spent leases. All of that is here, in one object fed
one input at a time; what the fog must *do* about it (publish a receipt, send a batch, ask for
a lease) comes back as outputs. The daemon (``fog/daemon.py``) is a shell: it turns MQTT
messages and timers into inputs and outputs into MQTT publishes and log lines. A simulator
drives the same object with a virtual clock and a faulty network (h11's design: the protocol
state machine holds no I/O, so every path can be driven by a test).

State. Everything durable is in SQLite through ``FogStore`` (synchronous ``sqlite3``, one
transaction per group of intents, durable when ``handle`` returns): the core's one storage
interface. In memory the core keeps only what may be lost on a crash because it is rebuilt or
resent anyway: the uplink window (everything unacked is sent again after a restart), pending
lease requests (re-asked on the next decline), the notes of owners that drew, the rate buckets
(in the store), the wire form of batches just sealed (re-read from the log if missing).

Time. Every input carries ``now_ms``: the fog's wall clock, used for everything that is
stored or signed (receipt ``t``, lease expiry, batch age). Resend timers (uplink go-back-N,
lease request and report resends, pruning, the lease round's gap) use ``mono_ms`` when the
input carries it (the daemon passes ``time.monotonic``: a wall clock stepping back must not
stall a resend), else ``now_ms``. Nothing here reads a clock, draws a random number or makes
an id of its own: ids are message ids (hashes of signed bytes).

API (stable: fields are added, never renamed).

Inputs (``FogInput``), each a frozen dataclass:

- ``Intents(arrivals, now_ms)``: a group of intents as read from MQTT (``store.Arrival``: the
  device key of the topic and the raw payload). One transaction; outputs one ``Receipt`` per
  arrival, same order, all durable. Raises only for a storage failure (nothing committed).
- ``TrustMessage(topic, payload, now_ms)``: anything else on the fog's subscriptions: trust
  material (owner, fog, bind, revoke), a lease, an empty retained lease payload (the cloud
  closed the lease), an ack, a peer's ``seen`` or revocation (``gossip/{me}/seen|revoke``).
  Outputs a ``TrustLoaded`` (or ``LeaseClosed``), and for an ack that moved the uplink window,
  the next ``BatchSend``s; a revocation newly accepted goes on to every peer (``Publish``); a
  ``seen`` that reveals a cloned key gives ``Alarm("cloned_key")``.
- ``Tick(now_ms)``: time passed: seal what is due, prune, plan the uplink, run a lease round
  (requests, reports, resends) when one is due, check the uplink's backlog, and with
  ``federation.peers`` send each peer a ``seen`` of what was authorized since the last one
  (docs/protocol.md 17.4). Ends with a ``Wake``.
- ``Connected(now_ms)`` / ``Disconnected(now_ms)``: the MQTT link came up (everything unacked
  and every open report goes again) or went down (nothing goes up until it is back). A core
  starts disconnected.
- ``Republish(now_ms)``: the stored trust envelopes as retained ``Publish``es (an embedded
  broker keeps nothing across restarts).
- ``Stats(now_ms)`` and ``Close(now_ms)``: the counters (``Counters``); ``Close`` also closes
  the store, after which the core takes no input.
- ``ReturnLeases(now_ms, owner_id, cause)``: give leases back before their ``na``
  (docs/protocol.md 18.1): retired for good at once (``LeaseReturned`` each), reported when
  their draws are sealed (a ``shutdown`` seals them at once). Idle owners' leases are returned
  by the lease round itself (``lease.return_idle_ms``).

Outputs (``FogOutput``):

- ``Receipt(topic, outcome)`` (``.payload`` the receipt envelope): publish QoS 1. The outcome
  (``store.Outcome``) carries what a log line needs (status, reason, owner, currency, amount,
  log index).
- ``BatchSend(number, topic, payload)``, ``LeaseRequest(topic, payload, owner_id, currency,
  resend)``, ``LeaseReport(topic, payload, lease_id, drawn_micros, batch, resend)``,
  ``Publish(topic, payload, retain)``: messages to publish (QoS 1). A lost one is sent again
  by the core's own timers: the shell never retries.
- ``LeaseReturned(lease_id, owner_id, currency, amount_micros, drawn_micros, cause)``: a
  lease retired early (18.1), for the log and counters.
- ``Sealed(number, first_index, records)``, ``TrustLoaded(...)``, ``LeaseClosed(lease_id)``,
  ``Pruned(records)``, ``Alarm(event, error)``: what happened, for the log and counters.
  ``Publish`` also carries the federation's gossip to peers (``gossip/{peer}/seen`` and
  ``revoke``), from ``Tick`` and ``TrustMessage``.
- ``Wake(mono_ms)``: the core wants a ``Tick`` no later than this (the shell keeps the
  earliest since its last Tick).
- ``Counters(items)``: answers ``Stats`` and ``Close``.
"""

import sqlite3
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import nacl.signing

from fog import returns
from fog.authorize import Policy
from fog.config import BatchConfig, FederationConfig, LeaseConfig, UplinkConfig
from fog.leasing import LeaseReports, LeaseRequests, Pair, report_envelope
from fog.peers import PEER_SEEN_PRUNE_ROWS, SEEN_ROUND_ENTRIES_MAX
from fog.replicas import Gossip, ReplicaEvent, Replication
from fog.store import PRUNE_ROWS_MAX, Arrival, FogStore, Outcome
from fog.transfers import TransferAsks
from fog.trust import TRUST_PAYLOAD_BYTES_MAX, classify, republish_topic
from fog.uplink import Window
from protocol import topics
from protocol.errors import Declined, TopicError
from protocol.gossip import SEEN_ENTRIES_MAX, SEEN_ENVELOPE_BYTES_MAX, Seen, SeenEntry
from protocol.leasing import LeaseRecall, lease_report_topic
from protocol.messages import Lease
from protocol.reasons import Reason
from protocol.sealed import seal_receipt
from protocol.signing import open_envelope, seal, split_envelope
from protocol.topics import Kind
from protocol.transfer import Transfer, transfer_topic, transfer_up_topic

SEAL_INTERVAL_MS_MIN: Final = 10
SEAL_INTERVAL_MS_MAX: Final = 1_000
UPLINK_TICK_MS_MAX: Final = 1_000
PRUNE_IDLE_MS: Final = 10_000  # between pruning steps that found less than a full step to do
NOTES_MAX: Final = 10_000  # owners and declines noted between two lease rounds
# A round (two store reads) after every group that drew would cost ~0.5 ms per group at low
# load: rounds wanted because owners drew run at most this often; a decline for want of
# budget does not wait.
ROUND_GAP_MS: Final = 250
FRESH_MAX: Final = 64  # wires of batches just sealed, kept for their first send
IDLE_CHECK_MS_MAX: Final = (
    60_000  # idle owners (lease.return_idle_ms) looked for at least this often
)
ACTIVE_OWNERS_MAX: Final = 100_000  # owners whose last activity is remembered (18.1)
BACKLOG_CHECK_MS: Final = 1_000  # how often unacked records are counted (uplink_backlog)
PEER_PRUNE_MS: Final = 10_000  # old peer reports pruned this often (at once while a step is full)


# ---- inputs --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Intents:
    arrivals: tuple[Arrival, ...]
    now_ms: int
    mono_ms: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TrustMessage:
    topic: str
    payload: bytes
    now_ms: int
    mono_ms: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Tick:
    now_ms: int
    mono_ms: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Connected:
    now_ms: int
    mono_ms: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Disconnected:
    now_ms: int
    mono_ms: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Republish:
    now_ms: int
    mono_ms: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Stats:
    now_ms: int
    mono_ms: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Close:
    now_ms: int
    mono_ms: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ReturnLeases:
    """Give back early (docs/protocol.md 18.1) the live leases of ``owner_id`` (None: of every
    owner): ``cause`` is ``shutdown`` (a graceful stop with ``lease.return_on_stop``; the
    draws are sealed at once so the reports can leave before the fog does), ``operator`` or
    ``idle``. The operator's command does the same through the database (fog/returns.py)."""

    now_ms: int
    mono_ms: int | None = None
    owner_id: str | None = None
    cause: str = "operator"


FogInput = (
    Intents
    | TrustMessage
    | Tick
    | Connected
    | Disconnected
    | Republish
    | Stats
    | Close
    | ReturnLeases
)


# ---- outputs -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Receipt:
    topic: str
    outcome: Outcome

    @property
    def payload(self) -> bytes:
        """What to publish: the receipt envelope, or for an intent that asked for it the
        envelope sealed to the device's key (docs/protocol.md section 16). Sealing draws an
        ephemeral key (libsodium's randomness) here, at the output, not in the core's
        decisions: every read seals afresh, and each opens to the same envelope."""
        o = self.outcome
        return seal_receipt(o.receipt, o.device) if o.sealed else o.receipt


@dataclass(frozen=True, slots=True, kw_only=True)
class Publish:
    topic: str
    payload: bytes
    retain: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchSend:
    number: int
    topic: str
    payload: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseRequest:
    topic: str
    payload: bytes
    owner_id: str
    currency: str
    resend: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseReport:
    """A lease report to publish. First send (``resend`` False): ``drawn_micros`` and
    ``batch`` are what it reports; a resend carries the same bytes, and -1 for both (the
    resend schedule keeps only the bytes)."""

    topic: str
    payload: bytes
    lease_id: bytes
    drawn_micros: int
    batch: int
    resend: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseReturned:
    """A lease retired early (18.1): never drawn on again; its report follows once its draws
    are sealed. ``amount_micros - drawn_micros`` returns to the owner when the cloud closes it."""

    lease_id: bytes
    owner_id: str
    currency: str
    amount_micros: int
    drawn_micros: int
    cause: str  # idle, shutdown, operator


@dataclass(frozen=True, slots=True, kw_only=True)
class Sealed:
    number: int
    first_index: int
    records: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TrustLoaded:
    """The store's verdict on a trust message: ``msg_type`` owner/fog/bind/revoke/lease/ack,
    ``status`` accepted/duplicate/refused; ``batch``: the batch an ack named."""

    msg_type: str
    status: str
    reason: Reason | None = None
    detail: str = ""
    batch: int | None = None
    answered_request: bool = False  # a lease that answers a pending lease request of ours


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseClosed:
    lease_id: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Pruned:
    records: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Alarm:
    """A part failed (a storage error, a bug caught at the seam); it retries at the next
    Tick. ``event``: seal_failed, prune_failed, uplink_failed, lease_upkeep_failed,
    trust_failed, gossip_failed. Or something someone must look at: cloned_key (a device
    key signed two intents with one q; the device is suspended here), uplink_backlog (more
    unacked records than ``uplink.backlog_alarm_records``) and uplink_backlog_cleared."""

    event: str
    error: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Wake:
    mono_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Counters:
    items: tuple[tuple[str, int], ...]

    def as_dict(self) -> dict[str, int]:
        return dict(self.items)


FogOutput = (
    Receipt
    | Publish
    | BatchSend
    | LeaseRequest
    | LeaseReport
    | Sealed
    | TrustLoaded
    | LeaseClosed
    | Pruned
    | Alarm
    | Wake
    | Counters
    | LeaseReturned
    | ReplicaEvent
)


@dataclass(frozen=True, slots=True, kw_only=True)
class CoreConfig:
    """What a core is opened with besides its key (all from ``FogConfig``)."""

    fog_id: str
    issuer_key: bytes
    policy: Policy = field(default_factory=Policy)
    batch: BatchConfig = field(default_factory=BatchConfig)
    uplink: UplinkConfig = field(default_factory=UplinkConfig)
    lease: LeaseConfig = field(default_factory=LeaseConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)


def _mono(event: FogInput) -> int:
    return event.now_ms if event.mono_ms is None else event.mono_ms


def _lease_topic_type(payload: bytes) -> str | None:
    """The type of an envelope on this fog's own lease topic: a lease (``lease``), the cloud's
    retained copy of a sub-lease (``xfer``, 18.2) or the cloud's ask for a lease back
    (``rbal``, 18.5); None if it is no envelope (the lease path refuses it)."""
    try:
        return split_envelope(payload, bytes_max=Lease.ENVELOPE_BYTES_MAX).type
    except Exception:
        return None


class FogCore:
    """One fog's decisions over its ``FogStore``; ``handle`` one input at a time."""

    def __init__(
        self, store: FogStore, *, config: CoreConfig, fog_key: nacl.signing.SigningKey
    ) -> None:
        self._store = store
        self.config = config
        self.fog_id = config.fog_id
        self._key = fog_key
        store.uplink_init()
        up, lease, batch = config.uplink, config.lease, config.batch
        self._uplink = up.enabled
        self._window = Window(window=up.window, ack_timeout_ms=up.ack_timeout_ms)
        self._requests = LeaseRequests(
            fog_id=self.fog_id,
            key=fog_key,
            below_micros=lease.request_below_micros,
            request_micros=lease.request_micros,
            timeout_ms=lease.request_timeout_ms,
            attempts_max=lease.request_attempts_max,
        )
        self._reports = LeaseReports(fog_id=self.fog_id, retry_ms=lease.report_retry_ms)
        for lease_id, wire in store.lease_reports_open():
            self._reports.track(lease_id, wire, now_ms=0)
        self._seal_every_ms = min(
            SEAL_INTERVAL_MS_MAX, max(SEAL_INTERVAL_MS_MIN, batch.age_ms // 4)
        )
        self._uplink_every_ms = max(1, min(UPLINK_TICK_MS_MAX, up.ack_timeout_ms // 4))
        self._fresh: dict[int, bytes] = {}  # batch number -> wire, for its first send
        self._touched: set[str] = set()  # owners that drew since the last lease round
        self._declines: dict[Pair, tuple[bytes, int]] = {}  # -> (device, amount)
        self._online = False
        self._closed = False
        self._seal_at = 0
        self._uplink_at = 0
        self._lease_at = 0
        self._gap_until = 0  # no round for drawing owners before this
        self._prune_at = 0
        self._wake_sent: int | None = None  # the earliest Wake given since the last Tick
        # federation gossip (docs/protocol.md 17.4, 17.5)
        self._peers = config.federation.peers
        self._seen_at = 0
        # the last log index of the seen round handed out: made the durable cursor at the
        # next round (the shell has published it by then), forgotten on Disconnected (a crash
        # or a lost link sends that round again: never skipped)
        self._seen_sent: int | None = None
        self._peer_prune_at = 0
        self._backlog_at = 0
        self._backlog_high = False  # uplink_backlog raised and not cleared
        # early return of idle owners' leases (docs/protocol.md 18.1): the last activity of
        # each owner (a draw, a decline for want of budget, a lease arriving), monotonic; an
        # owner not in it counts as active since ``_idle_origin`` (the first lease round)
        self._active: dict[str, int] = {}
        self._idle_origin: int | None = None
        self._idle_at = 0
        self._pending_publish: list[FogOutput] = []  # xreqs made while asking for leases
        # peer transfers (docs/protocol.md 18.2): this fog's outstanding xreqs, in memory
        self._asks = TransferAsks(fog_id=self.fog_id, key=fog_key, peers=self._peers)
        self._transfers = lease.peer_transfers and bool(self._peers)
        # replication to peer fogs and holding theirs (fog/replicas.py): only with peers
        fed = config.federation
        self._replication: Replication | None = None
        if fed.peers:
            self._replication = Replication(
                store.connection, config.fog_id, fog_key, config.issuer_key, fed,
                up.ack_timeout_ms, up.window, self._replica_marks,
            )  # fmt: skip
        self._replica_clones: list[str] = []  # clones a stored replica revealed (an alarm)
        self._replicate_at = 0
        self._relay_at = 0

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        config: CoreConfig,
        fog_key: nacl.signing.SigningKey,
        durable_commits: bool = True,
    ) -> "FogCore":
        """Open (creating or migrating) the store at ``path`` and the core over it.
        ``durable_commits=False``: outputs are about commits not yet on disk; the caller
        releases them only after ``store.sync_wal()`` (fog/pipeline.py does)."""
        store = FogStore.open(
            path,
            fog_id=config.fog_id,
            fog_key=fog_key,
            issuer_key=config.issuer_key,
            policy=config.policy,
            durable_commits=durable_commits,
        )
        try:
            return cls(store, config=config, fog_key=fog_key)
        except BaseException:
            store.close()
            raise

    @property
    def store(self) -> FogStore:
        """The store (tests and the simulator read it; inputs are the way to change it)."""
        return self._store

    def handle(self, event: FogInput) -> list[FogOutput]:
        """Apply one input; the outputs, in the order the shell should act on them."""
        assert not self._closed, "a closed FogCore takes no input"
        match event:
            case Intents():
                return self._intents(event)
            case TrustMessage():
                return self._trust(event)
            case Tick():
                return self._tick(event)
            case Connected():
                return self._connected(event)
            case Disconnected():
                self._online = False
                self._seen_sent = None  # that round may not have left: send it again
                return []
            case Republish():
                return self._republish()
            case Stats():
                return [self._counters()]
            case ReturnLeases():
                return self._return_leases(event)
            case Close():
                counters = self._counters()
                self._closed = True
                self._store.close()
                return [counters]
        raise AssertionError(f"not a FogInput: {type(event).__name__}")

    # ---- intents -------------------------------------------------------------------------

    def _intents(self, event: Intents) -> list[FogOutput]:
        try:
            outcomes = self._store.process(event.arrivals, now_ms=event.now_ms)
        except sqlite3.Error as exc:  # a full, read-only or failed disk: nothing was recorded
            return self.unrecorded(event, "group_failed", exc)
        out: list[FogOutput] = [
            Receipt(topic=topics.receipt_topic(self.fog_id, a.topic_device), outcome=o)
            for a, o in zip(event.arrivals, outcomes, strict=True)
        ]
        if self._uplink:
            wake = self._note(outcomes, _mono(event))
            if wake is not None:
                out.extend(self._wake(wake))
        return out

    def unrecorded(self, event: Intents, alarm: str, exc: BaseException) -> list[FogOutput]:
        """The answers to a group that may not be on disk (its transaction failed, or the
        durability barrier after it did: fog/pipeline.py): a signed, transient decline each
        (never an ok for what is not on disk; nothing is read or written), and ``Alarm``."""
        outcomes = self._store.decline_unrecorded(event.arrivals, now_ms=event.now_ms)
        out: list[FogOutput] = [
            Receipt(topic=topics.receipt_topic(self.fog_id, a.topic_device), outcome=o)
            for a, o in zip(event.arrivals, outcomes, strict=True)
        ]
        out.append(Alarm(event=alarm, error=f"{type(exc).__name__}: {exc}"[:200]))
        return out

    def _note(self, outcomes: Sequence[Outcome], mono: int) -> int | None:
        """Remember owners that drew and declines for want of budget (bounded); when the
        next lease round is wanted, or None."""
        urgent = touched = False
        for o in outcomes:
            if o.owner_id is None or len(self._declines) + len(self._touched) >= NOTES_MAX:
                continue
            if o.status == "ok" and not o.replay:
                self._touched.add(o.owner_id)
                self._mark_active(o.owner_id, mono)
                touched = True
            elif o.reason is Reason.INSUFFICIENT_BUDGET and o.currency is not None:
                self._mark_active(o.owner_id, mono)
                assert o.amount_micros is not None
                self._declines.setdefault((o.owner_id, o.currency), (o.device, o.amount_micros))
                urgent = True
        if urgent:
            return mono
        if touched:
            return max(mono, self._gap_until)
        return None

    # ---- trust material, leases, acks ------------------------------------------------------

    def _trust(self, event: TrustMessage) -> list[FogOutput]:
        try:
            parsed = topics.parse(event.topic)
        except TopicError:
            return [TrustLoaded(msg_type="", status="refused", detail="bad topic")]
        payload, now = event.payload, event.now_ms
        if not payload and parsed.kind is Kind.LEASE and parsed.fog_id == self.fog_id:
            assert parsed.lease_id is not None
            return self._lease_cleared(parsed.lease_id, now)
        if parsed.kind is Kind.GOSSIP_SEEN:
            return self._seen(parsed, payload, now) if parsed.fog_id == self.fog_id else []
        own_lease = parsed.kind is Kind.LEASE and parsed.fog_id == self.fog_id
        typ = _lease_topic_type(payload) if own_lease else None
        if typ == LeaseRecall.TYPE:
            assert parsed.lease_id is not None
            return self._recall(payload, parsed.lease_id, now, _mono(event))
        if parsed.kind in (Kind.GOSSIP_XREQ, Kind.GOSSIP_XFER) or typ == Transfer.TYPE:
            if parsed.fog_id != self.fog_id or not self._transfers:
                return []
            if parsed.kind is Kind.GOSSIP_XREQ:
                return self._xreq(payload, now)
            return self._xfer(payload, now, _mono(event), from_cloud=parsed.kind is Kind.LEASE)
        if self._replication is not None:
            routed = self._replicated(parsed, payload, now)
            if routed is not None:
                return routed
        arrival = classify(parsed, payload, fog_id=self.fog_id)
        if arrival is None:
            return []
        if len(payload) > TRUST_PAYLOAD_BYTES_MAX:
            return [TrustLoaded(msg_type=arrival.msg_type, status="dropped", detail="too large")]
        try:
            if arrival.msg_type == "ack":
                return self._ack(payload, _mono(event))
            result = self._store.put_trust(arrival.msg_type, payload, now_ms=now)
        except Exception as exc:  # the seam: bad material is the store's to refuse
            return [Alarm(event="trust_failed", error=type(exc).__name__)]
        pair = result.lease_pair
        answered = pair is not None and self._requests.answered(pair)
        if pair is not None:  # a lease arrived: its owner is not idle (18.1)
            self._mark_active(pair[0], _mono(event))
        reports = self._report_unused(result.expired_lease, now, _mono(event))
        loaded = TrustLoaded(
            msg_type=arrival.msg_type,
            status=result.status,
            reason=result.reason,
            detail=result.detail,
            answered_request=answered,
        )
        forwards: list[FogOutput] = []
        if arrival.msg_type == "revoke" and result.status == "accepted":
            forwards = self._gossip_all("revoke", payload)  # 17.5: new here, so on to peers
        return [loaded, *reports, *forwards]

    # ---- federation gossip (docs/protocol.md 17.4, 17.5; SQL in fog/peers.py) -------------

    def _gossip_all(self, kind: str, payload: bytes) -> list[FogOutput]:
        return [Publish(topic=topics.gossip_topic(p, kind), payload=payload) for p in self._peers]

    def _seen(self, parsed: topics.Topic, payload: bytes, now: int) -> list[FogOutput]:
        """A peer's ``seen``: its marks stored; a collision is a clone (alarm, suspended)."""
        if len(payload) > SEEN_ENVELOPE_BYTES_MAX:
            return [TrustLoaded(msg_type="seen", status="dropped", detail="too large")]
        try:
            result = self._store.apply_seen(payload, now_ms=now)
        except Exception as exc:  # the seam: a storage failure; the peer sends it again
            return [Alarm(event="gossip_failed", error=type(exc).__name__)]
        detail = result.detail or (
            f"{result.entries} entries from {result.fog_id}, {result.raised} marks raised"
        )
        out: list[FogOutput] = [
            TrustLoaded(msg_type="seen", status=result.status, reason=result.reason, detail=detail)
        ]
        out.extend(Alarm(event="cloned_key", error=c.describe()) for c in result.clones)
        return out

    def _seen_round(self, now: int, mono: int, out: list[FogOutput]) -> None:
        """What was authorized since the last round, to every peer, from the durable cursor
        (at most ``SEEN_ROUND_ENTRIES_MAX``; more waiting: the next tick goes on)."""
        self._seen_at = mono + self.config.federation.seen_every_ms
        try:
            if self._seen_sent is not None:
                self._store.set_seen_cursor(self._seen_sent)
                self._seen_sent = None
            rows = self._store.authorized_after(self._store.seen_cursor())
            entries = [e for _, e in rows]
            for k in range(0, len(entries), SEEN_ENTRIES_MAX):
                chunk = tuple(entries[k : k + SEEN_ENTRIES_MAX])
                wire = seal(Seen(fog_id=self.fog_id, entries=chunk, time_ms=now), self._key)
                out.extend(self._gossip_all("seen", wire))
            if rows:
                self._seen_sent = rows[-1][0]
            if len(rows) >= SEEN_ROUND_ENTRIES_MAX:
                self._seen_at = mono  # more is waiting
        except Exception as exc:  # the seam: the next round tries again from the cursor
            self._seen_sent = None
            out.append(Alarm(event="gossip_failed", error=type(exc).__name__))

    def _prune_peers(self, now: int, mono: int, out: list[FogOutput]) -> None:
        """Peers' reports past their keep time, one small step (fog/peers.py); a full step:
        more is waiting, the next tick goes on."""
        try:
            deleted = self._store.prune_peer_seen(now_ms=now)
        except Exception as exc:  # keep authorizing; pruning retries in a while
            out.append(Alarm(event="prune_failed", error=type(exc).__name__))
            deleted = 0
        self._peer_prune_at = mono + (0 if deleted >= PEER_SEEN_PRUNE_ROWS else PEER_PRUNE_MS)

    def _check_backlog(self, limit: int, out: list[FogOutput]) -> None:
        """``uplink_backlog`` when the records the cloud has not acked exceed ``limit``;
        ``uplink_backlog_cleared`` once they are below it again (docs/protocol.md 17.6)."""
        try:
            records = self._store.unacked_records()
        except Exception as exc:
            out.append(Alarm(event="uplink_failed", error=type(exc).__name__))
            return
        if records > limit and not self._backlog_high:
            self._backlog_high = True
            out.append(Alarm(event="uplink_backlog", error=f"{records} unacked records > {limit}"))
        elif records < limit and self._backlog_high:
            self._backlog_high = False
            out.append(
                Alarm(event="uplink_backlog_cleared", error=f"{records} unacked records < {limit}")
            )

    def _replicated(self, parsed: topics.Topic, payload: bytes, now: int) -> list[FogOutput] | None:
        """Replication's messages (fog/replicas.py): gossip to us, other fogs' acks."""
        assert self._replication is not None
        self._replica_clones.clear()
        try:
            routed = self._replication.route(parsed, payload, now)
        except Exception as exc:  # the seam: storage failed; the sender sends again
            return [Alarm(event="replica_failed", error=type(exc).__name__)]
        if routed is None:
            return None
        clones = [Alarm(event="cloned_key", error=c) for c in self._replica_clones]
        return [*_as_outputs(routed), *clones]

    def _replica_marks(self, origin: str, entries: Sequence[SeenEntry], now: int) -> None:
        """The records of a replica being stored feed the peer marks (docs/protocol.md 17.4),
        in the replica's transaction; a collision suspends the device (``cloned_key``)."""
        _, clones, _ = self._store.note_peer_marks(origin, entries, now_ms=now)
        self._replica_clones.extend(c.describe() for c in clones)

    def _report_unused(self, lease_id: bytes | None, now: int, mono: int) -> list[FogOutput]:
        """A lease of ours arrived already expired (a grant delayed or resent past its
        life): the fog never drew on it, so it reports it unused at once, or the cloud would
        hold its amount in escrow for good (found by tests/sim)."""
        if lease_id is None:
            return []
        wire = report_envelope(
            self._key,
            fog_id=self.fog_id,
            lease_id=lease_id,
            drawn_micros=0,
            last_batch=0,
            now_ms=now,
        )
        if not self._store.record_unused_lease_report(lease_id, wire, now_ms=now):
            return []
        self._reports.track(lease_id, wire, now_ms=mono, sent=True)
        topic = lease_report_topic(self.fog_id)
        return [LeaseReport(topic=topic, payload=wire, lease_id=lease_id, drawn_micros=0, batch=0)]

    def _ack(self, payload: bytes, mono: int) -> list[FogOutput]:
        result = self._store.apply_ack(payload)
        out: list[FogOutput] = [
            TrustLoaded(
                msg_type="ack",
                status=result.status,
                reason=result.reason,
                detail=result.detail,
                batch=result.number,
            )
        ]
        if result.status == "accepted":
            self._prune_at = 0  # acked records may go: prune at the next tick
            out.extend(self._plan_uplink(mono))
        return out

    def _lease_cleared(self, lease_id: bytes, now_ms: int) -> list[FogOutput]:
        """The cloud cleared the lease's retained topic: the lease is closed."""
        self._reports.cleared(lease_id)
        self._prune_at = 0  # a closed lease may free records
        try:
            closed = self._store.close_lease(lease_id, now_ms=now_ms)
        except Exception as exc:
            return [Alarm(event="lease_upkeep_failed", error=type(exc).__name__)]
        return [LeaseClosed(lease_id=lease_id)] if closed else []

    def _republish(self) -> list[FogOutput]:
        closed = self._store.closed_lease_ids()
        out: list[FogOutput] = []
        for msg_type, envelope in self._store.trust_envelopes():
            topic = republish_topic(msg_type, envelope)
            if topic is None:
                continue
            parsed = topics.parse(topic)
            if parsed.kind is Kind.LEASE and parsed.lease_id in closed:
                continue
            out.append(Publish(topic=topic, payload=envelope, retain=True))
        return out

    # ---- time ----------------------------------------------------------------------------

    def _connected(self, event: Connected) -> list[FogOutput]:
        """What went to the old connection may not have reached the cloud: all again."""
        self._online = True
        self._window.reset()
        self._reports.reset()
        mono = _mono(event)
        self._uplink_at = self._lease_at = mono
        if self._replication is not None:
            self._replication.reset()
            self._replicate_at = mono
        return self._wake(mono)

    def _tick(self, event: Tick) -> list[FogOutput]:
        now, mono = event.now_ms, _mono(event)
        self._wake_sent = None
        out: list[FogOutput] = []
        sealed = False
        if mono >= self._seal_at:
            self._seal_at = mono + self._seal_every_ms
            sealed = self._seal(now, out)
        if self._replication is not None:
            self._replicate(now, mono, sealed, out)
        keep = self.config.batch.keep_acked_ms
        if keep and mono >= self._prune_at:
            self._prune(now, mono, keep, out)
        if self._uplink and self._online:
            if sealed or mono >= self._uplink_at:
                out.extend(self._plan_uplink(mono))
            if self._round_due(mono, sealed):
                self._lease_round(now, mono, out)
        backlog = self.config.uplink.backlog_alarm_records
        if backlog and self._uplink and mono >= self._backlog_at:
            self._backlog_at = mono + BACKLOG_CHECK_MS
            self._check_backlog(backlog, out)
        if self._peers and self._online and mono >= self._seen_at:
            self._seen_round(now, mono, out)
        if self._peers and mono >= self._peer_prune_at:
            self._prune_peers(now, mono, out)
        out.extend(self._wake(self._next_at()))
        return out

    def _next_at(self) -> int:
        at = self._seal_at
        if self.config.batch.keep_acked_ms:
            at = min(at, self._prune_at)
        if self._replication is not None:
            at = min(at, self._replicate_at, self._relay_at)
        if self._uplink and self._online:
            at = min(at, self._uplink_at, self._lease_at)
            if self._declines or self._touched:  # a round is wanted: at the gap's end
                at = min(at, self._gap_until)
        if self._uplink and self.config.uplink.backlog_alarm_records:
            at = min(at, self._backlog_at)
        if self._peers:
            at = min(at, self._peer_prune_at)
            if self._online:
                at = min(at, self._seen_at)
        return at

    def _replicate(self, now: int, mono: int, sealed: bool, out: list[FogOutput]) -> None:
        """Send new and unsafe batches to peers (on the uplink's timing); relay what the
        cloud lacks of others' and prune replicas (every ``relay_after_ms / 4``)."""
        rep = self._replication
        assert rep is not None
        try:
            if sealed or mono >= self._replicate_at:
                self._replicate_at = mono + self._uplink_every_ms
                wire_of = lambda n: self._fresh.get(n) or self._store.batch_wire(n)  # noqa: E731
                out.extend(_as_outputs(rep.plan(mono, wire_of)))
            if mono >= self._relay_at:
                self._relay_at = mono + max(1, self.config.federation.relay_after_ms // 4)
                out.extend(_as_outputs(rep.relay(now, mono)))
        except Exception as exc:  # the seam: retried at the next round
            out.append(Alarm(event="replica_failed", error=type(exc).__name__))

    def _wake(self, at: int) -> list[FogOutput]:
        if self._wake_sent is not None and self._wake_sent <= at:
            return []
        self._wake_sent = at
        return [Wake(mono_ms=at)]

    def _seal(self, now: int, out: list[FogOutput], *, age_ms: int | None = None) -> bool:
        batch = self.config.batch
        try:
            sealed = self._store.seal_due(
                now_ms=now,
                records_max=batch.records_max,
                age_ms=batch.age_ms if age_ms is None else age_ms,
            )
        except Exception as exc:  # keep authorizing; sealing retries next tick
            out.append(Alarm(event="seal_failed", error=type(exc).__name__))
            return False
        for b in sealed:
            out.append(Sealed(number=b.number, first_index=b.first_index, records=len(b.records)))
            if self._uplink:
                self._fresh[b.number] = b.wire
        while len(self._fresh) > FRESH_MAX:
            del self._fresh[min(self._fresh)]
        return bool(sealed)

    def _prune(self, now: int, mono: int, keep_ms: int, out: list[FogOutput]) -> None:
        """A few hundred log records nothing needs any more (FogStore.prune) per tick: small
        steps, so no input waits long behind one."""
        try:
            pruned = self._store.prune(now_ms=now, keep_ms=keep_ms)
        except Exception as exc:  # keep authorizing; pruning retries next tick
            out.append(Alarm(event="prune_failed", error=type(exc).__name__))
            self._prune_at = mono + PRUNE_IDLE_MS
            return
        if pruned:
            out.append(Pruned(records=pruned))
        # a full step: more is waiting, go on next tick; else look again in a while
        self._prune_at = mono + (0 if pruned >= PRUNE_ROWS_MAX else PRUNE_IDLE_MS)

    def _plan_uplink(self, mono: int) -> list[FogOutput]:
        """Batches to send now (``fog.uplink.Window``); their wires from the fresh cache or
        rebuilt from the log."""
        if not (self._uplink and self._online):
            return []
        self._uplink_at = mono + self._uplink_every_ms
        out: list[FogOutput] = []
        try:
            numbers = self._store.unacked_numbers(self._window.window)
            if numbers:  # acked batches leave the cache
                for n in [n for n in self._fresh if n < numbers[0]]:
                    del self._fresh[n]
            topic = topics.batch_topic(self.fog_id)
            planned = self._window.plan(numbers, now_ms=mono)
            if planned and self._transfers:  # 18.2: the cloud learns sub-leases first
                up = transfer_up_topic(self.fog_id)
                out.extend(
                    Publish(topic=up, payload=w) for w in self._store.transfers_received_open()
                )
            for number in planned:
                wire = self._fresh.pop(number, None) or self._store.batch_wire(number)
                assert wire is not None, "an unacked batch is not in the store"
                out.append(BatchSend(number=number, topic=topic, payload=wire))
        except Exception as exc:  # the seam: the uplink retries at the next tick
            out.append(Alarm(event="uplink_failed", error=type(exc).__name__))
        return out

    # ---- leases --------------------------------------------------------------------------

    def _round_due(self, mono: int, sealed: bool) -> bool:
        if self._declines or mono >= self._lease_at:
            return True
        return (bool(self._touched) or sealed) and mono >= self._gap_until

    def _lease_round(self, now: int, mono: int, out: list[FogOutput]) -> None:
        """Ask for budget for what was noted, report expired leases, resend what is due."""
        self._lease_at = mono + self.config.lease.check_interval_ms
        self._gap_until = mono + ROUND_GAP_MS
        try:
            out.extend(self._ask(now, mono))
            out.extend(self._pending_publish)
            self._pending_publish.clear()
            if self.config.lease.return_idle_ms and mono >= self._idle_at:
                self._return_idle(now, mono, out)
            if self.config.lease.report:
                self._report_expired(now, mono, out)
        except Exception as exc:  # the seam: lease upkeep retries at the next round
            out.append(Alarm(event="lease_upkeep_failed", error=type(exc).__name__))
        for pair, (topic, wire) in self._requests.due_pairs(now_ms=mono):
            out.append(
                LeaseRequest(
                    topic=topic, payload=wire, owner_id=pair[0], currency=pair[1], resend=True
                )
            )
        if self._transfers:
            out.extend(
                Publish(topic=t, payload=w) for t, w in self._asks.due(now_ms=now, mono_ms=mono)
            )
        for lease_id, (topic, wire) in self._reports.due_items(now_ms=mono):
            out.extend(self._transfers_up(lease_id))  # 18.2: what it gave goes up first
            out.append(
                LeaseReport(
                    topic=topic, payload=wire, lease_id=lease_id, drawn_micros=-1, batch=-1,
                    resend=True,
                )
            )  # fmt: skip

    def _ask(self, now: int, mono: int) -> list[FogOutput]:
        """New requests for what was noted since the last round."""
        touched, declines = self._touched, self._declines
        self._touched, self._declines = set(), {}
        owners = touched | {owner for owner, _ in declines}
        if not owners:
            return []
        room = self._store.lease_room(sorted(owners), now_ms=now)
        renew = self.config.lease.renew_before_ms
        expiring = (
            self._store.lease_expiring(sorted(touched), now_ms=now, within_ms=renew)
            if renew and touched
            else set()
        )
        asked: list[tuple[Pair, tuple[str, bytes] | None]] = []
        for pair, (device, amount) in declines.items():
            send = self._requests.declined(
                pair,
                device=device,
                amount_micros=amount,
                has_live=pair in room,
                now_ms=mono,
                fog_time_ms=now,
            )
            asked.append((pair, send))
            if self._transfers and self._requests.stalled(pair):  # 18.2: the cloud is silent
                xreq = self._asks.ask(
                    pair, max(self.config.lease.request_micros, amount), now_ms=now, mono_ms=mono
                )
                if xreq is not None:
                    self._pending_publish.append(Publish(topic=xreq[0], payload=xreq[1]))
        for pair, left in room.items():
            if pair[0] in touched and pair not in declines:
                send = self._requests.room(pair, left, now_ms=mono, fog_time_ms=now)
                if send is None and pair in expiring:  # 17.6: the next lease before na
                    send = self._requests.renew(pair, now_ms=mono, fog_time_ms=now)
                asked.append((pair, send))
        return [
            LeaseRequest(topic=send[0], payload=send[1], owner_id=pair[0], currency=pair[1])
            for pair, send in asked
            if send is not None
        ]

    def _report_expired(self, now: int, mono: int, out: list[FogOutput]) -> None:
        for draws in self._store.lease_reports_due(now_ms=now):
            wire = report_envelope(
                self._key,
                fog_id=self.fog_id,
                lease_id=draws.lease_id,
                drawn_micros=draws.drawn_micros,
                last_batch=draws.last_batch,
                now_ms=now,
            )
            self._store.record_lease_report(draws, wire, now_ms=now)
            out.extend(self._transfers_up(draws.lease_id))  # 18.2: before the report
            # tracked as sent now: its first send is this output, resends follow the schedule
            self._reports.track(draws.lease_id, wire, now_ms=mono, sent=True)
            out.append(
                LeaseReport(
                    topic=lease_report_topic(self.fog_id),
                    payload=wire,
                    lease_id=draws.lease_id,
                    drawn_micros=draws.drawn_micros,
                    batch=draws.last_batch,
                )
            )

    # ---- early return (docs/protocol.md 18.1; SQL in fog/returns.py) ----------------------

    def _mark_active(self, owner_id: str, mono: int) -> None:
        if owner_id not in self._active and len(self._active) >= ACTIVE_OWNERS_MAX:
            # full: forget, and count everyone active from now (returns wait, never early)
            self._active.clear()
            self._idle_origin = mono
        self._active[owner_id] = mono

    def _returned(self, retired: Sequence[returns.Returned]) -> list[FogOutput]:
        for r in retired:
            self._active.pop(r.owner_id, None)
        return [
            LeaseReturned(
                lease_id=r.lease_id,
                owner_id=r.owner_id,
                currency=r.currency,
                amount_micros=r.amount_micros,
                drawn_micros=r.drawn_micros,
                cause=r.reason,
            )
            for r in retired
        ]

    def _return_idle(self, now: int, mono: int, out: list[FogOutput]) -> None:
        """Retire the leases of owners that showed no activity for ``lease.return_idle_ms``
        (their reports follow in this round if their draws are sealed, else in a later one)."""
        idle = self.config.lease.return_idle_ms
        self._idle_at = mono + max(
            self.config.lease.check_interval_ms, min(idle // 10, IDLE_CHECK_MS_MAX)
        )
        if self._idle_origin is None:
            self._idle_origin = mono
        origin = self._idle_origin
        owners = [
            o
            for o in self._store.live_lease_owners(now_ms=now)
            if mono - self._active.get(o, origin) >= idle
        ]
        if owners:
            retired = self._store.retire_leases(now_ms=now, reason="idle", owner_ids=owners)
            out.extend(self._returned(retired))

    def _recall(self, payload: bytes, lease_id: bytes, now: int, mono: int) -> list[FogOutput]:
        """The cloud asks for an owner's lease back (``rbal``, docs/protocol.md 18.5) because
        another fog found no credit for it. Given (every live lease of the owner retired, then
        reported by the lease round, 18.1) only if the owner drew nothing here for
        ``lease.recall_idle_ms``; else kept: a fog never gives up budget it is using."""
        try:
            signed = open_envelope(payload, LeaseRecall, signer=self.config.issuer_key)
        except Declined as exc:
            return [
                TrustLoaded(msg_type="rbal", status="refused", reason=exc.reason, detail="rbal")
            ]
        r = signed.msg
        if r.fog_id != self.fog_id or r.lease_id != lease_id:
            return [
                TrustLoaded(
                    msg_type="rbal",
                    status="refused",
                    reason=Reason.WRONG_FOG,
                    detail=f"rbal for {r.fog_id}'s {r.lease_id.hex()[:16]}",
                )
            ]
        idle = self.config.lease.recall_idle_ms
        if self._idle_origin is None:
            self._idle_origin = mono  # no activity known before: counted from now
        since = self._active.get(r.owner_id, self._idle_origin)
        if not idle or mono - since < idle:
            why = "never given (lease.recall_idle_ms = 0)" if not idle else "owner active here"
            return [TrustLoaded(msg_type="rbal", status="kept", detail=f"{r.owner_id}: {why}")]
        try:
            retired = self._store.retire_leases(now_ms=now, reason="cloud", owner_ids=[r.owner_id])
        except Exception as exc:  # the seam: nothing was retired; the cloud asks again
            return [Alarm(event="lease_upkeep_failed", error=type(exc).__name__)]
        out: list[FogOutput] = [
            TrustLoaded(
                msg_type="rbal",
                status="accepted",
                detail=f"{len(retired)} lease(s) of {r.owner_id} given back for {r.requester}",
            ),
            *self._returned(retired),
        ]
        if retired:
            self._report_now(now, mono, out)
        return out

    def _report_now(self, now: int, mono: int, out: list[FogOutput]) -> None:
        """Report the leases retired just now whose draws are sealed, and send what is due."""
        if self.config.lease.report:
            try:
                self._report_expired(now, mono, out)
            except Exception as exc:  # reported at a later round
                out.append(Alarm(event="lease_upkeep_failed", error=type(exc).__name__))
        out.extend(self._plan_uplink(mono))

    def _return_leases(self, event: ReturnLeases) -> list[FogOutput]:
        """Retire now, then report what can be reported (a shutdown seals first, so every
        report can go before the fog stops), and send what was sealed."""
        now, mono = event.now_ms, _mono(event)
        if event.cause not in returns.REASONS:
            return [Alarm(event="lease_upkeep_failed", error=f"no such reason {event.cause!r}")]
        owners = None if event.owner_id is None else [event.owner_id]
        try:
            retired = self._store.retire_leases(now_ms=now, reason=event.cause, owner_ids=owners)
        except Exception as exc:  # the seam: nothing was retired; the caller may ask again
            return [Alarm(event="lease_upkeep_failed", error=type(exc).__name__)]
        out = self._returned(retired)
        if event.cause == "shutdown":
            self._seal(now, out, age_ms=0)
        self._report_now(now, mono, out)
        return out

    # ---- peer transfers (docs/protocol.md 18.2; SQL in fog/transfers.py) -------------------

    def _transfers_up(self, lease_id: bytes) -> list[FogOutput]:
        """The ``xfer``s carved from ``lease_id``, up to the cloud (before its report)."""
        if not self._transfers:
            return []
        topic = transfer_up_topic(self.fog_id)
        return [Publish(topic=topic, payload=w) for w in self._store.transfers_of(lease_id)]

    def _xreq(self, payload: bytes, now: int) -> list[FogOutput]:
        """A peer asks for part of a lease: debited and stored first, then the ``xfer`` goes
        to it and up to the cloud."""
        try:
            given = self._store.give_transfer(payload, peers=self._peers, now_ms=now)
        except Exception as exc:  # the seam: nothing was debited; the peer asks again
            return [Alarm(event="transfer_failed", error=type(exc).__name__)]
        status = {"given": "accepted", "again": "duplicate"}.get(given.status, "refused")
        detail = given.detail or f"{given.amount_micros} to {given.receiver}"
        loaded = TrustLoaded(msg_type="xreq", status=status, detail=detail)
        if given.status not in ("given", "again"):
            return [loaded]
        return [
            loaded,
            Publish(topic=transfer_topic(given.receiver), payload=given.envelope),
            Publish(topic=transfer_up_topic(self.fog_id), payload=given.envelope),
        ]

    def _xfer(self, payload: bytes, now: int, mono: int, *, from_cloud: bool) -> list[FogOutput]:
        """A transfer for this fog (from the giver, or the cloud's retained copy): a
        sub-lease, once per id; it goes up to the cloud before anything is drawn on it.

        Refused and never drawn: one expired on arrival, and one whose giver's fog credential
        is not known here (yet). The cloud's retained copy of either means the cloud holds the
        sub-lease in escrow: it is reported unused (``u`` = 0) at once, which closes it and
        frees its budget, and this fog never stores it afterwards (18.2)."""
        try:
            got = self._store.receive_transfer(payload, now_ms=now)
        except Exception as exc:  # the seam: nothing stored; it comes again
            return [Alarm(event="transfer_failed", error=type(exc).__name__)]
        expired = got.status == "expired"  # as a lease arriving expired (13.3): refused
        unverified = got.status == "unverified"
        out: list[FogOutput] = [
            TrustLoaded(
                msg_type="xfer",
                status="refused" if expired or unverified else got.status,
                reason=Reason.EXPIRED if expired else got.reason,
                detail=got.detail or f"{got.amount_micros} of {got.owner_id} from {got.giver}",
            )
        ]
        if got.status in ("accepted", "duplicate", "expired"):
            self._asks.answered((got.owner_id, got.currency))
            self._mark_active(got.owner_id, mono)
            out.append(Publish(topic=transfer_up_topic(self.fog_id), payload=payload))
        if expired or (unverified and from_cloud):
            if unverified:
                self._asks.answered((got.owner_id, got.currency))  # ask again, afresh
            out.extend(self._report_unused(got.transfer_id, now, mono))
        return out

    def _counters(self) -> Counters:
        counts = Counter(self._store.counters())
        counts["lease_requests_abandoned"] = self._requests.abandoned
        if self._replication is not None:
            counts["records_at_risk"] = self._replication.at_risk()
        return Counters(items=tuple(sorted(counts.items())))


def _as_outputs(items: Sequence[Gossip | ReplicaEvent]) -> list[FogOutput]:
    return [
        Publish(topic=i.topic, payload=i.payload) if isinstance(i, Gossip) else i for i in items
    ]
