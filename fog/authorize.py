"""The fog's decision on one payment intent: pure (no I/O, no clock, no randomness).

The store opens and verifies the envelope (``malformed``, ``bad_signature``), checks the topic
(``topic_mismatch``) and answers retransmissions of authorized intents; then it gathers what
the fog knows about the device (``DeviceView``), the owner's live leases (``LeaseView``) and
the device's rate bucket, and calls ``authorize``. The checks run in the precedence order of
spec section 6, so the first reason that applies is the one given.

Rules the spec leaves open (docs/protocol.md, section 13):

- validity windows are inclusive: a binding or credential is valid for ``nb <= now <= na``
  (fog time); a lease may be drawn on while ``now <= na``.
- the day of ``day`` limits is the UTC day of the fog's clock (``now_ms // 86_400_000``),
  not the device's ``t``: a device cannot reset its day total by lying about its clock.
- a whole amount is drawn from one lease: among the owner's live leases in the intent's
  currency with room for the whole amount, the one that expires soonest (ties: lowest lease
  id). Expiring budget is used first; amounts are never split across leases.
- the rate limiter is a per-device token bucket held in memory. It is charged for every
  intent that reaches the rate check (after ``stale``), whatever the final decision: it is
  the one piece of state a declined intent changes, and it is lost on restart (a restart
  refills every bucket, which at worst lets a device burst once more).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from fog.ratelimit import Bucket
from protocol.messages import Binding, Intent, OwnerCredential
from protocol.reasons import Reason

DAY_MS: Final = 86_400_000


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """The fog's local policy (spec section 6 defaults)."""

    clock_skew_ms: int = 300_000
    rate_per_s: float = 20.0  # per-device token bucket refill
    rate_burst: int = 40

    def __post_init__(self) -> None:
        assert self.clock_skew_ms >= 0
        assert self.rate_per_s > 0
        assert self.rate_burst >= 1


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceView:
    """What the fog knows about a device, gathered by the store inside the transaction.

    ``binding`` is the binding in force (None: unknown device); ``owner`` is the owner
    credential that vouches for it (same owner_id, and its key signed the binding; None:
    unknown). ``seq_taken``: an authorized intent with this device and ``q`` exists (it has a
    different intent id, since retransmissions were answered before).
    """

    binding: Binding | None
    owner: OwnerCredential | None
    device_revoked: bool = False
    owner_revoked: bool = False
    seq_last: int = 0  # highest q authorized for the device (0: none)
    seq_taken: bool = False
    day: int = 0  # UTC day number of day_micros
    day_micros: int = 0  # authorized on that day


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseView:
    lease_id: bytes
    currency: str
    amount_micros: int
    drawn_micros: int
    not_after_ms: int

    @property
    def left_micros(self) -> int:
        left = self.amount_micros - self.drawn_micros
        assert left >= 0
        return left


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """``reason`` None means authorized: ``lease_id`` is drawn ``amount_micros`` and the
    device's day total becomes ``day_micros`` on ``day``. ``bucket`` is the device's rate
    bucket after this intent, whatever the decision."""

    reason: Reason | None
    bucket: Bucket
    lease_id: bytes | None = None
    day: int = 0
    day_micros: int = 0

    @property
    def ok(self) -> bool:
        return self.reason is None


def utc_day(now_ms: int) -> int:
    return now_ms // DAY_MS


def within(not_before_ms: int, not_after_ms: int, now_ms: int) -> bool:
    return not_before_ms <= now_ms <= not_after_ms


def pick_lease(leases: Sequence[LeaseView], intent: Intent, *, now_ms: int) -> LeaseView | None:
    """The live lease in the intent's currency with room for the whole amount that expires
    soonest (ties: lowest lease id); None if there is none."""
    fits = [
        lease
        for lease in leases
        if lease.currency == intent.currency
        and now_ms <= lease.not_after_ms
        and lease.left_micros >= intent.amount_micros
    ]
    if not fits:
        return None
    return min(fits, key=lambda lease: (lease.not_after_ms, lease.lease_id))


def _identity(intent: Intent, view: DeviceView, *, fog_id: str, now_ms: int) -> Reason | None:
    """wrong_fog, unknown_device, revoked, expired: the checks of who is paying."""
    if intent.fog_id != fog_id:
        return Reason.WRONG_FOG
    binding, owner = view.binding, view.owner
    if binding is None or owner is None:
        return Reason.UNKNOWN_DEVICE
    assert binding.device == intent.device and binding.owner_id == owner.owner_id
    if view.device_revoked or view.owner_revoked:
        return Reason.REVOKED
    if not within(binding.not_before_ms, binding.not_after_ms, now_ms):
        return Reason.EXPIRED
    if not within(owner.not_before_ms, owner.not_after_ms, now_ms):
        return Reason.EXPIRED
    return None


def _order(intent: Intent, view: DeviceView, policy: Policy, *, now_ms: int) -> Reason | None:
    """seq_conflict and stale: is this intent new and on time."""
    if view.seq_taken:
        return Reason.SEQ_CONFLICT
    if intent.seq <= view.seq_last:
        return Reason.STALE
    if abs(intent.time_ms - now_ms) > policy.clock_skew_ms:
        return Reason.STALE
    return None


def _limits(intent: Intent, binding: Binding, day_total: int) -> Reason | None:
    """currency, payee_not_allowed, limit_tx, limit_day: what the binding allows."""
    if intent.currency != binding.currency:
        return Reason.CURRENCY
    if binding.payees is not None and intent.payee_id not in binding.payees:
        return Reason.PAYEE_NOT_ALLOWED
    if intent.amount_micros > binding.tx_max_micros:
        return Reason.LIMIT_TX
    if day_total + intent.amount_micros > binding.day_max_micros:
        return Reason.LIMIT_DAY
    return None


def authorize(
    intent: Intent,
    view: DeviceView,
    leases: Sequence[LeaseView],
    bucket: Bucket | None,
    *,
    fog_id: str,
    policy: Policy,
    now_ms: int,
) -> Decision:
    """Decide on an intent whose envelope verified and whose topic matched (spec section 6,
    from ``wrong_fog`` on). ``leases`` are the owner's leases at this fog (any currency, any
    expiry: this function filters them); ``bucket`` is the device's rate bucket (None: full).
    """
    before = bucket if bucket is not None else Bucket.full(policy.rate_burst, now_ms)
    reason = _identity(intent, view, fog_id=fog_id, now_ms=now_ms)
    if reason is None:
        reason = _order(intent, view, policy, now_ms=now_ms)
    if reason is not None:
        return Decision(reason=reason, bucket=before)
    after = before.refilled(rate_per_s=policy.rate_per_s, burst=policy.rate_burst, now_ms=now_ms)
    if after.tokens < 1.0:
        return Decision(reason=Reason.RATE_LIMITED, bucket=after)
    after = Bucket(after.tokens - 1.0, after.at_ms)
    assert view.binding is not None
    day = utc_day(now_ms)
    day_total = view.day_micros if view.day == day else 0
    reason = _limits(intent, view.binding, day_total)
    if reason is not None:
        return Decision(reason=reason, bucket=after)
    lease = pick_lease(leases, intent, now_ms=now_ms)
    if lease is None:
        return Decision(reason=Reason.INSUFFICIENT_BUDGET, bucket=after)
    return Decision(
        reason=None,
        bucket=after,
        lease_id=lease.lease_id,
        day=day,
        day_micros=day_total + intent.amount_micros,
    )
