"""One simulated fog: the real fog code, driven synchronously with the virtual clock.

This is the ONE adapter between the simulation and the fog. Today it drives the real
synchronous ``FogStore`` (every decision, every durable write) and the fog's pure planners
(``fog.leasing.LeaseRequests`` / ``LeaseReports`` / ``report_envelope``, ``fog.uplink.Window``,
``fog.trust.classify``), doing by hand what the daemon's asyncio tasks do around them
(``FogDaemon._dispatch`` / ``_process_group`` / ``_load_trust`` / ``_sealer``,
``Uplink.run``, ``LeaseKeeper._round``), with ``now_ms`` from the virtual clock and the
sends returned as an outbox instead of published. When ``fog.core.FogCore`` exists, this
module drives it instead and nothing else in the simulator changes.

A crash drops every object (the store's connection, the planners' memory, the rate buckets);
a restart reopens the store from its file, as systemd restarting the daemon would.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import nacl.signing

from fog.authorize import Policy
from fog.leasing import LeaseReports, LeaseRequests, report_envelope
from fog.store import Arrival, FogStore, Outcome
from fog.trust import classify
from fog.uplink import Window
from protocol import topics
from protocol.errors import Declined, TopicError
from protocol.limits import INTENT_ENVELOPE_BYTES_MAX
from protocol.messages import Intent, Lease, decode_body
from protocol.reasons import Reason
from protocol.signing import open_envelope, split_envelope
from protocol.topics import Kind

DEVICE: Final = "device"  # outbox destination: the device named by the receipt topic
CLOUD: Final = "cloud"
Send = tuple[str, str, bytes]  # (destination, topic, payload)
Pair = tuple[str, str]


@dataclass(frozen=True, slots=True)
class FogSettings:
    """What ``fog.toml`` would say ([batch], [uplink], [lease], [policy]), sized for the sim."""

    records_max: int = 4
    age_ms: int = 1_000
    window: int = 4
    ack_timeout_ms: int = 3_000
    request_below_micros: int = 20_000
    request_micros: int = 100_000
    request_timeout_ms: int = 2_000
    request_attempts_max: int = 3
    report_retry_ms: int = 500
    policy: Policy = field(default_factory=lambda: Policy(rate_per_s=50.0, rate_burst=50))


class FogNode:
    def __init__(
        self,
        *,
        fog_id: str,
        key: nacl.signing.SigningKey,
        issuer_key: bytes,
        path: Path,
        settings: FogSettings,
    ) -> None:
        self.fog_id, self.path, self.settings = fog_id, path, settings
        self._key, self._issuer = key, issuer_key
        self.store: FogStore | None = None
        self.revoked_at: dict[bytes, int] = {}  # key -> when this fog accepted its revocation
        self.starts = 0

    @property
    def up(self) -> bool:
        return self.store is not None

    # ---- life -----------------------------------------------------------------------------

    def start(self, *, now_ms: int) -> None:
        s = self.settings
        self.store = FogStore.open(
            self.path,
            fog_id=self.fog_id,
            fog_key=self._key,
            issuer_key=self._issuer,
            policy=s.policy,
        )
        self.store.uplink_init()
        self._requests = LeaseRequests(
            fog_id=self.fog_id,
            key=self._key,
            below_micros=s.request_below_micros,
            request_micros=s.request_micros,
            timeout_ms=s.request_timeout_ms,
            attempts_max=s.request_attempts_max,
        )
        self._reports = LeaseReports(fog_id=self.fog_id, retry_ms=s.report_retry_ms)
        self._window = Window(window=s.window, ack_timeout_ms=s.ack_timeout_ms)
        self._touched: set[str] = set()
        self._declines: dict[Pair, tuple[bytes, int]] = {}
        for lease_id, wire in self.store.lease_reports_open():
            self._reports.track(lease_id, wire, now_ms=0)
        self.starts += 1

    def crash(self) -> None:
        """Drop everything in memory; committed transactions stay in the file."""
        assert self.store is not None
        self.store.close()
        self.store = None

    def reconnected(self) -> None:
        """The link to the cloud came back (the daemon's ``_session`` start)."""
        assert self.store is not None
        self._window.reset()
        self._reports.reset()

    # ---- inputs -----------------------------------------------------------------------------

    def intents(self, arrivals: list[Arrival], *, now_ms: int) -> tuple[list[Outcome], list[Send]]:
        """A group of intents: one durable transaction, then the receipts (outbox)."""
        assert self.store is not None
        outcomes = self.store.process(arrivals, now_ms=now_ms)
        out: list[Send] = []
        for arrival, o in zip(arrivals, outcomes, strict=True):
            self._note(arrival, o)
            out.append((DEVICE, topics.receipt_topic(self.fog_id, arrival.topic_device), o.receipt))
        return outcomes, out

    def _note(self, arrival: Arrival, o: Outcome) -> None:
        """What ``LeaseKeeper.note`` remembers for the next lease round."""
        if o.owner_id is None:
            return
        if o.status == "ok" and not o.replay:
            self._touched.add(o.owner_id)
        elif o.reason is Reason.INSUFFICIENT_BUDGET and o.amount_micros is not None:
            try:
                env = split_envelope(arrival.payload, bytes_max=INTENT_ENVELOPE_BYTES_MAX)
                currency = decode_body(Intent, env.body).currency
            except Declined:
                return
            self._declines.setdefault((o.owner_id, currency), (o.device, o.amount_micros))

    def message(self, topic: str, payload: bytes, *, now_ms: int) -> str:
        """A message from the cloud's broker (trust, lease, cleared lease, ack): what the daemon's
        ``_dispatch`` and ``_load_trust`` do. Returns a word for the trace."""
        assert self.store is not None
        try:
            parsed = topics.parse(topic)
        except TopicError:
            return "bad_topic"
        arrival = classify(parsed, payload, fog_id=self.fog_id)
        if arrival is None:
            if not payload and parsed.kind is Kind.LEASE and parsed.fog_id == self.fog_id:
                assert parsed.lease_id is not None
                closed = self.store.close_lease(parsed.lease_id, now_ms=now_ms)
                self._reports.cleared(parsed.lease_id)
                return "lease_closed" if closed else "lease_cleared"
            return "ignored"
        if arrival.msg_type == "ack":
            return f"ack_{self.store.apply_ack(arrival.payload).status}"
        result = self.store.put_trust(arrival.msg_type, arrival.payload, now_ms=now_ms)
        if result.status == "accepted":
            if arrival.msg_type == "lease":
                lease = open_envelope(arrival.payload, Lease).msg
                self._requests.answered((lease.owner_id, lease.currency))
            elif arrival.msg_type == "revoke" and parsed.key is not None:
                self.revoked_at.setdefault(parsed.key, now_ms)
        return f"{arrival.msg_type}_{result.status}"

    def tick(self, *, now_ms: int) -> list[Send]:
        """The sealer, the uplink and the lease round, once each."""
        assert self.store is not None
        s, store = self.settings, self.store
        store.seal_due(now_ms=now_ms, records_max=s.records_max, age_ms=s.age_ms)
        out: list[Send] = []
        for number in self._window.plan(store.unacked_numbers(s.window), now_ms=now_ms):
            wire = store.batch_wire(number)
            assert wire is not None, "an unacked batch is not in the store"
            out.append((CLOUD, topics.batch_topic(self.fog_id), wire))
        sends = self._ask(now_ms)
        for draws in store.lease_reports_due(now_ms=now_ms):
            wire = report_envelope(
                self._key,
                fog_id=self.fog_id,
                lease_id=draws.lease_id,
                drawn_micros=draws.drawn_micros,
                last_batch=draws.last_batch,
                now_ms=now_ms,
            )
            store.record_lease_report(draws, wire, now_ms=now_ms)
            self._reports.track(draws.lease_id, wire, now_ms=now_ms)
        sends += self._requests.due(now_ms=now_ms) + self._reports.due(now_ms=now_ms)
        out += [(CLOUD, topic, wire) for topic, wire in sends]
        return out

    def _ask(self, now_ms: int) -> list[tuple[str, bytes]]:
        """``LeaseKeeper._ask``: requests for what was noted since the last round."""
        assert self.store is not None
        touched, declines = self._touched, self._declines
        self._touched, self._declines = set(), {}
        owners = touched | {owner for owner, _ in declines}
        if not owners:
            return []
        room = self.store.lease_room(sorted(owners), now_ms=now_ms)
        out = []
        for pair, (device, amount) in declines.items():
            send = self._requests.declined(
                pair, device=device, amount_micros=amount, has_live=pair in room, now_ms=now_ms
            )
            if send is not None:
                out.append(send)
        for pair, left in room.items():
            if pair[0] in touched and pair not in declines:
                send = self._requests.room(pair, left, now_ms=now_ms)
                if send is not None:
                    out.append(send)
        return out

    def idle(self) -> bool:
        """Nothing left to send up: every record sealed and acked, every report cleared."""
        assert self.store is not None
        return (
            not self.store.unacked_numbers(1)
            and not self.store.lease_reports_open()
            and not self._requests.pending
        )
