"""The fog's side of leases: asking the cloud for budget (``lreq``) and closing what expired
(``lrep``). Messages and their tables: ``protocol/leasing.py`` and ``docs/protocol.md`` section 14.

Requests. A fog asks for budget of an owner in a currency

- by policy, when it declines an intent ``insufficient_budget`` and holds no live lease of
  that owner and currency: an ``lreq`` without ``a`` (the cloud grants its initial lease),
  with ``d``, the device;
- on demand, when the room left on the owner's live leases falls under
  ``request_below_micros`` (or an intent was declined for want of room): an ``lreq`` for
  ``request_micros`` (or the declined amount, if larger).

At most one request is outstanding per (owner, currency). It is resent, the same bytes (the
cloud answers a request id once, idempotently), every ``timeout_ms`` up to ``attempts_max``
times, then forgotten (``lease_request_abandoned``); the next trigger makes a new one. A lease
of that owner and currency arriving answers it. The cloud answers a request it cannot grant
with nothing, so the fog keeps declining ``insufficient_budget`` meanwhile: that is the spec.

Reports. Once a lease has expired and every draw on it is in a sealed batch, the fog signs
an ``lrep`` (``u`` = what it drew, ``b`` = the last batch holding a draw), stores it, stops
drawing on the lease for good, and sends it until the cloud clears the retained lease topic
(an empty payload on ``fogpay/1/{fog_id}/lease/{lease_hex}``); then the lease is closed in
the fog's store. Resends back off from ``report_retry_ms`` to ``REPORT_RETRY_MS_MAX``, at most
``REPORT_ATTEMPTS_MAX`` times per run of the daemon.

``LeaseRequests`` and ``LeaseReports`` are pure state machines (the clock is passed in);
``LeaseKeeper`` is the daemon's ``fog.leases`` task around them.
"""

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

import nacl.signing

from fog.config import LeaseConfig
from fog.store import Arrival, FogStore, Outcome
from fog.uplink import Link, mono_ms
from protocol import limits
from protocol.errors import Declined
from protocol.leasing import (
    LeaseReport,
    LeaseRequest,
    lease_report_topic,
    lease_request_topic,
)
from protocol.limits import INTENT_ENVELOPE_BYTES_MAX
from protocol.messages import Intent, Lease, decode_body
from protocol.reasons import Reason
from protocol.signing import open_envelope, seal, split_envelope

REQUESTS_OUTSTANDING_MAX: Final = 10_000  # (owner, currency) pairs with a request in flight
REPORTS_OUTSTANDING_MAX: Final = 10_000
REPORT_RETRY_MS_MAX: Final = 300_000
REPORT_ATTEMPTS_MAX: Final = 200
NOTES_MAX: Final = 10_000  # owners and declines noted between two lease checks
# Every group of authorizations notes its owners; a round (two store calls) after each one
# would cost the store thread ~0.5 ms per group at low load. Rounds woken by authorizations
# run at most this often; an ``insufficient_budget`` decline does not wait.
ROUND_GAP_S: Final = 0.25

Pair = tuple[str, str]  # (owner_id, currency)


@dataclass(slots=True)
class _Pending:
    wire: bytes
    next_ms: int
    attempts: int = 1


@dataclass(slots=True)
class LeaseRequests:
    fog_id: str
    key: nacl.signing.SigningKey
    below_micros: int
    request_micros: int
    timeout_ms: int
    attempts_max: int
    pending: dict[Pair, _Pending] = field(default_factory=dict)
    abandoned: int = 0

    def __post_init__(self) -> None:
        assert 0 <= self.below_micros and 1 <= self.request_micros <= limits.AMOUNT_MICROS_MAX
        assert self.timeout_ms > 0 and self.attempts_max >= 1

    def declined(
        self,
        pair: Pair,
        *,
        device: bytes,
        amount_micros: int,
        has_live: bool,
        now_ms: int,
        fog_time_ms: int | None = None,
    ) -> tuple[str, bytes] | None:
        """An intent of ``pair`` was declined insufficient_budget: the request to send, if
        one is due. ``now_ms`` schedules resends (monotonic); ``fog_time_ms`` is the request's
        ``t`` (wall clock: a monotonic clock restarts at boot, and an equal request sent after
        a reboot would repeat an old request id and be answered with an old lease)."""
        t = now_ms if fog_time_ms is None else fog_time_ms
        if not has_live:
            return self._request(pair, None, device, now_ms, t)
        amount = min(max(self.request_micros, amount_micros), limits.AMOUNT_MICROS_MAX)
        return self._request(pair, amount, None, now_ms, t)

    def room(
        self, pair: Pair, room_micros: int, *, now_ms: int, fog_time_ms: int | None = None
    ) -> tuple[str, bytes] | None:
        """The live leases of ``pair`` have ``room_micros`` left: a top-up request if under
        the threshold."""
        if room_micros >= self.below_micros:
            return None
        t = now_ms if fog_time_ms is None else fog_time_ms
        return self._request(pair, self.request_micros, None, now_ms, t)

    def answered(self, pair: Pair) -> bool:
        """A lease of ``pair`` arrived; True if it answers a pending request."""
        return self.pending.pop(pair, None) is not None

    def due(self, *, now_ms: int) -> list[tuple[str, bytes]]:
        """Requests to send again now (same bytes); forgets those out of attempts."""
        return [send for _, send in self.due_pairs(now_ms=now_ms)]

    def due_pairs(self, *, now_ms: int) -> list[tuple[Pair, tuple[str, bytes]]]:
        """``due``, each with the (owner, currency) it asks for."""
        out = []
        for pair, p in list(self.pending.items()):
            if now_ms < p.next_ms:
                continue
            if p.attempts >= self.attempts_max:
                del self.pending[pair]
                self.abandoned += 1
                continue
            p.attempts += 1
            p.next_ms = now_ms + self.timeout_ms
            out.append((pair, (lease_request_topic(self.fog_id), p.wire)))
        return out

    def _request(
        self, pair: Pair, amount: int | None, device: bytes | None, now_ms: int, time_ms: int
    ) -> tuple[str, bytes] | None:
        if pair in self.pending or len(self.pending) >= REQUESTS_OUTSTANDING_MAX:
            return None
        owner_id, currency = pair
        msg = LeaseRequest(
            fog_id=self.fog_id,
            owner_id=owner_id,
            currency=currency,
            amount_micros=amount,
            device=device,
            time_ms=max(time_ms, 1),
        )
        wire = seal(msg, self.key)
        self.pending[pair] = _Pending(wire, now_ms + self.timeout_ms)
        return lease_request_topic(self.fog_id), wire


def report_envelope(
    key: nacl.signing.SigningKey,
    *,
    fog_id: str,
    lease_id: bytes,
    drawn_micros: int,
    last_batch: int,
    now_ms: int,
) -> bytes:
    msg = LeaseReport(
        lease_id=lease_id,
        fog_id=fog_id,
        drawn_micros=drawn_micros,
        last_batch=last_batch,
        time_ms=max(now_ms, 1),
    )
    return seal(msg, key)


@dataclass(slots=True)
class LeaseReports:
    """Reports sent and not yet cleared by the cloud, with their resend schedule."""

    fog_id: str
    retry_ms: int
    pending: dict[bytes, _Pending] = field(default_factory=dict)  # lease_id -> report
    abandoned: int = 0

    def __post_init__(self) -> None:
        assert self.retry_ms > 0

    def track(self, lease_id: bytes, wire: bytes, *, now_ms: int, sent: bool = False) -> bool:
        """Start sending ``wire`` (due now; ``sent``: the caller sends it now, the first
        resend is due after ``retry_ms``); False if already tracked or full."""
        if lease_id in self.pending or len(self.pending) >= REPORTS_OUTSTANDING_MAX:
            return False
        if sent:
            self.pending[lease_id] = _Pending(wire, now_ms + self.retry_ms, attempts=1)
        else:
            self.pending[lease_id] = _Pending(wire, now_ms, attempts=0)
        return True

    def cleared(self, lease_id: bytes) -> bool:
        return self.pending.pop(lease_id, None) is not None

    def reset(self) -> None:
        """After a reconnect: every pending report is due at once."""
        for p in self.pending.values():
            p.next_ms = 0

    def due(self, *, now_ms: int) -> list[tuple[str, bytes]]:
        return [send for _, send in self.due_items(now_ms=now_ms)]

    def due_items(self, *, now_ms: int) -> list[tuple[bytes, tuple[str, bytes]]]:
        """``due``, each with the lease id it reports."""
        out = []
        for lease_id, p in list(self.pending.items()):
            if now_ms < p.next_ms:
                continue
            if p.attempts >= REPORT_ATTEMPTS_MAX:
                del self.pending[lease_id]
                self.abandoned += 1
                continue
            delay = min(REPORT_RETRY_MS_MAX, self.retry_ms * 2 ** min(p.attempts, 16))
            p.attempts += 1
            p.next_ms = now_ms + delay
            out.append((lease_id, (lease_report_topic(self.fog_id), p.wire)))
        return out


class LeaseKeeper:
    """The ``fog.leases`` task. ``note`` (after each group: no store access) remembers the
    owners that drew and the declines for want of budget; every check, or at once when
    woken, it asks for budget, reports expired leases, and resends what is due."""

    def __init__(
        self,
        link: Link,
        config: LeaseConfig,
        *,
        clock: Callable[[], int],
        key: nacl.signing.SigningKey,
    ) -> None:
        self._link, self._config, self._clock, self._key = link, config, clock, key
        self._requests = LeaseRequests(
            fog_id=link.fog_id,
            key=key,
            below_micros=config.request_below_micros,
            request_micros=config.request_micros,
            timeout_ms=config.request_timeout_ms,
            attempts_max=config.request_attempts_max,
        )
        self._reports = LeaseReports(fog_id=link.fog_id, retry_ms=config.report_retry_ms)
        self._touched: set[str] = set()  # owners with authorizations since the last check
        self._declines: dict[Pair, tuple[bytes, int]] = {}  # -> (device, amount)
        self._wake = asyncio.Event()
        self._urgent = asyncio.Event()  # a decline for want of budget: no gap

    def wake(self) -> None:
        self._wake.set()

    def reconnected(self) -> None:
        self._reports.reset()
        self._wake.set()

    def note(self, group: Sequence[Arrival], outcomes: Sequence[Outcome]) -> None:
        """Remember owners that drew and ``insufficient_budget`` declines (owner, currency,
        device). Bounded; never raises."""
        for arrival, o in zip(group, outcomes, strict=True):
            if o.owner_id is None or len(self._declines) + len(self._touched) >= NOTES_MAX:
                continue
            if o.status == "ok" and not o.replay:
                self._touched.add(o.owner_id)
            elif o.reason is Reason.INSUFFICIENT_BUDGET and o.amount_micros is not None:
                currency = _intent_currency(arrival.payload)
                if currency is None:
                    continue
                self._declines.setdefault((o.owner_id, currency), (o.device, o.amount_micros))
                self._urgent.set()
            else:
                continue
            self._wake.set()

    def arrived(self, envelope: bytes) -> None:
        """A lease was loaded (verified by the store): it answers a request of its pair."""
        lease = open_envelope(envelope, Lease).msg
        if self._requests.answered((lease.owner_id, lease.currency)):
            self._link.count("lease_request_answered")

    async def cleared(self, store: FogStore, lease_id: bytes) -> None:
        """The cloud cleared the lease's retained topic: closed."""
        closed = await self._link.call(store.close_lease, lease_id, now_ms=self._clock())
        self._reports.cleared(lease_id)
        if closed:
            self._link.count("lease_closed")
            self._link.log.info("lease_closed", lease=lease_id.hex())

    async def run(self, store: FogStore) -> None:
        link = self._link
        for lease_id, wire in await link.call(store.lease_reports_open):
            self._reports.track(lease_id, wire, now_ms=0)
        interval = self._config.check_interval_ms / 1000
        while not await link.wait(self._wake, interval):
            if link.client() is None:
                continue
            try:
                await self._round(store)
            except Exception as exc:  # the seam: lease upkeep retries at the next check
                link.count("lease_upkeep_failed")
                link.log.error("lease_upkeep_failed", error=type(exc).__name__)
            if await link.wait(self._urgent, ROUND_GAP_S):
                return

    async def _round(self, store: FogStore) -> None:
        now, mono = self._clock(), mono_ms()
        sends = await self._ask(store, now, mono)
        if self._config.report:
            await self._report_expired(store, now)
        sends += self._requests.due(now_ms=mono) + self._reports.due(now_ms=mono)
        for topic, wire in sends:
            await self._link.publish(topic, wire)

    async def _ask(self, store: FogStore, now: int, mono: int) -> list[tuple[str, bytes]]:
        """New requests for what was noted since the last round."""
        touched, declines = self._touched, self._declines
        self._touched, self._declines = set(), {}
        owners = touched | {owner for owner, _ in declines}
        if not owners:
            return []
        room = await self._link.call(store.lease_room, sorted(owners), now_ms=now)
        asked: list[tuple[Pair, tuple[str, bytes] | None]] = []
        for pair, (device, amount) in declines.items():
            live = pair in room
            asked.append(
                (
                    pair,
                    self._requests.declined(
                        pair,
                        device=device,
                        amount_micros=amount,
                        has_live=live,
                        now_ms=mono,
                        fog_time_ms=now,
                    ),
                )
            )
        for pair, left in room.items():
            if pair[0] in touched and pair not in declines:
                asked.append((pair, self._requests.room(pair, left, now_ms=mono, fog_time_ms=now)))
        out = []
        for pair, send in asked:
            if send is not None:
                out.append(send)
                self._link.count("lease_requested")
                self._link.log.info("lease_requested", owner=pair[0], currency=pair[1])
        return out

    async def _report_expired(self, store: FogStore, now: int) -> None:
        link = self._link
        for draws in await link.call(store.lease_reports_due, now_ms=now):
            wire = report_envelope(
                self._key,
                fog_id=link.fog_id,
                lease_id=draws.lease_id,
                drawn_micros=draws.drawn_micros,
                last_batch=draws.last_batch,
                now_ms=now,
            )
            await link.call(store.record_lease_report, draws, wire, now_ms=now)
            self._reports.track(draws.lease_id, wire, now_ms=mono_ms())
            link.count("lease_reported")
            link.log.info(
                "lease_reported",
                lease=draws.lease_id.hex(),
                drawn_micros=draws.drawn_micros,
                batch=draws.last_batch,
            )

    @property
    def abandoned(self) -> dict[str, int]:
        return {
            "lease_requests_abandoned": self._requests.abandoned,
            "lease_reports_abandoned": self._reports.abandoned,
        }


def _intent_currency(payload: bytes) -> str | None:
    """The currency of an intent the store has already verified (decoded again, unverified:
    only to know which budget to ask for)."""
    try:
        env = split_envelope(payload, bytes_max=INTENT_ENVELOPE_BYTES_MAX)
        return decode_body(Intent, env.body).currency
    except Declined:
        return None
