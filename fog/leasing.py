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
the fog's store. Resends back off from ``report_retry_ms`` to ``REPORT_RETRY_MS_MAX`` and
never stop: a report is never abandoned, whatever the length of an outage (docs/protocol.md
17.6); without it the lease's unused part stays in escrow at the cloud.

Early return (docs/protocol.md 18.1, fog/returns.py). A lease given back before its ``na``
(an idle owner, a graceful stop, the operator) is retired first, for good, so it looks expired
here: the report path above sends it, with the same promise.

Renewal. An owner that drew and whose live leases all expire within ``lease.renew_before_ms``
is asked a top-up (``LeaseRequests.renew``) before they do, so a fog cut off from the cloud
later still holds budget for up to one more lease life (not for a lease that lived less than
that window when it arrived: ``FogStore.lease_expiring``). After a lease's ``na`` nothing is
drawn on it (``fog.authorize.pick_lease``): a fog whose budget expired while cut off
declines ``insufficient_budget``.

``LeaseRequests`` and ``LeaseReports`` are pure state machines (the clock is passed in);
``FogCore`` (fog/core.py) drives them: it notes the owners that drew and the declines for want
of budget, runs a lease round when one is due, and hands what to send to the daemon.
"""

from dataclasses import dataclass, field
from typing import Final

import nacl.signing

from protocol import limits
from protocol.leasing import (
    LeaseReport,
    LeaseRequest,
    lease_report_topic,
    lease_request_topic,
)
from protocol.signing import seal

REQUESTS_OUTSTANDING_MAX: Final = 10_000  # (owner, currency) pairs with a request in flight
REPORTS_OUTSTANDING_MAX: Final = 10_000
REPORT_RETRY_MS_MAX: Final = 300_000
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

    def renew(
        self, pair: Pair, *, now_ms: int, fog_time_ms: int | None = None
    ) -> tuple[str, bytes] | None:
        """The live leases of ``pair`` all expire within ``lease.renew_before_ms``: ask for
        ``request_micros`` more now, with a later ``na``, while the cloud can still be
        reached (docs/protocol.md 17.6)."""
        t = now_ms if fog_time_ms is None else fog_time_ms
        return self._request(pair, self.request_micros, None, now_ms, t)

    def stalled(self, pair: Pair) -> bool:
        """A request of ``pair`` went unanswered for at least ``timeout_ms`` (it was resent):
        the cloud is not answering (a peer may help, docs/protocol.md 18.2)."""
        p = self.pending.get(pair)
        return p is not None and p.attempts >= 2

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
    """Reports sent and not yet cleared by the cloud, with their resend schedule: a delay
    doubling from ``retry_ms`` to ``REPORT_RETRY_MS_MAX``, then that, for as long as it
    takes (never abandoned)."""

    fog_id: str
    retry_ms: int
    pending: dict[bytes, _Pending] = field(default_factory=dict)  # lease_id -> report

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
            delay = min(REPORT_RETRY_MS_MAX, self.retry_ms * 2 ** min(p.attempts, 16))
            p.attempts += 1
            p.next_ms = now_ms + delay
            out.append((lease_id, (lease_report_topic(self.fog_id), p.wire)))
        return out
